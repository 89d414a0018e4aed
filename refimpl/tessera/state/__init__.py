"""Sharded state: what each rank holds of a global tensor, and how that maps onto boxes (spec §16)."""

from .flat_buffer import flat_buffer_shards
from .rng import RNGState
from .sharded import ShardedObject, ShardedTensor

__all__ = ["RNGState", "ShardedObject", "ShardedTensor", "flat_buffer_shards"]
