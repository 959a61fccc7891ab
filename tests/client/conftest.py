"""Fixtures of the client's tests: MMDetection's own classes when mmdet can be imported here.

MMDetection is never a losswire dependency, and the test environment does not install it; tests that need
mmdet's classes (a real ``DynamicRoIHead``, mmdet's own classifier hooks) take the ``mmdet_models``
fixture and are skipped without it. Run them with mmdet installed (``tests/reference`` documents a
CPU install: mmdet 3.3, mmengine 0.10.7, mmcv-lite 2.1.0).

mmcv-lite has no compiled ops (``mmcv._ext``), which ``import mmdet.models`` loads; on the CPU no loss
calls them, so a placeholder module answers every op name with a function that raises if called. The
placeholder lives here, in the tests, never in losswire's code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


class _MissingOps(types.ModuleType):
    """``mmcv._ext`` without its compiled ops: each name is a function that raises when called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is a compiled op, absent from mmcv-lite")

        return missing


def _stand_in_for_missing_ops() -> None:
    """Before any test imports mmdet (the adapter looks classes up in mmdet's registry, which imports
    mmdet.models): with mmdet and mmcv-lite installed, the placeholder ``mmcv._ext``."""
    if importlib.util.find_spec("mmdet") is not None and importlib.util.find_spec("mmcv._ext") is None:
        sys.modules.setdefault("mmcv._ext", _MissingOps("mmcv._ext"))


_stand_in_for_missing_ops()


def import_mmdet_models() -> types.ModuleType | None:
    """``mmdet.models`` (every head, detector and loss registered), or None without mmdet."""
    if importlib.util.find_spec("mmdet") is None:
        return None
    return importlib.import_module("mmdet.models")


@pytest.fixture(scope="session")
def mmdet_models() -> types.ModuleType:
    """``mmdet.models``; the test is skipped where MMDetection is not installed."""
    models = import_mmdet_models()
    if models is None:
        pytest.skip("needs MMDetection's own classes: mmdet is not installed here")
    return models
