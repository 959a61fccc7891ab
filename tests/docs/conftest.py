"""Generated parts of the docs: a block between two HTML-comment markers holds what the code or a real run
produces, and a test compares it with a fresh copy. With ``LOSSWIRE_UPDATE_DOCS=1`` the test writes the
fresh copy into the doc instead of failing (review the diff before committing it)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

UPDATE = os.environ.get("LOSSWIRE_UPDATE_DOCS") == "1"


def between(text: str, opening: str, closing: str) -> tuple[int, int]:
    """Where the content between ``opening`` and the next ``closing`` lies in ``text``."""
    start = text.find(opening)
    assert start >= 0, f"no {opening!r} marker"
    start += len(opening)
    end = text.find(closing, start)
    assert end >= 0, f"no {closing!r} after {opening!r}"
    return start, end


def fenced(body: str, language: str) -> str:
    return f"\n```{language}\n{body.rstrip(chr(10))}\n```\n"


def language_of(content: str) -> str:
    match = re.match(r"\s*```(\w*)", content)
    return match.group(1) if match else ""


def check_block(
    path: Path,
    opening: str,
    closing: str,
    fresh: str,
    normalise: Callable[[str], str] = lambda text: text,
) -> None:
    """The doc's block equals ``fresh`` (both normalised); under LOSSWIRE_UPDATE_DOCS=1 it becomes ``fresh``."""
    text = path.read_text()
    start, end = between(text, opening, closing)
    if UPDATE:
        if text[start:end] != fresh:
            path.write_text(text[:start] + fresh + text[end:])
        return
    assert normalise(text[start:end]) == normalise(fresh), (
        f"{path.name}: the block after {opening} is stale; rewrite it with "
        f"LOSSWIRE_UPDATE_DOCS=1 .venv/bin/python -m pytest tests/docs, then review the diff.\n"
        f"--- in the doc:\n{text[start:end]}\n--- now:\n{fresh}"
    )


@pytest.fixture
def generated() -> Callable[..., None]:
    """``generated(path, opening, closing, fresh)``: see :func:`check_block`."""
    return check_block


@pytest.fixture
def transcript() -> Callable[..., None]:
    """``transcript(path, name, body, normalise=...)``: the fenced block of ``<!-- transcript:NAME -->``."""

    def check(path: Path, name: str, body: str, normalise: Callable[[str], str] = lambda text: text) -> None:
        opening, closing = f"<!-- transcript:{name} -->", "<!-- /transcript -->"
        text = path.read_text()
        start, end = between(text, opening, closing)
        check_block(path, opening, closing, fenced(body, language_of(text[start:end]) or "console"), normalise)

    return check
