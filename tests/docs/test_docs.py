"""The README's catalogue is generated from the losses' descriptions and must stay in sync, and the
catalogue, the registry and ListLosses cover every loss MMDetection 3.3 computes from tensors."""

from support.paths import ROOT

from losswire.client import LossClient
from losswire.server.cli import KNOBS
from losswire.server.losses import LOSSES
from losswire.server.losses.catalogue import END, START, render_markdown

README = ROOT / "README.md"

# The 30 loss modules of mmdet.models.losses that take tensors (Accuracy is a metric and DDQAuxLoss
# works at head level: neither is a loss module). See ../shared/reference/mmdet-as-reference.md.
MMDET_33_LOSSES = {
    "AssociativeEmbeddingLoss", "BalancedL1Loss", "BoundedIoULoss", "CIoULoss", "CrossEntropyCustomLoss",
    "CrossEntropyLoss", "DIoULoss", "DiceLoss", "DistributionFocalLoss", "EIoULoss", "EQLV2Loss",
    "FocalCustomLoss", "FocalLoss", "GHMC", "GHMR", "GIoULoss", "GaussianFocalLoss", "IoULoss",
    "KnowledgeDistillationKLDivLoss", "L1Loss", "L2Loss", "MSELoss", "MarginL2Loss", "MultiPosCrossEntropyLoss",
    "QualityFocalLoss", "SIoULoss", "SeesawLoss", "SmoothL1Loss", "TripletLoss", "VarifocalLoss",
}  # fmt: skip


def test_readme_catalogue_is_current():
    text = README.read_text()
    section = text[text.index(START) : text.index(END) + len(END)]
    assert section == render_markdown(), "regenerate the README catalogue: losswire losses --markdown"
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


def test_readme_server_table_lists_every_setting():
    text = README.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    for knob in KNOBS:
        flag = "--plugin" if knob.name == "plugins" else knob.flag
        row = next((r for r in rows if f"`{flag}`" in r or f"`{flag} " in r), None)
        assert row is not None, f"README's server table has no row for {flag}"
        assert f"`{knob.env}`" in row, f"README's row for {flag} does not name {knob.env}: {row}"
