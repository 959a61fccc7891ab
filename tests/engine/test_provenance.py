"""The implementation digest covers every engine file a loss's numbers depend on: its family, the
helpers they import (directly or not), and with fused kernels on, the kernel's module and the shared
mechanism with what they import."""

from __future__ import annotations

from pathlib import Path

import pytest

import losswire.server.losses as engine
from losswire.server.losses import LOSSES, fused, provenance

ENGINE = Path(engine.__file__).resolve().parent  # as the engine names its files (a symlinked install too)


def _names(files: tuple[Path, ...]) -> set[str]:
    return {str(f.relative_to(ENGINE)) for f in files}


def test_a_family_with_its_helpers():
    giou = _names(provenance.sources(LOSSES, "GIoULoss"))
    assert {"iou.py", "boxes.py", "pipeline.py", "checks.py", "cost.py", "schema.py", "registry.py"} <= giou
    assert not giou & {"focal.py", "classifier.py", "logits.py", "fused/__init__.py"}
    focal = _names(provenance.sources(LOSSES, "FocalLoss"))
    assert {"focal.py", "classifier.py", "pipeline.py", "checks.py"} <= focal and "boxes.py" not in focal
    assert "__init__.py" not in focal  # the package only registers the losses


def test_with_its_fused_kernel():
    files = fused.kernel_source(LOSSES.get("FocalLoss"))
    assert _names(files) == {"fused/focal.py", "fused/__init__.py"} and all(f.is_file() for f in files)
    focal = _names(provenance.sources(LOSSES, "FocalLoss", files))
    assert {"fused/focal.py", "fused/__init__.py", "logits.py", "focal.py"} <= focal
    assert "fused/iou.py" not in focal
    assert fused.kernel_source(LOSSES.get("L2Loss")) is None
    assert fused.kernel_source(LOSSES.get("SmoothL1Loss")) == fused.kernel_source(LOSSES.get("L1Loss"))


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_file_is_covered(name):
    files = provenance.sources(LOSSES, name, fused.kernel_source(LOSSES.get(name)))
    assert Path(LOSSES.get(name).__module__.replace(".", "/")).name + ".py" in {f.name for f in files}
    assert all(f.is_file() and f.is_relative_to(ENGINE) for f in files)


def test_a_changed_helper_changes_the_digest_of_its_users_only(monkeypatch):
    def digests() -> dict[str, str]:
        provenance._digest.cache_clear()
        return {
            name: provenance.implementation_digest(
                LOSSES, name, fused_file=fused.kernel_source(LOSSES.get(name)), device_type="cpu"
            )
            for name in ("GIoULoss", "FocalLoss", "QualityFocalLoss")
        }

    before = digests()
    read = Path.read_bytes
    for helper, changed in (("boxes.py", {"GIoULoss"}), ("logits.py", {"FocalLoss", "QualityFocalLoss"})):
        target = ENGINE / helper
        monkeypatch.setattr(Path, "read_bytes", lambda self, t=target: read(self) + (b"#" if self == t else b""))
        after = digests()
        monkeypatch.setattr(Path, "read_bytes", read)
        assert {name for name in before if before[name] != after[name]} == changed, helper
    provenance._digest.cache_clear()


def test_fused_on_and_off_differ_only_where_a_kernel_exists():
    def digest(name: str, on: bool) -> str:
        source = fused.kernel_source(LOSSES.get(name)) if on else None
        return provenance.implementation_digest(LOSSES, name, fused_file=source, device_type="cpu")

    assert digest("FocalLoss", True) != digest("FocalLoss", False)
    assert digest("L2Loss", True) == digest("L2Loss", False)
    # one path, as callers passed before kernel_source returned several, is accepted too
    one = provenance.implementation_digest(
        LOSSES, "FocalLoss", fused_file=fused.kernel_source(LOSSES.get("FocalLoss"))[0], device_type="cpu"
    )
    assert one == digest("FocalLoss", True)  # the mechanism comes in through the kernel's imports
