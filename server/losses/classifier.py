"""The classifier hooks MMDetection's bbox heads ask some losses for (V3Det's custom classifiers, Seesaw).

A head whose loss sets ``custom_cls_channels`` asks it for its classifier's width (``get_cls_channels``),
turns raw scores into class scores with ``get_activation`` and logs ``get_accuracy``. None of them
enters the loss value. Wang et al. 2023, V3Det: Vast Vocabulary Visual Detection Dataset,
https://arxiv.org/abs/2304.03752.
"""

from __future__ import annotations

from torch import Tensor

from . import checks
from .errors import LossConfigError, LossInputError


def check_num_classes(owner: str, num_classes: int) -> int:
    """mmdet's custom losses default ``num_classes`` to -1 and refuse to be built with it."""
    if num_classes == -1:
        raise LossConfigError(
            f"{owner}.num_classes must be set to the number of classes (the default -1 is a placeholder "
            "mmdet refuses), got -1",
            field="num_classes",
        )
    return num_classes


def top1_accuracy(scores: Tensor, target: Tensor) -> Tensor:
    """Percentage of rows whose highest score is at ``target`` (mmdet's ``accuracy``, top-1): a
    one-element float32 tensor, a 0-d zero for no rows."""
    if scores.shape[0] == 0:
        return scores.new_tensor(0.0)
    predicted = scores.topk(1, dim=1).indices[:, 0]
    hits = (predicted == target).float().sum(0, keepdim=True)
    return hits * (100.0 / scores.shape[0])


def class_accuracy(cls_score: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Top-1 accuracy in percent over the samples with a foreground label (``label < num_classes``).

    Scores beyond the first ``num_classes`` columns (a background column) are ignored. Without
    foreground samples the accuracy is a 0-d zero; otherwise a one-element tensor.
    """
    checks.tensor("cls_score", cls_score)
    labels = checks.index_tensor("labels", labels)
    checks.ndim("cls_score", cls_score, 2, "[N, C] scores")
    if labels.shape != cls_score.shape[:1]:
        raise LossInputError(
            f"labels must have shape [N] = [{cls_score.shape[0]}], got {list(labels.shape)}", field="labels"
        )
    foreground = labels < num_classes
    return top1_accuracy(cls_score[:, :num_classes][foreground], labels[foreground])


class CustomClassifierMixin:
    """The V3Det-style hooks of mmdet's ``*CustomLoss`` losses (see the module docstring)."""

    custom_cls_channels = True
    custom_activation = True
    custom_accuracy = True
    num_classes: int

    def _check_cls_channels_request(self, num_classes: int) -> None:
        if num_classes != self.num_classes:
            raise LossInputError(
                f"{type(self).__name__} was configured for num_classes={self.num_classes}, asked for {num_classes}",
                field="num_classes",
            )

    def get_accuracy(self, cls_score: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """``{'acc_classes': top-1 accuracy in percent over the foreground samples}``."""
        return {"acc_classes": class_accuracy(cls_score, labels, self.num_classes)}
