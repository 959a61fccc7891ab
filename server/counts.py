"""Counts by key (a token's calls, a connection's requests) that keep no key at zero: callers that come
and go leave nothing behind in them."""

from __future__ import annotations

from collections.abc import MutableMapping


def count_down(counts: MutableMapping[str, int], key: str) -> None:
    """One less of ``key``, which must be counted; the key goes when it reaches zero."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
