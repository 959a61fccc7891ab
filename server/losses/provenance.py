"""Which implementation computed a loss: a stable digest of the code and settings behind its numbers.

A central loss service is worth running because its numbers are reproducible. The digest of a loss
covers what decides them: the source of the loss's class and of every engine class it inherits from
(its family file, the pipeline), the engine's shared modules every loss runs through, the fused kernel
that answers it when fused kernels are on, the device type, and torch's version. Two servers that
give the same digest for a loss compute the same numbers for the same inputs; a caller can pin it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from .registry import Registry

# every loss runs through these (weighting, reduction, avg_factor, input checks)
ENGINE = Path(__file__).resolve().parent
SHARED_SOURCES = ("pipeline.py", "checks.py")


def _sources(cls: type) -> Iterable[Path]:
    """The files defining ``cls`` and its base classes (nn.Module's own excluded: that is torch's)."""
    for klass in inspect.getmro(cls):
        module = sys.modules.get(klass.__module__)
        path = getattr(module, "__file__", None)
        if path is not None and not klass.__module__.startswith("torch"):
            yield Path(path).resolve()


def implementation_digest(registry: Registry, name: str, *, fused_file: Path | None, device_type: str) -> str:
    """``"sha256:<hex>"`` of loss ``name``'s implementation (see the module docstring)."""
    files = sorted({*_sources(registry.get(name)), *(ENGINE / f for f in SHARED_SOURCES)})
    if fused_file is not None:
        files.append(fused_file.resolve())
    return _digest(name, tuple(files), device_type)


@functools.lru_cache(maxsize=1024)
def _digest(name: str, files: tuple[Path, ...], device_type: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"loss {name}\ndevice {device_type}\ntorch {torch.__version__}\n".encode())
    for path in files:
        digest.update(f"file {path.name}\n".encode())
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()
