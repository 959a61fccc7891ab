"""CrossEntropyLoss's fused kernel: softmax cross-entropy of class indices and its gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..cross_entropy import CrossEntropyLoss, invalid_labels, non_ignored_count, softmax_cross_entropy_parts
from ..pipeline import float32_rounded
from . import FLOATS, Fused, FusedKernel, broadcasts, finite, plain_reducer, register


def supports(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """Softmax CrossEntropyLoss on [N, C] logits with [N] integer labels (each in [0, C) or the
    ignore_index), ``class_weight`` of length C, weight broadcastable to [N]."""
    if module.use_sigmoid or module.use_mask:
        return False
    pred, label, weight = kwargs.get("cls_score"), kwargs.get("label"), kwargs.get("weight")
    if not isinstance(pred, Tensor) or not isinstance(label, Tensor) or pred.dim() != 2 or pred.dtype not in FLOATS:
        return False
    num, num_classes = pred.shape
    if num_classes == 0 or label.shape != (num,):
        return False
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        return False
    if module.class_weight is not None and len(module.class_weight) != num_classes:
        return False
    if weight is not None and (not isinstance(weight, Tensor) or not weight.is_floating_point()):
        return False
    if not broadcasts(weight, (num,)):
        return False
    ignore_index = module.resolve_ignore_index(kwargs.get("ignore_index"))
    if bool(invalid_labels(label.long(), num_classes, ignore_index).any()):
        return False
    return plain_reducer(module, kwargs) is not None and finite(pred, weight)


def run(module: CrossEntropyLoss, kwargs: Mapping[str, Any]) -> Fused:
    r"""Softmax cross-entropy and its gradient with respect to the logits ``x`` [N, C].

    ``L_n = -w_{y_n} log softmax(x_n)_{y_n}`` (``w`` the class weight, 1 without one), 0 where
    ``y_n`` is the ignore_index.

    Derivative: ``d(-log softmax(x)_y)/dx_j = softmax(x)_j - [j = y]``, so row n of the gradient is
    ``s_n (softmax(x_n) - onehot(y_n))`` with ``s_n = w_{y_n} * weight_n * loss_weight * reduction
    scale * upstream_n``, and 0 for ignored rows.

    The loss is the family's (``softmax_cross_entropy_parts``); its ``log_softmax`` buffer becomes the
    gradient in place, ``exp(log_softmax(x)) * s`` (what log_softmax's backward computes), then
    ``-s`` is added at the label column (``scatter_add``; no one-hot tensor). On the CPU this is
    about autograd's speed: log_softmax's forward and backward are already fused aten kernels.

    The reduction is the module's (``avg_non_ignore``: ``effective_avg_factor``); the label weight is
    rounded through float32 as mmdet does. Output: the module's ([N] for 'none', else 0-d).
    """
    pred, weight = kwargs["cls_score"], kwargs.get("weight")
    x = pred.detach()
    labels = kwargs["label"].long()
    ignore_index = module.resolve_ignore_index(kwargs.get("ignore_index"))
    class_weight = None if module.class_weight is None else x.new_tensor(module.class_weight)
    parts = softmax_cross_entropy_parts(x, labels, class_weight, ignore_index)
    if weight is not None:
        weight = float32_rounded(weight, parts.loss.dtype)

    mode = module.resolve_reduction(kwargs.get("reduction_override"))
    avg_factor = module.effective_avg_factor(mode, kwargs.get("avg_factor"), non_ignored_count(labels, ignore_index))
    reducer = plain_reducer(module, kwargs, avg_factor)
    value = module.finish(parts.loss, weight, reducer.mode, reducer.avg_factor)

    def gradient(upstream: Tensor | None, out: Tensor | None = None) -> Tensor:
        # the module's backward order: masked_fill, then the class weight
        scale = reducer.gradient_scale(module.loss_weight, weight, upstream, parts.loss).expand(parts.loss.shape)
        scale = scale.masked_fill(~parts.valid, 0)
        if parts.class_weight is not None:
            scale = scale * parts.class_weight
        scale = scale.unsqueeze(1)  # [N, 1]
        grad = parts.log_prob.exp_().mul_(scale)  # s * softmax, in log_prob's buffer
        return grad.scatter_add_(1, parts.safe.unsqueeze(1), -scale)  # - s at the label

    return Fused(value, gradient)


register(CrossEntropyLoss, FusedKernel("CrossEntropyLoss", supports, run))
