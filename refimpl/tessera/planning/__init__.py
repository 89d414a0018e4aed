"""Save planning (spec §5, §16): a local plan per rank, one global plan, one owner per chunk.

Planning is data only, made and checked before a byte is written: every key
is encoded (bad keys fail here), every value gets its encoding (pickle only
where the caller named the key), the ranks' shards are checked to tile their
tensors, and every chunk gets exactly one writer.
"""

from .cache import PlanCache
from .options import DEFAULT_CHUNK_BYTES, SaveOptions, Zstd

__all__ = ["DEFAULT_CHUNK_BYTES", "PlanCache", "SaveOptions", "Zstd"]
