"""The docs' generated parts match the code, and the docs hold together.

- docs/losses.md's catalogue is ``losswire losses --markdown``; the catalogue, the registry and ListLosses
  cover every loss MMDetection 3.3 computes from tensors.
- docs/server.md's settings table is ``knobs_markdown()`` (``KNOBS`` in server/cli.py).
- docs/python-api.md's signatures and argument tables are the client's (names and defaults).
- docs/client-configuration.md names exactly the ``LOSSWIRE_*`` variables the client reads.
- Every relative link (and its #anchor) and every repository path the docs name exists; the README stays a
  landing page.

``LOSSWIRE_UPDATE_DOCS=1`` rewrites the generated blocks (catalogue, settings, signatures) from the code.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap

import pytest
from support.paths import ROOT

from losswire import client as losswire_client
from losswire.client import LossClient
from losswire.server.cli import knobs_markdown
from losswire.server.losses import LOSSES
from losswire.server.losses.catalogue import END, START, render_markdown

README = ROOT / "README.md"
DOCS = ROOT / "docs"
USER_DOCS = [README, *sorted(DOCS.glob("*.md"))]

# The 30 loss modules of mmdet.models.losses that take tensors (Accuracy is a metric and DDQAuxLoss
# works at head level: neither is a loss module). See ../shared/reference/mmdet-as-reference.md.
MMDET_33_LOSSES = {
    "AssociativeEmbeddingLoss", "BalancedL1Loss", "BoundedIoULoss", "CIoULoss", "CrossEntropyCustomLoss",
    "CrossEntropyLoss", "DIoULoss", "DiceLoss", "DistributionFocalLoss", "EIoULoss", "EQLV2Loss",
    "FocalCustomLoss", "FocalLoss", "GHMC", "GHMR", "GIoULoss", "GaussianFocalLoss", "IoULoss",
    "KnowledgeDistillationKLDivLoss", "L1Loss", "L2Loss", "MSELoss", "MarginL2Loss", "MultiPosCrossEntropyLoss",
    "QualityFocalLoss", "SIoULoss", "SeesawLoss", "SmoothL1Loss", "TripletLoss", "VarifocalLoss",
}  # fmt: skip


# -- generated from the code ---------------------------------------------------------------------------------


def test_loss_catalogue_is_current(generated):
    generated(DOCS / "losses.md", START, END, render_markdown()[len(START) : -len(END)])
    section = (DOCS / "losses.md").read_text()
    for name in LOSSES.names():
        assert f"| **{name}** |" in section


def test_every_mmdet_loss_is_registered_and_listed(client: LossClient):
    assert len(MMDET_33_LOSSES) == 30
    missing = MMDET_33_LOSSES - set(LOSSES.names())
    assert not missing, f"not registered: {sorted(missing)}"
    listed = {info.name: info for info in client.list_losses().losses}
    assert set(listed) >= MMDET_33_LOSSES
    for name in MMDET_33_LOSSES:
        info = listed[name]
        assert info.summary and info.inputs, name
        assert info.output in ("element", "sample", "scalar"), name


def test_the_nginx_configuration_in_the_docs_is_the_tested_one(generated):
    """docs/scaling.md shows deploy/nginx/losswire.conf, the file tests/operations/test_proxy.py runs."""
    config = (ROOT / "deploy" / "nginx" / "losswire.conf").read_text().rstrip("\n")
    fresh = f"\n```nginx\n{config}\n```\n"
    generated(ROOT / "docs" / "scaling.md", "<!-- nginx-config:start -->", "<!-- nginx-config:end -->", fresh)


def test_server_settings_table_is_current(generated):
    generated(DOCS / "server.md", "<!-- knobs:start -->\n", "<!-- knobs:end -->", knobs_markdown() + "\n")


API = {
    "RemoteLoss": losswire_client.RemoteLoss,
    "build_loss": losswire_client.build_loss,
    "evaluate_terms": losswire_client.evaluate_terms,
    "LossClient": losswire_client.LossClient,
    "Credentials": losswire_client.Credentials,
}


def render_signature(name: str, function) -> str:
    """``name(a, b=1, *, c=None)``: names and defaults, no annotations, wrapped under the parenthesis."""
    parts, star = [], False
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if parameter.kind is parameter.VAR_POSITIONAL:
            parts.append(f"*{parameter.name}")
            star = True
        elif parameter.kind is parameter.VAR_KEYWORD:
            parts.append(f"**{parameter.name}")
        elif parameter.default is parameter.empty:
            parts.append(parameter.name)
        else:
            parts.append(f"{parameter.name}={parameter.default!r}")
    lines = textwrap.wrap(
        f"{name}({', '.join(parts)})", width=104, subsequent_indent=" " * (len(name) + 1), break_on_hyphens=False
    )
    return "\n```text\n" + "\n".join(lines) + "\n```\n"  # text: ruff would format a python block its own way


def argument_rows(section: str) -> dict[str, str]:
    """``{argument: default cell}`` of the first argument table in ``section``."""
    rows = {}
    for match in re.finditer(r"^\| `(\*{0,2}\w+)` \|\s*([^|]*?)\s*\|", section, re.MULTILINE):
        rows.setdefault(match.group(1), match.group(2).strip())
    return rows


@pytest.mark.parametrize("name", sorted(API))
def test_python_api_signature_and_arguments(generated, name):
    path = DOCS / "python-api.md"
    opening = f"<!-- signature:{name} -->"
    generated(path, opening, "<!-- /signature -->", render_signature(name, API[name]))
    text = path.read_text()
    section = text[text.index(opening) :]
    section = section[: section.find("\n## ") if "\n## " in section else len(section)]
    table = section[section.index("| argument | default | meaning |") :]
    table = table[: table.find("\n\n")]
    rows = argument_rows(table)
    expected = {}
    for parameter in inspect.signature(API[name]).parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            expected[f"**{parameter.name}"] = ""
        elif parameter.default is parameter.empty:
            expected[parameter.name] = "required"
        else:
            expected[parameter.name] = f"`{parameter.default!r}`"
    assert rows == expected, f"python-api.md's table for {name} differs from the code"


def test_python_api_names_every_public_method():
    text = (DOCS / "python-api.md").read_text()
    documented = set(re.findall(r"`(?:\w+\.)?(\w+)[(`]", text))
    internal = {  # used by the client's own modules, not by callers
        "RemoteLoss": {"accept_answer", "call_shape", "encoded_config", "term_session", "keeps_state", "extra_repr"},
        "LossClient": {"buffers", "replicas", "stub"},
    }
    for cls in (losswire_client.RemoteLoss, losswire_client.LossClient):
        public = {m for m in vars(cls) if not m.startswith("_")}
        missing = public - documented - internal[cls.__name__]
        assert not missing, f"{cls.__name__}: public methods python-api.md does not list: {sorted(missing)}"


def client_environment_variables() -> set[str]:
    """Every ``LOSSWIRE_*`` name that appears as a whole string constant in the client's code."""
    names = set()
    for path in (ROOT / "client").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_text and re.fullmatch(r"LOSSWIRE_[A-Z0-9_]+", node.value):
                names.add(node.value)
    return names


