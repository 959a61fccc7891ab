"""Import rules of the house: who may depend on whom, checked on every import statement of the code.

The path of a request runs one way: ``losswire.client`` -> ``losswire.wire`` (owned by neither side)
<- ``losswire.server``. The engine knows nothing of gRPC or the wire; only the gRPC adapters and the
server's assembly speak gRPC. Every ``import`` and ``from ... import`` is read from the source (those
inside functions too), relative imports resolved against the module's package.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.paths import ROOT

# where each package's source lies (pyproject.toml's package-dir)
PACKAGES = {
    "losswire.server": ROOT / "server",
    "losswire.client": ROOT / "client",
    "losswire.wire": ROOT / "protos" / "wire",
}
GRPC = ("grpc", "grpc_health", "grpc_reflection", "grpc_status")
STUBS = ("losswire.v1", "losswire.inference", "google.protobuf", "google.rpc")
# the server's layers from the bottom up; ABOVE[i]: what layer i may not import
LAYERS = ("losses", "evaluation", "dataplane", "rpc", "app", "cli")
ABOVE = tuple(tuple(f"losswire.server.{layer}" for layer in LAYERS[i + 1 :]) for i in range(len(LAYERS)))


@dataclasses.dataclass(frozen=True)
class Rule:
    """Modules under ``where`` (and not under ``except_in``) may not import anything under ``forbidden``."""

    name: str
    where: tuple[str, ...]
    forbidden: tuple[str, ...]
    except_in: tuple[str, ...] = ()

    def applies_to(self, module: str) -> bool:
        return _under(module, self.where) and not _under(module, self.except_in)


RULES = (
    Rule("the wire package belongs to neither side", ("losswire.wire",), ("losswire.server", "losswire.client")),
    Rule("the wire package knows no gRPC", ("losswire.wire",), GRPC),
    Rule("the client never imports the server", ("losswire.client",), ("losswire.server",)),
    Rule("the server never imports the client", ("losswire.server",), ("losswire.client",)),
    Rule(
        "the engine and the evaluation know no gRPC and no protobuf",
        ("losswire.server.losses", "losswire.server.evaluation"),
        (*GRPC, *STUBS, "losswire.wire"),
    ),
    Rule(
        "only the gRPC front doors and the server's assembly speak gRPC",
        ("losswire.server",),
        GRPC,
        except_in=("losswire.server.rpc", "losswire.server.app", "losswire.server.cli"),
    ),
    # one direction inside the server: losses <- evaluation <- dataplane <- rpc <- app/cli
    Rule("the engine imports nothing above it", ("losswire.server.losses",), ABOVE[0]),
    Rule("the evaluation imports nothing above it", ("losswire.server.evaluation",), ABOVE[1]),
    Rule("the dataplane knows no front door", ("losswire.server.dataplane",), ABOVE[2]),
    Rule("the front doors never reach for the assembly", ("losswire.server.rpc",), ABOVE[3]),
)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def modules(packages: dict[str, Path]) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) of every Python file of ``packages``."""
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def imports_of(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every import in ``path``; ``from a import b`` gives ``a.b`` too, since
    ``b`` may be a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def violations(rules: tuple[Rule, ...], packages: dict[str, Path]) -> list[str]:
    found = []
    for module, path in modules(packages):
        for line, imported in imports_of(module, path):
            for rule in rules:
                if rule.applies_to(module) and _under(imported, rule.forbidden):
                    found.append(
                        f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}: "
                        f"{module} imports {imported} ({rule.name})"
                    )
    return sorted(set(found))


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_the_code_keeps_the_import_rules(rule):
    assert violations((rule,), PACKAGES) == []


def test_a_planted_violation_is_found(tmp_path):
    """The checker itself: a server module that imports the client, relatively and inside a function."""
    server = tmp_path / "server"
    (server / "sub").mkdir(parents=True)
    (server / "__init__.py").write_text("")
    (server / "sub" / "__init__.py").write_text("")
    (server / "sub" / "ok.py").write_text("from .. import other\nimport torch\n")
    (server / "sub" / "bad.py").write_text("def f():\n    from losswire.client import codec\n")
    (server / "bad_relative.py").write_text("from ..client.channel import LossClient\n")
    rule = Rule("no client", ("losswire.server",), ("losswire.client",))
    found = violations((rule,), {"losswire.server": server})
    assert [f.split(": ", 1)[1] for f in found] == [
        "losswire.server.bad_relative imports losswire.client.channel (no client)",
        "losswire.server.bad_relative imports losswire.client.channel.LossClient (no client)",
        "losswire.server.sub.bad imports losswire.client (no client)",
        "losswire.server.sub.bad imports losswire.client.codec (no client)",
    ]
