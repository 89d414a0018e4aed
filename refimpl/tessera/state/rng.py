"""Every random number generator of a rank, saved as tensors and JSON values (never pickle).

:class:`RNGState` is a stateful object: ``state_dict()`` captures, on the calling rank,
Python's ``random``, NumPy's legacy global ``RandomState``, the NumPy ``Generator`` s the user
names, the torch CPU generator and, once CUDA is initialized, every CUDA device's generator;
``load_state_dict()`` restores them so that the next draws are those of an uninterrupted run.

Layout: one cell per global rank. Each leaf of a rank's state is a :class:`ShardedObject` of
grid ``(world_size,)`` at offset ``(rank,)``, so ``rng/torch/~3`` is rank 3's torch CPU state
and a multi-rank save stores every rank's state, each rank writing only its own cells with no
collective. Megatron instead keys RNG by (pp, tp) position with a list over the data-parallel
ranks, which needs a gather of every DP rank's state (through pickle, in torch) and ties the
checkpoint to a pipeline/tensor layout that Tessera's format does not know; a per-rank cell
needs neither, and the reader of a cell needs nothing but its path.

Encoding: tensors and arrays are stored as they are (torch ``uint8`` states, NumPy ``uint32`` /
``uint64`` keys and counters), everything else as JSON. JSON has no tuples, so the tuples
that ``random.setstate`` and ``np.random.set_state`` need are rebuilt here, and the live
generators' own states serve as the template of types; integers outside the signed 64-bit range
(PCG64's 128-bit state) are stored as decimal strings, which every JSON reader keeps exactly.

Resuming at another world size (``load_state_dict`` given the whole grid, as a load without a
template returns it): a rank that the checkpoint holds gets its own state back exactly. A rank
beyond the saved world size gets a state derived deterministically from rank 0's saved state
and its own rank (SHA-256 of both), and a :class:`TesseraWarning` says so: its draws differ
from every saved rank's and are the same on every resume, but they are not those of any
uninterrupted run. With fewer ranks than saved, rank 0 warns that the extra ranks' states are
not used. Given only this rank's cells (a load with ``state_dict()`` as the template), the rank
must exist in the checkpoint: the load itself refuses a missing cell. A loader that knows the
saved world size puts :meth:`RNGState.for_saved_world` in its template instead (the
``Checkpointer`` does): a rank beyond it then reads rank 0's cells only and derives its state
from them, with the warning, so a resume at a larger world size goes on.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import KeyMismatchError, TensorMismatchError, TesseraWarning
from .flatten import is_json
from .sharded import ShardedObject

__all__ = ["DerivedRNGState", "RNGState"]

_INT64 = range(-(2**63), 2**63)


class RNGState:
    """The random generators of this rank, saved per rank without pickle.

    Put it in the state dict that is saved (``{"rng": rng.state_dict(), ...}`` until stateful
    values are saved directly) on every rank; after loading, call ``load_state_dict`` with what
    the load returned for that key. ``generators`` names the NumPy ``Generator`` s (or bit
    generators) to include besides the global ones; the same names must be given on resume.
    ``process_group`` is the group whose rank numbers the cells (the default group when
    ``torch.distributed`` is initialized, else a single rank 0).

    At another world size (see the module docstring): a saved rank gets its own state back; a
    rank the checkpoint lacks gets one derived from rank 0's saved state and its rank, with a
    ``TesseraWarning``; with fewer ranks, rank 0 warns that the extra states are not used.
    """

    def __init__(
        self,
        generators: Mapping[str, np.random.Generator | np.random.BitGenerator] | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self._generators = dict(generators or {})
        for name, gen in self._generators.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"RNGState: generator names must be non-empty strings, got {name!r}")
            if not isinstance(gen, (np.random.Generator, np.random.BitGenerator)):
                raise TypeError(
                    f"RNGState: generators[{name!r}] is a {type(gen).__name__}, "
                    "not a numpy.random.Generator or BitGenerator"
                )
        self._group = process_group

    def state_dict(self) -> dict[str, Any]:
        """This rank's generator states, each leaf a ``ShardedObject`` cell of a per-rank grid."""
        rank, world = self._rank_and_world()
        return _cells(_encode(self._live()), world, rank)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every generator from ``state``: the whole grid (a load without a template) or
        this rank's cells (a load with ``state_dict()`` as the template).

        Refuses before changing any generator (``KeyMismatchError`` for generators saved or
        named but not both, ``TensorMismatchError`` for a state of another kind or shape).
        """
        rank, world = self._rank_and_world()
        if not isinstance(state, Mapping) or "torch" not in state:
            raise KeyMismatchError(
                "RNGState.load_state_dict: expected the mapping that RNGState.state_dict() saved "
                f"(with a 'torch' entry), got {type(state).__name__}"
            )
        if isinstance(state["torch"], Mapping):  # the whole grid: {rank: cell} at every leaf
            saved_world = len(state["torch"])
            if rank < saved_world:
                self._restore(_cell_of(state, rank))
                if rank == 0 and saved_world > world:
                    warnings.warn(
                        f"RNGState: the checkpoint holds the RNG states of {saved_world} ranks and "
                        f"this run has {world}: ranks 0-{world - 1} got their own states back, "
                        f"the states of ranks {world}-{saved_world - 1} are not used",
                        TesseraWarning,
                        stacklevel=2,
                    )
                return
            self._derive_with_warning(_cell_of(state, 0), rank, saved_world)
            return
        self._restore(state)

    def _derive_with_warning(self, rank0: Mapping[str, Any], rank: int, saved_world: int) -> None:
        self._derive(rank0, rank)
        warnings.warn(
            f"RNGState: the checkpoint holds the RNG states of {saved_world} ranks; rank {rank} "
            f"had none, so its generators were seeded from rank 0's saved state and rank {rank} "
            "(the same on every resume, but not the draws of an uninterrupted run)",
            TesseraWarning,
            stacklevel=3,
        )

    def for_saved_world(self, saved_world: int) -> RNGState | DerivedRNGState:
        """What a load's template holds for a checkpoint saved by ``saved_world`` ranks: this
        object where the checkpoint has this rank's cells, else a :class:`DerivedRNGState` that
        reads rank 0's cells and seeds this rank's generators from them and the rank."""
        rank, _ = self._rank_and_world()
        return self if rank < saved_world else DerivedRNGState(self, rank, saved_world)

    def _rank_and_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self._group), dist.get_world_size(self._group)
        return 0, 1

    def _live(self) -> dict[str, Any]:
        """The current states in their native form, with tuples turned into dicts and lists."""
        version, internal, gauss = random.getstate()
        live: dict[str, Any] = {
            "python": {"version": version, "state": list(internal), "gauss": gauss},
            "numpy": np.random.get_state(legacy=False),
            "torch": torch.get_rng_state(),
        }
        if self._generators:
            live["generators"] = {name: _bit_generator(g).state for name, g in self._generators.items()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            live["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return live

    def _checked(self, saved: Mapping[str, Any]) -> tuple[dict[str, Any], Any, bool]:
        """``saved`` (one rank's cells) checked against the live generators and in their types;
        the CUDA states to restore (``None`` unless both the run and the checkpoint have them);
        whether this run's CUDA generators are live."""
        live = self._live()
        live_cuda = live.pop("cuda", None)
        states = _decode(live, {k: v for k, v in saved.items() if k != "cuda"}, "rng")
        cuda = None
        if live_cuda is not None and "cuda" in saved:
            cuda = _decode(live_cuda, saved["cuda"], "rng/cuda")
        return states, cuda, live_cuda is not None

    def _restore(self, saved: Mapping[str, Any]) -> None:
        """Set every generator from this rank's saved cells, all checked first; CUDA states are
        restored where both the run and the checkpoint have them, and a warning says where not."""
        states, cuda, live_cuda = self._checked(saved)
        python = states["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        legacy = states["numpy"]
        np.random.set_state(
            (
                legacy["bit_generator"],
                legacy["state"]["key"],
                legacy["state"]["pos"],
                legacy["has_gauss"],
                legacy["gauss"],
            )
        )
        for name, gen_state in states.get("generators", {}).items():
            _bit_generator(self._generators[name]).state = gen_state
        torch.set_rng_state(states["torch"])
        if cuda is not None:
            for device, cuda_state in enumerate(cuda):
                torch.cuda.set_rng_state(cuda_state, device)
        elif "cuda" in saved:
            warnings.warn(
                "RNGState: the checkpoint holds CUDA generator states but CUDA is not available or not "
                "initialized here: they were not restored (call torch.cuda.init() before loading)",
                TesseraWarning,
                stacklevel=3,
            )
        elif live_cuda:
            warnings.warn(
                "RNGState: the checkpoint holds no CUDA generator states (CUDA was not initialized "
                "when it was saved): this run's CUDA generators keep their current states",
                TesseraWarning,
                stacklevel=3,
            )

    def _derive(self, rank0: Mapping[str, Any], rank: int) -> None:
        """Seed every generator from rank 0's saved cells and ``rank`` (a rank the save lacked)."""
        self._checked(rank0)  # the same generators as the saving run, or refused as for a restore
        torch_state = rank0["torch"]
        raw = torch_state.numpy() if isinstance(torch_state, torch.Tensor) else np.asarray(torch_state)
        base = hashlib.sha256(np.ascontiguousarray(raw).tobytes() + rank.to_bytes(8, "little", signed=True))

        def seed(label: str) -> int:
            digest = base.copy()
            digest.update(label.encode())
            return int.from_bytes(digest.digest()[:8], "little") >> 1  # below 2**63 for torch

        random.seed(seed("python"))
        np.random.seed(np.random.SeedSequence(seed("numpy")).generate_state(4))
        for name, gen in self._generators.items():
            bit_gen = _bit_generator(gen)
            bit_gen.state = type(bit_gen)(np.random.SeedSequence(seed(f"generators/{name}"))).state
        torch.manual_seed(seed("torch"))  # seeds the CUDA generators too (lazily, without CUDA)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed("cuda"))


class DerivedRNGState:
    """A rank's :class:`RNGState` as a load's template when the checkpoint has no cells for the
    rank (saved by fewer ranks): it reads rank 0's cells and seeds the rank's generators from
    them and the rank (``RNGState``'s derivation, with its ``TesseraWarning``). Made by
    :meth:`RNGState.for_saved_world`."""

    def __init__(self, rng: RNGState, rank: int, saved_world: int) -> None:
        self._rng = rng
        self._rank = rank
        self._saved_world = saved_world

    def state_dict(self) -> dict[str, Any]:
        """Rank 0's cells (``rng/torch/~0``...): the only ones a load reads for this rank."""
        return _cells(_encode(self._rng._live()), self._saved_world, 0)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Seed the rank's generators from rank 0's loaded cells (checked as for a restore)."""
        self._rng._derive_with_warning(state, self._rank, self._saved_world)


def _bit_generator(gen: np.random.Generator | np.random.BitGenerator) -> np.random.BitGenerator:
    return gen.bit_generator if isinstance(gen, np.random.Generator) else gen


def _encode(tree: Any) -> Any:
    """NumPy scalars as Python numbers; integers outside int64 as decimal strings."""
    if isinstance(tree, dict):
        return {k: _encode(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_encode(v) for v in tree]
    if isinstance(tree, np.generic):
        tree = tree.item()
    if isinstance(tree, int) and not isinstance(tree, bool) and tree not in _INT64:
        return str(tree)
    return tree


def _cells(tree: dict[str, Any], world: int, rank: int) -> dict[str, Any]:
    """Each JSON subtree and each tensor or array of ``tree`` as one cell of the rank grid."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not is_json(value):
            out[key] = _cells(value, world, rank)
        else:
            out[key] = ShardedObject(value, (world,), (rank,))
    return out


def _cell_of(grid: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """Rank ``rank``'s cells out of a grid loaded whole (each cell ``{rank: value}``)."""
    out: dict[str, Any] = {}
    for key, value in grid.items():
        if isinstance(value, Mapping) and value and all(type(k) is int for k in value):
            if rank not in value:
                raise KeyMismatchError(f"RNGState: {key} holds no cell for rank {rank}")
            out[key] = value[rank]
        elif isinstance(value, Mapping):
            out[key] = _cell_of(value, rank)
        else:
            raise KeyMismatchError(
                f"RNGState: {key} is a {type(value).__name__}, not a grid of per-rank cells"
            )
    return out


def _decode(template: Any, saved: Any, where: str) -> Any:
    """``saved`` in the types of the live ``template``, checked against it before any generator changes."""
    if isinstance(template, dict):
        if not isinstance(saved, Mapping):
            raise TensorMismatchError(
                f"{where}: the checkpoint holds a {type(saved).__name__}, not a mapping"
            )
        kind = template.get("bit_generator")
        if kind is not None and saved.get("bit_generator") != kind:
            raise TensorMismatchError(
                f"{where}: the checkpoint holds a {saved.get('bit_generator')} state, "
                f"this run's generator is a {kind}"
            )
        missing, extra = sorted(set(template) - set(saved)), sorted(set(saved) - set(template))
        if missing or extra:
            raise KeyMismatchError(
                f"{where}: the checkpoint's RNG states and this run's generators differ "
                f"(only here: {missing}, only in the checkpoint: {extra}); "
                "pass RNGState the same named generators as the saving run"
            )
        return {k: _decode(t, saved[k], f"{where}/{k}") for k, t in template.items()}
    if isinstance(template, (np.ndarray, torch.Tensor)):
        array = saved.numpy() if isinstance(saved, torch.Tensor) else np.asarray(saved)
        expected = template.numpy() if isinstance(template, torch.Tensor) else template
        if array.dtype != expected.dtype or array.shape != expected.shape:
            raise TensorMismatchError(
                f"{where}: stored {array.dtype} {list(array.shape)}, "
                f"this run's generator has {expected.dtype} {list(expected.shape)}"
            )
        return torch.from_numpy(array.copy()) if isinstance(template, torch.Tensor) else array.copy()
    if isinstance(template, int) and not isinstance(template, bool) and isinstance(saved, (int, str)):
        return int(saved)
    if isinstance(template, list):
        if not isinstance(saved, list) or len(saved) != len(template):
            raise TensorMismatchError(
                f"{where}: the checkpoint holds no list of {len(template)} values there"
            )
        return [_decode(t, s, f"{where}/{i}") for i, (t, s) in enumerate(zip(template, saved, strict=True))]
    return saved