def test_client_configuration_lists_every_variable_the_client_reads():
    text = (DOCS / "client-configuration.md").read_text()
    documented = set(re.findall(r"^\| `(LOSSWIRE_[A-Z0-9_]+)` \|", text, re.MULTILINE))
    read = client_environment_variables()
    assert "LOSSWIRE_TARGET" in read or "LOSSWIRE_TOKEN" in read  # the scan finds something
    assert documented == read, f"documented only: {documented - read}; read but undocumented: {read - documented}"


# -- the docs hold together ----------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        assert resolved.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{doc.name}: link to {target}: no such heading"


PATH = re.compile(r"`((?:tests|server|client|protos|examples|bench|deploy|docs)/[\w./-]*)`")


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_paths_named_exist(doc):
    for path in PATH.findall(doc.read_text()):
        if path.startswith("bench/results/"):  # what a benchmark run writes (gitignored)
            continue
        assert (ROOT / path.rstrip("/")).exists(), f"{doc.name} names {path}, which does not exist"


def test_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for doc in DOCS.glob("*.md"):
        if doc.name != "architecture.md":
            assert f"(docs/{doc.name})" in text, f"the README does not link docs/{doc.name}"
    assert "bash tests/install.sh && .venv/bin/python -m pytest -q" in text  # what .ci/run runs
    assert "--index-url https://download.pytorch.org/whl/cpu" in text


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_commands_use_the_virtualenvs_scripts(doc):
    """A command shown to run ``losswire`` or ``python`` names the virtualenv's (``.venv/bin/...``)."""
    for language, block in re.findall(r"```(bash|console)\n(.*?)```", doc.read_text(), flags=re.DOTALL):
        for line in block.splitlines():
            if language == "console" and not line.startswith("$ "):
                continue  # output
            command = line.removeprefix("$ ")
            for word in ("losswire", "python", "pytest", "pip"):
                assert not re.match(rf"(\w+=\S+ )*{word}\b", command), f"{doc.name}: bare {word}: {line}"
