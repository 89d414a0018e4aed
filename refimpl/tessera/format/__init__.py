"""The on-disk format as data: keys, data types, array layouts, the manifest, strict JSON.

Nothing here touches storage; the writer and the reader both build on it.
"""
