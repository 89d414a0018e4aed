"""Checks of the arguments that the API's functions take as lists of names."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["string_list"]


def string_list(values: Iterable[str], argument: str, what: str) -> list[str]:
    """``values`` as a list of strings, or a TypeError naming ``argument`` (holding ``what``).

    A lone string is refused, because iterating it would read it one character at a time."""
    if isinstance(values, str):
        raise TypeError(f"{argument} must be a list of {what}, not one string: {argument}=[{values!r}]")
    out = list(values)
    wrong = [v for v in out if not isinstance(v, str)]
    if wrong:
        raise TypeError(f"{argument} must hold {what} (strings), got {wrong[0]!r}")
    return out
