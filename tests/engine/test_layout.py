"""The engine's layout: loss families import only infrastructure, never each other; the fused kernels
import their own family and the shared mechanism; the pairwise losses share one forward.

Every ``import`` and ``from ... import`` of every file under server/losses is read from the source
(those inside functions too), relative imports resolved against the file's package.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

import losswire.server.losses as engine
from losswire.server.losses import LOSSES, PairwiseLoss, fused

ENGINE = Path(engine.__file__).parent
PACKAGE = engine.__name__

# The modules every family may use: the pipeline and its parts, and helpers that belong to no family.
INFRASTRUCTURE = {
    "boxes",  # box geometry and box inputs
    "catalogue",  # the README catalogue, from the descriptions
    "checks",  # input checks
    "classifier",  # the classifier hooks of the custom-classifier losses
    "cost",  # the memory / work estimates
    "errors",
    "logits",  # binary cross-entropy of logits in closed form
    "pipeline",  # weight -> reduction / avg_factor -> loss_weight, the shared forward
    "provenance",  # implementation digests
    "registry",
    "schema",  # descriptions, config validation, statefulness
}
# each fused kernel module, and the family it accelerates
FUSED_KERNEL_FAMILY = {
    "cross_entropy": "cross_entropy",
    "focal": "focal",
    "focal_triton": "focal",  # focal's closed form by hand (Triton): loaded on a GPU only, by compiled.py
    "gfocal": "gfocal",
    "gfocal_triton": "gfocal",  # QualityFocalLoss's closed form by hand, as focal_triton
    "iou": "iou",
    "regression": "smooth_l1",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def engine_imports(path: Path, module: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, engine module below the package) of every import in ``path`` (module ``module``, by
    default the one at ``path``) that names one."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith(PACKAGE + "."):
                relative = name[len(PACKAGE) + 1 :]
                if (ENGINE / f"{relative.replace('.', '/')}.py").exists() or (
                    ENGINE / relative.replace(".", "/")
                ).is_dir():
                    yield node.lineno, relative


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if p.name != "__init__.py")


FAMILIES = [p for p in _files(ENGINE) if p.stem not in INFRASTRUCTURE]
# the mechanism beside fused/__init__.py: the list of kernel modules, and the compiler of closed forms
FUSED_MECHANISM = {"kernels", "compiled", "by_hand"}  # by_hand: the hand-written kernels' Triton helpers
FUSED_KERNELS = [p for p in _files(ENGINE / "fused") if p.stem not in FUSED_MECHANISM]


def test_every_engine_file_is_a_family_infrastructure_or_a_fused_kernel():
    """A new module must be placed: the lists here are the layout's statement."""
    assert {p.stem for p in _files(ENGINE)} >= INFRASTRUCTURE
    registered = {LOSSES.get(name).__module__.rpartition(".")[2] for name in LOSSES.names()}
    assert {p.stem for p in FAMILIES} == registered, "a family file registers losses; an infrastructure one none"
    assert {p.stem for p in FUSED_KERNELS} == set(FUSED_KERNEL_FAMILY)


@pytest.mark.parametrize("path", FAMILIES, ids=lambda p: p.stem)
def test_a_family_imports_only_infrastructure(path):
    others = [
        f"line {line}: {name}" for line, name in engine_imports(path) if name.partition(".")[0] not in INFRASTRUCTURE
    ]
    assert not others, f"{path.name} imports another family or the fused kernels: {others}"


@pytest.mark.parametrize("stem", sorted(INFRASTRUCTURE))
def test_infrastructure_imports_no_family(stem):
    path = ENGINE / f"{stem}.py"
    families = [name for _, name in engine_imports(path) if name.partition(".")[0] not in INFRASTRUCTURE]
    assert not families, f"{path.name} (infrastructure) imports {families}"


@pytest.mark.parametrize("path", FUSED_KERNELS, ids=lambda p: p.stem)
def test_a_fused_kernel_imports_its_family_and_the_mechanism(path):
    family = FUSED_KERNEL_FAMILY[path.stem]
    allowed = INFRASTRUCTURE | {family, "fused"}
    # a hand-written kernel (Triton) may import the helpers the hand-written kernels share
    shared = {"fused.by_hand"} if path.stem.endswith("_triton") else set()
    stray = [
        name
        for _, name in engine_imports(path)
        if name.partition(".")[0] not in allowed or (name.startswith("fused.") and name not in shared)
    ]
    assert not stray, f"fused/{path.name} imports {stray}; it may import {family}, infrastructure and the mechanism"


