"""Which implementation computed a loss: a stable digest of the code and settings behind its numbers.

A central loss service is worth running because its numbers are reproducible. The digest of a loss
covers what decides them: the source of the loss's class and of every class it inherits from (its
family file, the pipeline), every engine module those files import, directly or not (shared helpers
such as ``checks``, ``boxes`` or ``logits``), the fused kernel's files when fused kernels are on (its
module and the shared fused mechanism, and what they import), the device type, and torch's version.
Two servers that give the same digest for a loss compute the same numbers for the same inputs; a
caller can pin it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .registry import Registry

ENGINE = Path(__file__).resolve().parent
PACKAGE = __name__.rpartition(".")[0]  # losswire.server.losses
# every loss runs through these (weighting, reduction, avg_factor, input checks), whatever it imports
SHARED_SOURCES = ("pipeline.py", "checks.py")


def _class_files(cls: type) -> Iterator[Path]:
    """The files defining ``cls`` and its base classes (nn.Module's own excluded: that is torch's)."""
    for klass in inspect.getmro(cls):
        module = sys.modules.get(klass.__module__)
        path = getattr(module, "__file__", None)
        if path is not None and not klass.__module__.startswith("torch"):
            yield Path(path).resolve()


def _engine_file(module: str) -> Path | None:
    """The engine file of a dotted module name (its package's ``__init__.py`` for a package), or None
    outside the engine; the engine package's own ``__init__`` (which imports every loss) is left out."""
    if not module.startswith(PACKAGE + "."):
        return None
    relative = ENGINE.joinpath(*module[len(PACKAGE) + 1 :].split("."))
    for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str | None:
    """The dotted name of an engine file, or None for a file outside the engine (a plugin's)."""
    try:
        parts = path.relative_to(ENGINE).with_suffix("").parts
    except ValueError:
        return None
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


@functools.lru_cache(maxsize=256)
def _imported_engine_files(path: Path, stamp: tuple[int, int]) -> frozenset[Path]:
    """The engine files ``path`` imports (its own imports only; ``stamp`` keys the cache to the file's
    version). Relative imports resolve against the file's package when it lies in the engine."""
    own = _module_name(path)
    package = None if own is None else (own if path.name == "__init__.py" else own.rpartition(".")[0])
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if package is None:
                    continue
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]  # `from a import b`: b may be a module
        found.update(file for file in map(_engine_file, names) if file is not None)
    return frozenset(found)


def engine_dependencies(files: Iterable[Path]) -> set[Path]:
    """``files`` and every engine file they import, directly or through other engine files."""
    seen: set[Path] = set()
    pending = [Path(f).resolve() for f in files]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        stat = path.stat()
        pending.extend(_imported_engine_files(path, (stat.st_mtime_ns, stat.st_size)) - seen)
    return seen


def sources(registry: Registry, name: str, fused_file: Path | Iterable[Path] | None = None) -> tuple[Path, ...]:
    """The files loss ``name``'s numbers depend on (with ``fused_file``, its fused kernel's), sorted."""
    roots = {*_class_files(registry.get(name)), *(ENGINE / f for f in SHARED_SOURCES)}
    if fused_file is not None:
        roots.update([fused_file] if isinstance(fused_file, Path) else fused_file)
    return tuple(sorted(engine_dependencies(roots)))


def implementation_digest(
    registry: Registry, name: str, *, fused_file: Path | Iterable[Path] | None, device_type: str
) -> str:
    """``"sha256:<hex>"`` of loss ``name``'s implementation (see the module docstring). ``fused_file``:
    ``fused.kernel_source(cls)`` when fused kernels are on (one path or several), else None."""
    return _digest(name, sources(registry, name, fused_file), device_type)


@functools.lru_cache(maxsize=1024)
def _digest(name: str, files: tuple[Path, ...], device_type: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"loss {name}\ndevice {device_type}\ntorch {torch.__version__}\n".encode())
    for path in files:
        digest.update(f"file {path.relative_to(ENGINE) if path.is_relative_to(ENGINE) else path.name}\n".encode())
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()
