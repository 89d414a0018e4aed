"""PyTorch Distributed Checkpoint (DCP) plug-in: ``dcp.save``/``dcp.load`` write and read Tessera checkpoints.

``TesseraStorageWriter`` turns the shards that DCP's planner hands a storage
writer into Tessera's own sharded save, so that ``dcp.save`` and
``dcp.async_save`` commit the same standard checkpoint that ``tessera.save``
writes for the same state (Zarr arrays, a CRC per chunk, a JSON manifest).
``TesseraStorageReader`` describes any Tessera checkpoint to DCP as its
``Metadata`` (each array's chunk grid as DCP's chunks) and fills DCP's read
items from region reads, so ``dcp.load`` reshards from checkpoints written by
either. Neither pickles: non-tensor values are JSON entries (or bytes).
``torch.distributed.checkpoint`` ships with torch, so no extra is needed.
"""

from __future__ import annotations

from .planners import TesseraLoadPlanner, TesseraSavePlanner
from .reader import TesseraStorageReader
from .writer import TesseraStorageWriter

__all__ = ["TesseraLoadPlanner", "TesseraSavePlanner", "TesseraStorageReader", "TesseraStorageWriter"]
