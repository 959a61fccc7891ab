"""One loss term, decoded (``TermRequest``), and what evaluating it gives (``TermOutcome``).

Plain data on the compute device: the dataplane decodes requests into these and encodes outcomes
back; the evaluator knows nothing of either side's wire.

A loss may return one tensor, a tuple (AssociativeEmbeddingLoss) or a dict (SeesawLoss): each
tensor is one *part* with its own gradients, so a caller can apply a different upstream gradient
to each part without a second round trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..losses import OutputKind
from .sampling import Sample

PRED, TARGET = "pred", "target"


@dataclasses.dataclass
class TermRequest:
    """One loss term, decoded: tensors already on the compute device."""

    name: str
    config: Mapping[str, Any]
    pred: Tensor
    target: Any = None
    weight: Tensor | None = None
    avg_factor: float | None = None
    reduction_override: str | None = None
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    gradients: Sequence[str] = (PRED,)
    grad_output: Tensor | None = None
    grad_outputs: Mapping[str, Tensor] = dataclasses.field(default_factory=dict)  # per part, for recomputes
    session: str = ""
    replay_step: int | None = None
    forward_id: str = ""
    seed: int | None = None
    sample_labels: Tensor | None = None
    sample_groups: Tensor | None = None
    # where a fused kernel may write pred's gradient: (shape, dtype) -> a tensor of them on pred's
    # device, or None (the caller's shared memory, so the answer needs no copy); None: a fresh tensor
    gradient_out: Callable[[torch.Size, torch.dtype], Tensor | None] | None = None


@dataclasses.dataclass
class PartOutcome:
    key: str  # "" for a plain tensor output, "0", "1"... for a tuple, the dict key for a dict
    loss: Tensor
    gradients: dict[str, Tensor]
    output: OutputKind


@dataclasses.dataclass
class TermOutcome:
    name: str
    structure: str  # "tensor", "tuple" or "dict"
    parts: list[PartOutcome]
    # with an upstream gradient sent (a recompute): d(sum_k G_k * part_k)/d(input), over every part
    gradients: dict[str, Tensor]
    separable: bool
    sample_axis: int
    session_step: int = 0
    sampled: Sample | None = None
    fused: str = ""  # the fused kernel that computed this term (losses/fused.py); "" under autograd

    @property
    def loss(self) -> Tensor:
        """The loss of a single-tensor output."""
        (part,) = self.parts
        return part.loss
