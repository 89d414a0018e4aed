"""The Tessera conformance suite: score any implementation of the format, in any language.

``conformance run ./mybackend`` starts the backend a folder declares
(``backend.json``), speaks the JSON-lines protocol of ``PROTOCOL.md`` with it,
and runs the cases: reading the checked-in test vectors (``vectors/``),
writing states that every reader must read back, saving from several ranks,
verifying. See ``README.md`` for a walkthrough.
"""
