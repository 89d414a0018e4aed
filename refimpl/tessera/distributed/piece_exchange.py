"""Moving the pieces of shared chunks to the ranks that write them: the writer's data source.

A chunk cut by the ranks' shards has one writer (the global plan assigns it); the other ranks
holding parts of it send their parts there before anything is written. :func:`exchange_pieces`
does that exchange (a collective: every rank of the save calls it once, after the global plan
is handed out) and returns what the engine's chunk writer reads the chunks from
(:data:`~tessera.engine.chunk_writer.SourceData`): a region of a piece in this rank's own memory
(a NumPy view of CPU memory, or a tensor on its GPU), or the bytes received for it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.chunk_writer import Held, SourceData
from ..format.dtypes import DType, dtype_by_name
from ..planning.global_plan import RankPlan, Source
from ..planning.local_plan import LocalPlan, piece_data
from ..state.tensors import as_numpy
from .collective import Collective

__all__ = ["exchange_pieces"]


def exchange_pieces(plan: RankPlan, local: LocalPlan, collective: Collective) -> SourceData:
    """Send this rank's parts of chunks other ranks write (``plan.sends``), receive the parts of
    the chunks it writes that other ranks hold (``plan.receives``); the data of every source of
    the chunks in ``plan.arrays``, the received ones on the host, and GPU tensors readable from
    any stream (the caller's stream has been waited for)."""
    dtypes = {s: a.layout.dtype for a in plan.arrays for c in a.chunks for s in c.sources}
    incoming = [(t, dtypes[t.source]) for t in plan.receives]
    moving_in = {t.source for t in plan.receives}
    used = {(s.leaf, s.piece) for s in [*dtypes, *(t.source for t in plan.sends)] if s not in moving_in}
    dtype_of = {leaf: dtype_by_name(local.arrays[leaf].dtype) for leaf, _ in used}
    pieces = {(leaf, piece): piece_data(local.pieces[leaf][piece], dtype_of[leaf]) for leaf, piece in used}

    for device in {p.device for p in pieces.values() if isinstance(p, torch.Tensor)}:
        # The I/O threads read GPU memory on streams of their own: what the caller queued on its
        # stream (the optimizer step that produced the tensors) must have finished.
        torch.cuda.current_stream(device).synchronize()

    def held(source: Source) -> Held:
        """The source region in this rank's own memory (a view, on the piece's device)."""
        box = local.pieces[source.leaf][source.piece].box
        return pieces[source.leaf, source.piece][source.region.relative_to(box.offset)]

    received_bytes = collective.exchange(
        [(t.peer, t.tag, _on_host(held(t.source), dtype_of[t.source.leaf])) for t in plan.sends],
        [(t.peer, t.tag, t.source.region.volume * dtype.itemsize) for t, dtype in incoming],
        "moving shared chunks' pieces to their owners",
    )
    received: dict[Source, Held] = {
        t.source: raw.view(dtype.numpy_dtype).reshape(t.source.region.shape)
        for (t, dtype), raw in zip(incoming, received_bytes, strict=True)
    }

    def data_of(source: Source) -> Held:
        return received[source] if source in received else held(source)

    return data_of


def _on_host(region: Held, dtype: DType) -> np.ndarray:
    """A region to send through the collective, which takes host arrays."""
    if isinstance(region, np.ndarray):
        return region
    return as_numpy(region.contiguous().cpu(), dtype)
