"""Tessera test suite (spec/tessera-v1.md rule numbers in test names and docstrings)."""
