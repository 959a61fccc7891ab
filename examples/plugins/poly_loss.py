"""An example losswire plugin: PolyLoss, served next to the built-in losses.

PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions, Leng et al. 2022,
https://arxiv.org/abs/2204.12511. Its Poly-1 form adds ``epsilon * (1 - p_t)`` to softmax
cross-entropy, where ``p_t`` is the probability of the true class.

Serve it (the module must be importable by the server, e.g. through PYTHONPATH)::

    PYTHONPATH=examples/plugins losswire serve --plugin poly_loss

and use it like any built-in loss::

    RemoteLoss(dict(type='PolyLoss', epsilon=2.0))(logits, labels)

How a plugin works: importing the module runs ``@LOSSES.register_module()``, which reads the typed
``__init__`` and ``forward`` signatures. ``ListLosses`` then lists the loss with its parameters,
``Describe`` validates configs against them, and ``RemoteLoss`` takes exactly this ``forward``'s
arguments. Subclassing ``WeightedLoss`` and ending with ``self.finish`` gives the loss mmdet's
weight / reduction / ``avg_factor`` / ``loss_weight`` rules. Only the server's own ``--plugin``
flags import code; a request can only name losses already registered.

Shapes: ``pred`` [N, C] logits; ``target`` [N] class indices in [0, C); ``weight`` [N].
Output per sample ([N]) for ``reduction='none'``.
"""

from __future__ import annotations

from torch import Tensor

from losswire.server.losses import LOSSES, LossInputError, WeightedLoss
from losswire.server.losses.checks import float_tensor, index_range, index_tensor, ndim
from losswire.server.losses.pipeline import AvgFactor, Reduction, ReductionOverride
from losswire.server.losses.schema import OutputKind


def poly1_cross_entropy(logits: Tensor, labels: Tensor, epsilon: float) -> Tensor:
    """Per-sample ``CE(logits, label) + epsilon * (1 - p_label)``."""
    log_prob = logits.log_softmax(dim=1)
    log_p_true = log_prob.gather(1, labels.unsqueeze(1)).squeeze(1)
    return -log_p_true + epsilon * (1 - log_p_true.exp())


@LOSSES.register_module()
class PolyLoss(WeightedLoss):
    """Poly-1 loss: softmax cross-entropy plus ``epsilon * (1 - p_t)`` (an example plugin).

    Args:
        epsilon: weight of the first polynomial term; 0 gives plain cross-entropy (default 1.0).
        reduction: "none", "mean" (default) or "sum".
        loss_weight: multiplier of the reduced loss (default 1.0).
    """

    output_kind = OutputKind.SAMPLE

    def __init__(self, epsilon: float = 1.0, reduction: Reduction = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.epsilon = epsilon

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: ReductionOverride = None,
    ) -> Tensor:
        reduction = self.resolve_reduction(reduction_override)
        float_tensor("pred", pred)
        ndim("pred", pred, 2, "[N, C] logits")
        labels = index_tensor("target", target)
        if labels.shape != pred.shape[:1]:
            raise LossInputError(
                f"target must have shape [N] = [{pred.shape[0]}], got {list(labels.shape)}", field="target"
            )
        index_range("target", labels, 0, pred.shape[1] - 1, f"class indices of {pred.shape[1]} classes")
        return self.finish(poly1_cross_entropy(pred, labels, self.epsilon), weight, reduction, avg_factor)
