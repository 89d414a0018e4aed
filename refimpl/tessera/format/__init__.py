"""The on-disk format as data: keys, data types, array layouts, the manifest, strict JSON.

This package is public: the conformance suite and other implementations' tools build on
the names in ``__all__`` (import them from ``tessera.format``; the modules behind them are
not an interface). Nothing here touches storage or moves tensor data: these are the
format's rules as code (spec sections 2-8, 11 and 13), shared by the writer, the reader,
``verify`` and the conformance checks:

- keys (``key_to_path``, ``path_to_key``...): a state-dict key to its escaped path (§3);
- data types (``DType``, ``DTYPES``, ``dtype_by_name``...): the 19 types and their codecs (§4);
- ``ArrayLayout``, ``chunk_key``: an array's grid, codecs and ``zarr.json`` (§5, §6);
- ``encode_chunk``, ``decode_chunk``: chunk bytes and their CRC32C (§6);
- ``Manifest`` and its entries, ``check_root_document``: the root document, parsed and
  checked in the order a reader must (§3, §12); ``seal_root`` and the manifest digest (R3.20);
- ``ReaderLimits``: the bounds checked before any allocation (§11);
- ``loads``, ``dumps``: strict JSON (no duplicate members, NaN or Infinity);
- ``split_tuples``, ``join_tuples``: a JSON value's tuples as positions beside it (R3.22);
- ``validate``, ``schema_problems``: the JSON Schemas of ``schemas/``.

Names are imported on first use, so importing one costs only its module's imports; the
zarr-python data types are apart, in ``tessera.format.zarr_dtypes`` (it needs zarr).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..util.lazy import lazy_exports

if TYPE_CHECKING:
    from .chunk_codec import decode_chunk, encode_chunk
    from .chunk_list import CRC_HEX_DIGITS
    from .digest import DIGEST_MEMBER, PLACEHOLDER, check_manifest_digest, reseal_root, seal_root
    from .dtypes import DTYPES, DType, dtype_by_name, dtype_of_numpy, dtype_of_torch
    from .keys import MAX_SEGMENT_BYTES, Key, KeyComponent, format_key, key_to_path, parent_paths, path_to_key
    from .layout import ArrayLayout, ChunkIndex, chunk_key
    from .limits import DEFAULT_LIMITS, ReaderLimits
    from .manifest import (
        FORMAT_NAME,
        FORMAT_VERSION,
        NONFINITE_FLOATS,
        SUPPORTED_MAJOR,
        Entry,
        Manifest,
        ObjectEntry,
        TensorEntry,
        ValueEntry,
        WriterInfo,
    )
    from .root import check_root_document
    from .schemas import SCHEMA_DIR, SchemaName, schema_problems, validate
    from .strict_json import dumps, loads
    from .tuples import Position, join_tuples, split_tuples

_LAZY = {
    "Key": (".keys", "Key"),
    "KeyComponent": (".keys", "KeyComponent"),
    "MAX_SEGMENT_BYTES": (".keys", "MAX_SEGMENT_BYTES"),
    "format_key": (".keys", "format_key"),
    "key_to_path": (".keys", "key_to_path"),
    "parent_paths": (".keys", "parent_paths"),
    "path_to_key": (".keys", "path_to_key"),
    "DTYPES": (".dtypes", "DTYPES"),
    "DType": (".dtypes", "DType"),
    "dtype_by_name": (".dtypes", "dtype_by_name"),
    "dtype_of_numpy": (".dtypes", "dtype_of_numpy"),
    "dtype_of_torch": (".dtypes", "dtype_of_torch"),
    "ArrayLayout": (".layout", "ArrayLayout"),
    "ChunkIndex": (".layout", "ChunkIndex"),
    "chunk_key": (".layout", "chunk_key"),
    "DEFAULT_LIMITS": (".limits", "DEFAULT_LIMITS"),
    "ReaderLimits": (".limits", "ReaderLimits"),
    "Entry": (".manifest", "Entry"),
    "FORMAT_NAME": (".manifest", "FORMAT_NAME"),
    "FORMAT_VERSION": (".manifest", "FORMAT_VERSION"),
    "Manifest": (".manifest", "Manifest"),
    "NONFINITE_FLOATS": (".manifest", "NONFINITE_FLOATS"),
    "ObjectEntry": (".manifest", "ObjectEntry"),
    "SUPPORTED_MAJOR": (".manifest", "SUPPORTED_MAJOR"),
    "TensorEntry": (".manifest", "TensorEntry"),
    "ValueEntry": (".manifest", "ValueEntry"),
    "WriterInfo": (".manifest", "WriterInfo"),
    "CRC_HEX_DIGITS": (".chunk_list", "CRC_HEX_DIGITS"),
    "decode_chunk": (".chunk_codec", "decode_chunk"),
    "encode_chunk": (".chunk_codec", "encode_chunk"),
    "DIGEST_MEMBER": (".digest", "DIGEST_MEMBER"),
    "PLACEHOLDER": (".digest", "PLACEHOLDER"),
    "check_manifest_digest": (".digest", "check_manifest_digest"),
    "reseal_root": (".digest", "reseal_root"),
    "seal_root": (".digest", "seal_root"),
    "check_root_document": (".root", "check_root_document"),
    "SCHEMA_DIR": (".schemas", "SCHEMA_DIR"),
    "SchemaName": (".schemas", "SchemaName"),
    "schema_problems": (".schemas", "schema_problems"),
    "validate": (".schemas", "validate"),
    "dumps": (".strict_json", "dumps"),
    "loads": (".strict_json", "loads"),
    "Position": (".tuples", "Position"),
    "join_tuples": (".tuples", "join_tuples"),
    "split_tuples": (".tuples", "split_tuples"),
}
"""Each public name imported on first use: the module that defines it, and its name there."""

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all attribute
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "CRC_HEX_DIGITS",
    "DEFAULT_LIMITS",
    "DIGEST_MEMBER",
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_SEGMENT_BYTES",
    "NONFINITE_FLOATS",
    "PLACEHOLDER",
    "SCHEMA_DIR",
    "SUPPORTED_MAJOR",
    "ArrayLayout",
    "ChunkIndex",
    "DType",
    "Entry",
    "Key",
    "KeyComponent",
    "Manifest",
    "ObjectEntry",
    "Position",
    "ReaderLimits",
    "SchemaName",
    "TensorEntry",
    "ValueEntry",
    "WriterInfo",
    "check_manifest_digest",
    "check_root_document",
    "chunk_key",
    "decode_chunk",
    "dtype_by_name",
    "dtype_of_numpy",
    "dtype_of_torch",
    "dumps",
    "encode_chunk",
    "format_key",
    "join_tuples",
    "key_to_path",
    "loads",
    "parent_paths",
    "path_to_key",
    "reseal_root",
    "schema_problems",
    "seal_root",
    "split_tuples",
    "validate",
]
