"""One loss term, decoded (``TermRequest``), and what evaluating it gives (``TermOutcome``).

Plain data on the compute device: the dataplane decodes requests into these and encodes outcomes
back; the evaluator knows nothing of either side's wire.

A loss may return one tensor, a tuple (AssociativeEmbeddingLoss) or a dict (SeesawLoss): each
tensor is one *part* with its own gradients, so a caller can apply a different upstream gradient
to each part without a second round trip.
"""

from __future__ import annotations

import array
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..losses import OutputKind
from .sampling import Sample

PRED, TARGET = "pred", "target"
_UNKEYED = object()  # TermRequest.config_key not computed yet
MANY_FLOATS = 64  # a list of this many floats or more is keyed by its bits, not number by number


def frozen(value: Any) -> Any:
    """A hashable copy of a decoded config (dicts, lists, plain values); TypeError for anything else."""
    if isinstance(value, Mapping):
        return ("dict", tuple(sorted(((str(k), frozen(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if isinstance(value, (list, tuple)):
        if len(value) >= MANY_FLOATS and all(type(v) is float for v in value):
            return ("floats", array.array("d", value).tobytes())  # a class_weight: bits, -0.0 and 0.0 apart
        return ("list", tuple(frozen(v) for v in value))
    if isinstance(value, float):
        return ("float", repr(value))  # -0.0 and 0.0 apart, NaN equal to itself
    if value is None or isinstance(value, (bool, int, str)):
        return (type(value).__name__, value)  # 1, 1.0 and True stay apart, as the module may see them
    raise TypeError(f"no hashable form for a {type(value).__name__}")


def split_sampler(config: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The loss config without its ``sampler`` entry, and that entry (None when absent)."""
    config = dict(config)
    return config, config.pop("sampler", None)


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
    # where a fused kernel may take its big scratch tensors (a reused buffer: fresh memory costs a page
    # fault per 4 KiB on first write); None: fresh tensors
    scratch: Callable[[torch.Size, torch.dtype], Tensor] | None = None
    _config_key: Any = dataclasses.field(default=_UNKEYED, init=False, repr=False, compare=False)

    @property
    def config_key(self) -> Any:
        """A hashable form of the config without its sampler (``frozen``), or None for a config that has
        none; computed once per term: the caches of checked configs, cost estimates and built modules all
        look the config up by it, call after call."""
        if self._config_key is _UNKEYED:
            try:
                self._config_key = frozen(split_sampler(self.config)[0])
            except TypeError:  # a value a decoded config does not hold (an in-process caller's tensor...)
                self._config_key = None
        return self._config_key


@dataclasses.dataclass
class PartOutcome:
    key: str  # "" for a plain tensor output, "0", "1"... for a tuple, the dict key for a dict
    loss: Tensor
    gradients: dict[str, Tensor]
    output: OutputKind
    constant: frozenset[str] = frozenset()  # gradients of inputs the part does not depend on (zeros)


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
    constant: frozenset[str] = frozenset()  # of ``gradients``, those of inputs no part depends on (zeros)

    @property
    def loss(self) -> Tensor:
        """The loss of a single-tensor output."""
        (part,) = self.parts
        return part.loss
