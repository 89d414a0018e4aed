"""Checks of a checkpoint a backend wrote: schema, bytes, stock readers, commit order (P21)."""
