"""losswire's loss engine: MMDetection's losses and loss pipeline in plain PyTorch.

    from losswire.server.losses import build_loss
    loss = build_loss(dict(type='FocalLoss', gamma=2.0, alpha=0.25))(pred, target)

Nothing here knows about gRPC. ``LOSSES`` is the registry, ``build_loss`` builds a module from an
mmdet config dict, ``LOSSES.describe(name)`` gives a loss's machine-readable description and
``LOSSES.estimate(config, shapes)`` what a config and its input shapes would cost, before building
anything. ``shareable(module)`` says whether one built module may serve concurrent calls.

Layout: one loss family a file (``focal``, ``iou``, ...), each importing only the infrastructure
(``pipeline``: weight -> reduction/avg_factor -> loss_weight and the shared forward; ``checks``;
``schema``; ``registry``; ``cost``; ``boxes``; ``classifier``; ``logits``; ``errors``), never another
family; ``fused/`` holds the fused loss-and-gradient kernels, one module per family it accelerates.
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
    mse,
    multipos_cross_entropy,
    seesaw,
    smooth_l1,
    triplet,
    varifocal,
)
from .cost import Estimate
from .errors import DuplicateLossError, LossConfigError, LossError, LossInputError, UnknownLossError
from .fused import kernels  # noqa: F401 - registers every fused kernel
from .pipeline import AVG_FACTOR_EPS, REDUCTIONS, PairwiseLoss, Reducer, WeightedLoss, reduce_loss, weight_reduce_loss
from .registry import LOSSES, Registry, build_loss
from .schema import Bounds, InputSpec, LossDescription, OutputKind, ParamSpec, keeps_state, output_kind_of, shareable

__all__ = [
    "AVG_FACTOR_EPS",
    "LOSSES",
    "REDUCTIONS",
    "Bounds",
    "DuplicateLossError",
    "Estimate",
    "InputSpec",
    "LossConfigError",
    "LossDescription",
    "LossError",
    "LossInputError",
    "OutputKind",
    "PairwiseLoss",
    "ParamSpec",
    "Reducer",
    "Registry",
    "UnknownLossError",
    "WeightedLoss",
    "build_loss",
    "keeps_state",
    "output_kind_of",
    "reduce_loss",
    "shareable",
    "weight_reduce_loss",
]
