"""Fixtures of the service tests: the gated and hungry test losses (``tests/plugins/fault_losses.py``)."""

from __future__ import annotations

from types import ModuleType

import pytest
from support.faults import load_fault_losses

from losswire.server.losses import Registry


@pytest.fixture(scope="module")
def fault_losses() -> tuple[ModuleType, Registry]:
    """The fault losses in a registry of their own, once per test module: (the plugin module, the registry)."""
    return load_fault_losses()


@pytest.fixture(scope="module")
def faults(fault_losses) -> ModuleType:
    """The plugin module, whose ``open_gate`` / ``wait_started`` drive the gates."""
    return fault_losses[0]
