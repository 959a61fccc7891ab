"""The README's catalogue is generated from the losses' descriptions and must stay in sync."""

from pathlib import Path

from losswire.server.losses import LOSSES
from losswire.server.losses.catalogue import END, START, render_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_catalogue_is_current():
    text = README.read_text()
    section = text[text.index(START) : text.index(END) + len(END)]
    assert section == render_markdown(), "regenerate the README catalogue: losswire losses --markdown"
    for name in LOSSES.names():
        assert f"| **{name}** |" in section