@pytest.mark.parametrize("name", ["__init__", "compiled", "by_hand"])
def test_the_fused_mechanism_imports_no_family(name):
    imported = [name for _, name in engine_imports(ENGINE / "fused" / f"{name}.py")]
    assert all(name.partition(".")[0] in INFRASTRUCTURE | {"fused"} for name in imported), imported


def test_the_walker_sees_a_cross_family_import(tmp_path):
    """Relative and absolute imports of a family resolve to it: a family importing another is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from .focal import FocalLoss\nfrom . import checks\ndef f():\n    import losswire.server.losses.iou\n"
    )
    assert [name for _, name in engine_imports(probe, f"{PACKAGE}.probe")] == ["focal", "checks", "iou"]


# -- the shared forward -------------------------------------------------------------------------------

PAIRWISE = [
    "L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss", "IoULoss", "BoundedIoULoss", "GIoULoss", "DIoULoss",
    "CIoULoss", "EIoULoss", "SIoULoss", "FocalLoss", "FocalCustomLoss", "VarifocalLoss", "QualityFocalLoss",
    "DistributionFocalLoss", "KnowledgeDistillationKLDivLoss", "MultiPosCrossEntropyLoss", "DiceLoss",
]  # fmt: skip


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_losses_share_one_forward(name):
    """Their forward is PairwiseLoss's, or only mmdet's signature (other names or order) handing its
    arguments to ``evaluate``: the reduction, the checks, the shortcut and the pipeline are written once."""
    cls = LOSSES.get(name)
    assert issubclass(cls, PairwiseLoss) and cls.evaluate is PairwiseLoss.evaluate
    assert cls.kernel is not PairwiseLoss.kernel
    if cls.forward is not PairwiseLoss.forward:
        body = inspect.getsource(cls.forward).split(") -> Tensor:", 1)[1].strip()
        assert body.startswith("return self.evaluate(") and body.count("\n") == 0, body


def test_fused_kernels_share_their_family_forward():
    """The kernels call the family's functions for the loss (no forward of their own)."""
    from losswire.server.losses import cross_entropy, focal, gfocal, iou, smooth_l1
    from losswire.server.losses.fused import cross_entropy as fused_ce
    from losswire.server.losses.fused import focal as fused_focal
    from losswire.server.losses.fused import gfocal as fused_gfocal
    from losswire.server.losses.fused import iou as fused_iou
    from losswire.server.losses.fused import regression as fused_regression

    assert fused_iou.giou_parts is iou.giou_parts
    assert fused_focal.focal_factor is focal.focal_factor
    assert fused_gfocal.quality_factor is gfocal.quality_factor
    assert fused_ce.softmax_cross_entropy_parts is cross_entropy.softmax_cross_entropy_parts
    assert fused_regression.smooth_l1_loss is smooth_l1.smooth_l1_loss
    assert fused_regression.l1_loss is smooth_l1.l1_loss


@pytest.mark.parametrize("path", [*FUSED_KERNELS, ENGINE / "fused" / "__init__.py"], ids=lambda p: p.stem)
def test_fused_kernels_call_no_private_member(path):
    """No ``something._name`` on another object (a module's private method, say): only public API."""
    private = [
        f"line {node.lineno}: .{node.attr}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
    ]
    assert not private, private


def test_the_table_is_built_from_registrations():
    assert {cls.__name__ for cls in fused.FUSED_KERNELS} == {
        "FocalLoss", "QualityFocalLoss", "CrossEntropyLoss", "SmoothL1Loss", "L1Loss", "GIoULoss",
    }  # fmt: skip
    kernel = fused.FUSED_KERNELS[LOSSES.get("FocalLoss")]
    assert fused.register(LOSSES.get("FocalLoss"), kernel) is kernel  # registering again is harmless
    with pytest.raises(ValueError, match="already has the fused kernel"):
        fused.register(LOSSES.get("FocalLoss"), fused.FusedKernel("Other", kernel.supports, kernel.run))
