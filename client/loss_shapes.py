"""The shape a term's loss must have, from what the client knows before the call.

Before a call the client knows the term it sends (config, ``reduction_override``, pred's shape, whether a
weight or a sampler goes with it) and, for a loss it has a description of (``Describe``: every RemoteLoss
fetches one before its first forward; ``ListLosses``), the server's word on the loss: whether it takes
mmdet's ``reduction`` (a parameter of choices none / mean / sum) and its default, its output kind under
'none' ("element", "sample" or "scalar", per config in ``output_variants``) and the axis a "sample" loss
reduces (``sample_axis``). From them, for each loss tensor of the answer (the loss, or each part of a
tuple or dict):

* output "scalar" (TripletLoss, EQLV2Loss, AssociativeEmbeddingLoss's parts; CrossEntropyLoss with
  ``use_mask=True``, whose mmdet loss is of shape [1]), whatever the reduction: shape [] or [1];
* reduction 'mean' or 'sum' (the override, else the config's, else the described default): shape [];
  under 'mean' with a tensor ``avg_factor``, also that tensor's shape (mmdet's ``loss.sum() /
  (avg_factor + eps)`` broadcasts: a head's ``avg_factor`` of shape [1] gives a loss of shape [1]);
* reduction 'none', output "element": pred's shape;
* reduction 'none', output "sample": pred's shape without its axis ``sample_axis`` ([N, 5] logits give
  [N]; [N, C, H, W] give [N, H, W]), or a leading part of that of one axis or more (DiceLoss's
  [N, H, W] masks give [N]). A part of a tuple or dict may have fewer rows, or be 0-d (SeesawLoss's
  classes part holds the foreground rows only);
* under 'none', also a 0-d loss where the term sends a weight or a sampler (mmdet's L1 and box losses
  answer ``(pred * weight).sum()`` when no weight is positive, whatever the reduction), or pred is empty.

Nothing is derived where the client cannot be sure: a loss it has no description of (a raw
``LossClient.evaluate`` of a loss it never described), one that does not take mmdet's reduction (a
plugin's ``reduction: str``, which it may ignore) and is not "scalar", an output variant it cannot
decide from the config, a "sample" axis pred does not have, or a reduction that is none of the three
(the server refuses it). There only the bounds of ``answers`` hold.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from google.protobuf import struct_pb2

from losswire.v1 import loss_service_pb2 as pb

REDUCTIONS = ("none", "mean", "sum")
SCALAR_SHAPES = ([], [1])  # a "scalar" loss: 0-d, or mmdet's [1] of CrossEntropyLoss(use_mask=True)


@dataclasses.dataclass(frozen=True)
class Described:
    """What a loss's description says of its output's shape, read once from its ``LossInfo``."""

    name: str
    output: str  # "element", "sample" or "scalar" under 'none'
    sample_axis: int
    reduction: str | None  # the default of its mmdet reduction; None: it takes none (or not mmdet's)
    # (key, value as text, kind) of each output variant, the key's default; None: a condition not "key=value"
    variants: tuple[tuple[str, str, str, object], ...] | None

    @classmethod
    def of(cls, info: pb.LossInfo) -> Described:
        params = {p.name: p for p in info.params}
        reduction = params.get("reduction")
        takes = reduction is not None and sorted(_plain(c) for c in reduction.choices) == sorted(REDUCTIONS)
        variants: list[tuple[str, str, str, object]] | None = []
        for condition, kind in sorted(info.output_variants.items()):
            key, equals, wanted = (text.strip() for text in condition.partition("="))
            if not equals:
                variants = None
                break
            variants.append((key, wanted, kind, _plain(params[key].default) if key in params else None))
        return cls(
            name=info.name,
            output=info.output,
            sample_axis=info.sample_axis,
            reduction=_plain(reduction.default) if takes else None,
            variants=None if variants is None else tuple(variants),
        )


class Descriptions:
    """The descriptions of losses a client has seen, by loss name: what its answers are checked against."""

    def __init__(self) -> None:
        self._described: dict[str, Described] = {}
        self._lock = threading.Lock()

    def note(self, info: pb.LossInfo, *, replace: bool = True) -> None:
        """Keep ``info`` (a server's latest word on its loss replaces an earlier one; a module's own
        description, ``replace=False``, only fills a gap: it may be older, or from a pickle)."""
        if not info.name or (not replace and info.name in self._described):
            return
        described = Described.of(info)
        with self._lock:
            if replace or info.name not in self._described:
                self._described[info.name] = described

    def get(self, name: str) -> Described | None:
        return self._described.get(name)


@dataclasses.dataclass(frozen=True)
class LossShape:
    """What each loss tensor of one term's answer may be shaped as (see the module docstring)."""

    loss: str  # the loss's name, for messages
    kind: str  # "element", "sample" or "scalar"
    reduction: str  # "none", "mean", "sum", or "" for a loss that takes no reduction ("scalar" only)
    pred: tuple[int, ...]
    sample_axis: int  # of pred, normalised (>= 0); for "sample"
    zero_d: bool  # under 'none', a 0-d loss is possible (a weight or a sampler, or an empty pred)
    avg_factor: tuple[int, ...] = ()  # a tensor avg_factor's shape: under 'mean', the loss's broadcasts to it

    @property
    def rows(self) -> list[int]:
        """A "sample" loss's shape: pred's without its sample axis."""
        return [size for axis, size in enumerate(self.pred) if axis != self.sample_axis]

    def problem(self, shape: Sequence[int], several: bool) -> str | None:
        """What a loss of ``shape`` should have had instead, or None when it may have it; ``several``: it is
        one part of a tuple or dict."""
        shape = list(shape)
        if self.kind == "scalar":
            if shape in SCALAR_SHAPES:
                return None
            return f"shape [] or [1] ({self.loss}'s output is 'scalar')"
        if self.reduction != "none":
            if shape == [] or (self.reduction == "mean" and shape == list(self.avg_factor)):
                return None
            over = f" or avg_factor's {list(self.avg_factor)}" if self.reduction == "mean" and self.avg_factor else ""
            return f"shape []{over} (reduction {self.reduction!r})"
        if shape == [] and (self.zero_d or several):
            return None
        zero = " or []" if self.zero_d or several else ""
        if self.kind == "element":
            if shape == list(self.pred):
                return None
            return f"pred's shape {list(self.pred)}{zero} (reduction 'none', output 'element')"
        rows = self.rows
        if shape == rows or (
            1 <= len(shape) <= len(rows)
            and shape[1:] == rows[1 : len(shape)]
            and (shape[0] == rows[0] or (several and shape[0] <= rows[0]))
        ):
            return None
        part = " or a leading part of it" if len(rows) > 1 else ""
        fewer = ", or fewer rows" if several and rows else ""
        return (
            f"shape {rows}{part}{fewer}{zero} (pred's shape {list(self.pred)} without its axis {self.sample_axis}; "
            "reduction 'none', output 'sample')"
        )


