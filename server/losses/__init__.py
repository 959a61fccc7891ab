"""losswire's loss engine: MMDetection's losses and loss pipeline in plain PyTorch.

    from losswire.server.losses import build_loss
    loss = build_loss(dict(type='FocalLoss', gamma=2.0, alpha=0.25))(pred, target)

Nothing here knows about gRPC. ``LOSSES`` is the registry, ``build_loss`` builds a module from an
mmdet config dict, and ``LOSSES.describe(name)`` gives a loss's machine-readable description.
Each loss family lives in its own file; the shared weight/reduction steps live in ``pipeline``.
"""

from . import (  # noqa: F401 - importing a loss file registers its losses
    ae,
    balanced_l1,
    cross_entropy,
    dice,
    eqlv2,
    focal,
    gaussian_focal,
    gfocal,
    ghm,
    iou,
    kd,
    l2,
    margin,
    mse,
    multipos_cross_entropy,
    seesaw,
    smooth_l1,
    triplet,
    varifocal,
)
from .errors import DuplicateLossError, LossConfigError, LossError, LossInputError, UnknownLossError
from .pipeline import AVG_FACTOR_EPS, REDUCTIONS, WeightedLoss, reduce_loss, weight_reduce_loss
from .registry import LOSSES, Registry, build_loss
from .schema import InputSpec, LossDescription, OutputKind, ParamSpec, output_kind_of

__all__ = [
    "AVG_FACTOR_EPS",
    "LOSSES",
    "REDUCTIONS",
    "DuplicateLossError",
    "InputSpec",
    "LossConfigError",
    "LossDescription",
    "LossError",
    "LossInputError",
    "OutputKind",
    "ParamSpec",
    "Registry",
    "UnknownLossError",
    "WeightedLoss",
    "build_loss",
    "output_kind_of",
    "reduce_loss",
    "weight_reduce_loss",
]
