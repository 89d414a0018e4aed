"""Fuzzing Tessera's reader: a committed corpus of hostile checkpoints, and a long mutation campaign.

``make_corpus.py`` writes ``corpus/`` (one case per attack, each with an ``expect.json``);
``worker.py`` runs cases in a child process that a :class:`~fuzz.harness.Worker` in the parent
watches for hangs and memory growth; ``campaign.py`` mutates generated checkpoints at scale.
See ``README.md``.
"""