def expected_shape(term: pb.LossTerm, descriptions: Descriptions | None) -> LossShape | None:
    """The shape rule of ``term``'s losses, from the description of its loss, if any; None where it is not
    certain."""
    name = _text(term.config, "type")
    described = descriptions.get(name) if descriptions is not None and name else None
    if described is None:
        return None
    kind = _output_kind(term.config, described)
    reduction = _reduction(term, described)
    if kind is None or (reduction is None and kind != "scalar"):
        return None
    pred = tuple(term.pred.shape)
    axis = described.sample_axis + len(pred) if described.sample_axis < 0 else described.sample_axis
    if kind == "sample" and not 0 <= axis < len(pred):
        return None  # a "sample" axis pred does not have: the loss refuses it, or answers in a way not described
    sends_weight = term.HasField("weight") or "weight" in term.inputs or "sampler" in term.config.fields
    avg_factor = term.inputs.get("avg_factor")  # a tensor one (a number travels in its own field)
    return LossShape(
        loss=described.name,
        kind=kind,
        reduction=reduction or "",
        pred=pred,
        sample_axis=axis,
        zero_d=sends_weight or 0 in pred,
        avg_factor=tuple(avg_factor.tensor.shape) if avg_factor is not None and avg_factor.HasField("tensor") else (),
    )


def _reduction(term: pb.LossTerm, described: Described) -> str | None:
    """The reduction the term's loss applies (mmdet: ``reduction_override if reduction_override else
    self.reduction``), or None where the loss takes none of mmdet's or it is not known."""
    if described.reduction is None:
        return None
    override = term.reduction_override if term.HasField("reduction_override") else None
    sent = term.inputs.get("reduction_override")
    if sent is not None:  # a raw caller's override as an input (the server takes one of the two)
        if override is not None or sent.WhichOneof("kind") != "text":
            return None
        override = sent.text
    fields = term.config.fields
    reduction = override or (_plain(fields["reduction"]) if "reduction" in fields else described.reduction)
    return reduction if reduction in REDUCTIONS else None


def _output_kind(config: struct_pb2.Struct, described: Described) -> str | None:
    """The output kind of this config: the description's, or that of the one variant the config matches
    (``{"use_sigmoid=True": "element"}``); None where a variant cannot be decided from bools and strings."""
    if described.variants is None:
        return None
    matched = []
    for key, wanted, kind, default in described.variants:
        value = _plain(config.fields[key]) if key in config.fields else default
        if not isinstance(value, (bool, str)):
            return None
        if str(value) == wanted:
            matched.append(kind)
    if len(matched) > 1:
        return None
    kind = matched[0] if matched else described.output
    return kind if kind in ("element", "sample", "scalar") else None


def _plain(value: struct_pb2.Value) -> object:
    """A ``google.protobuf.Value`` of a bool, string or number as that Python value; None otherwise."""
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return value.bool_value
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    return None


def _text(config: struct_pb2.Struct, key: str) -> str | None:
    value = config.fields.get(key)
    return value.string_value if value is not None and value.WhichOneof("kind") == "string_value" else None
