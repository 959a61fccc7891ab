"""The gated and hungry test losses of ``tests/plugins/fault_losses.py``, loaded for an in-process server."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

import losswire.server.losses as engine
from losswire.server.losses import LOSSES, Registry

from .paths import PLUGINS

PLUGIN = PLUGINS / "fault_losses.py"


def load_fault_losses() -> tuple[ModuleType, Registry]:
    """tests/plugins/fault_losses.py registered into a copy of the built-in registry: (the module, whose
    ``open_gate`` / ``wait_started`` drive the gates, and the registry to give an in-process server).

    The process-wide ``LOSSES`` stays as it is: other tests compare it with the README's catalogue.
    """
    registry = LOSSES.copy("fault-tests")
    spec = importlib.util.spec_from_file_location("losswire_test_plugin_fault_losses", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "LOSSES", registry)
        spec.loader.exec_module(module)
    assert {"GatedL1Loss", "HungryL1Loss"} <= set(registry.names())
    return module, registry
