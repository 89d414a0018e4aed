"""The reference backend with its tensors on a GPU, through GPU-direct I/O (PROTOCOL.md P20).

Every tensor of a write request is moved to the CUDA device before ``tessera.save(state,
gpu_direct_storage(root))``, so chunk bytes go from device memory to their files through KvikIO and their
checksums are computed on the GPU; every tensor read is read into device memory from a checkpoint
opened on ``tessera.gpu_direct_storage(root)``, checked there, and only then copied to the host
to answer (P19). Compressed arrays take the host path inside tessera (zstd runs on the CPU); the
files are the same.

Without a CUDA device or KvikIO, ``hello`` fails with a message saying so, and the harness reports
the backend as unusable rather than scoring it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tessera
import torch
from tessera.engine.gpu.direct_io import gpu_direct_storage, kvikio_files
from tessera.format import Key, ObjectEntry, TensorEntry

from conformance.backends.reference.backend import ReferenceBackend, Request

__all__ = ["GpuDirectBackend"]


class GpuDirectBackend(ReferenceBackend):
    folder: ClassVar[Path] = Path(__file__).resolve().parent

    def __init__(self) -> None:
        super().__init__()
        kvikio_files()  # no CUDA or no KvikIO: GpuDirectUnavailableError, before any case runs
        self.device = torch.device("cuda", torch.cuda.current_device())

    def tensor(self, entry: Request) -> torch.Tensor:
        return super().tensor(entry).to(self.device)

    def save(self, state: dict[Any, Any], root: Path, options: dict[str, Any]) -> None:
        tessera.save(state, gpu_direct_storage(root), **options)

    def open(self, root: Path) -> tessera.Checkpoint:
        return tessera.open(tessera.gpu_direct_storage(root))

    def read_tensor(
        self, checkpoint: tessera.Checkpoint, key: Key, region: tuple[slice, ...] | None
    ) -> torch.Tensor | np.ndarray:
        entry = checkpoint.entry(key)
        assert isinstance(entry, (TensorEntry, ObjectEntry))  # called for arrays only
        layout = entry.layout
        shape = [s.stop - s.start for s in region] if region is not None else list(layout.shape)
        out = torch.empty(shape, dtype=layout.dtype.torch_dtype, device=self.device)
        checkpoint.read_into(key, out, region)
        return out.cpu()
