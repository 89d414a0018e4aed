"""Backends that ship with the harness: the reference implementation, as a subprocess and in-process.

Each folder holds a ``backend.json`` (PROTOCOL.md P1). The reference backend's class is importable
(``conformance.backends.reference.backend``), so that variants and the deliberately broken backends
of the harness's own tests reuse it instead of copying it.
"""
