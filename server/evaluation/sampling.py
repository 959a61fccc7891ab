"""The sampling step (MMDetection's step 1): choose which samples a loss sees, by zeroing weights.

A loss config may carry ``sampler=dict(type='RandomSampler', num=256, pos_fraction=0.5,
neg_pos_ub=-1)`` or ``sampler=dict(type='PseudoSampler')``. Given one label per sample (class
indices, ``background_label`` meaning background), the sampler keeps

* positives: ``0 <= label < background_label``, at most ``int(num * pos_fraction)`` of them;
* negatives: ``label == background_label``, at most ``num - kept positives`` (and at most
  ``neg_pos_ub * max(1, kept positives)`` when ``neg_pos_ub >= 0``);

and every other sample (not kept, or a label outside both sets such as -1) gets weight 0. With
``sample_groups`` (one image index per sample) each image is sampled on its own, with its own budget,
in increasing image order -- a head's per-image loop.
The draws are mmdet's: a ``randperm`` over the positive indices, then one over the negative
indices, from a CPU generator seeded with the request's seed -- the same indices mmdet's
``RandomSampler`` picks after ``torch.manual_seed(seed)``. ``PseudoSampler`` keeps every positive
and negative. See docs/semantics.md for how this differs from sampling inside a detection head.

Plain torch, no gRPC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..losses import LossConfigError, LossInputError
from ..losses.checks import index_tensor
from ..losses.schema import describe_params, validate_params
from .errors import check_cancelled

# sample_groups are the images of one batch, each sampled in a Python loop step of its own (~50-70 us each).
# A batch is 2 to 64 images per device in practice, a few thousand across a whole cluster's step at the
# very most (64 devices x 64 images); 4096 keeps the loop to ~0.3 s of one core, where one group per sample
# (N groups) would be an N-step loop bought by an O(N) request.
MAX_SAMPLE_GROUPS = 4096
CANCEL_CHECK_GROUPS = 256  # the loop asks whether the caller is gone every this many groups


@dataclasses.dataclass(frozen=True)
class Sample:
    """The kept positive and negative indices (sorted), and the [N] 0/1 keep mask."""

    positives: Tensor
    negatives: Tensor
    keep: Tensor

    @classmethod
    def of(cls, positives: Tensor, negatives: Tensor, labels: Tensor) -> Sample:
        keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        keep[positives] = True
        keep[negatives] = True
        return cls(positives, negatives, keep)


class PseudoSampler:
    """Keeps every positive and every negative (mmdet's PseudoSampler): only ignored labels drop."""

    random = False

    def __init__(self, background_label: int | None = None) -> None:
        self.background_label = background_label

    def choose(self, indices: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
        return indices

    def sample(self, labels: Tensor, background_label: int, generator: torch.Generator | None = None) -> Sample:
        positives = torch.nonzero((labels >= 0) & (labels < background_label)).flatten()
        negatives = torch.nonzero(labels == background_label).flatten()
        positives = self.choose(positives, self.positive_quota(), generator).unique()
        negatives = self.choose(negatives, self.negative_quota(positives.numel()), generator).unique()
        return Sample.of(positives, negatives, labels)

    def positive_quota(self) -> int:
        return -1

    def negative_quota(self, kept_positives: int) -> int:
        return -1


class RandomSampler(PseudoSampler):
    """Random sampling of positives and negatives with a fixed budget (mmdet's RandomSampler).

    Args:
        num: total number of samples to keep (positives first).
        pos_fraction: at most ``int(num * pos_fraction)`` positives.
        neg_pos_ub: at most ``neg_pos_ub * max(1, positives)`` negatives; -1 for no bound (default -1).
        add_gt_as_proposals: must be False: there are no boxes here to add (default False).
        background_label: the background label; None: the loss's class count (default None).
    """

    random = True

    def __init__(
        self,
        num: int,
        pos_fraction: float,
        neg_pos_ub: int = -1,
        add_gt_as_proposals: bool = False,
        background_label: int | None = None,
    ) -> None:
        super().__init__(background_label)
        if num < 0 or not 0.0 <= pos_fraction <= 1.0:
            raise LossConfigError(
                f"RandomSampler needs num >= 0 and 0 <= pos_fraction <= 1, got num={num}, pos_fraction={pos_fraction}",
                field="sampler",
            )
        if add_gt_as_proposals:
            raise LossConfigError(
                "RandomSampler.add_gt_as_proposals must be False: a loss term carries no ground-truth boxes to add "
                "as proposals (add them to pred/target before sending)",
                field="sampler.add_gt_as_proposals",
            )
        self.num, self.pos_fraction, self.neg_pos_ub = num, pos_fraction, neg_pos_ub
        self.add_gt_as_proposals = add_gt_as_proposals

    def choose(self, indices: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
        if indices.numel() <= count:
            return indices
        # mmdet draws the permutation on the CPU generator whatever the device: so do we.
        order = torch.randperm(indices.numel(), generator=generator)[:count].to(indices.device)
        return indices[order]

    def positive_quota(self) -> int:
        return int(self.num * self.pos_fraction)

    def negative_quota(self, kept_positives: int) -> int:
        quota = self.num - kept_positives
        if self.neg_pos_ub >= 0:
            quota = min(quota, int(self.neg_pos_ub * max(1, kept_positives)))
        return quota


def sample_by_group(
    sampler: PseudoSampler,
    labels: Tensor,
    groups: Tensor | None,
    background_label: int,
    generator: torch.Generator | None,
    cancelled: Callable[[], bool] | None = None,
) -> Sample:
    """Sample each group (image) on its own, in increasing group order, from one generator: what a
    head's per-image loop draws after one ``torch.manual_seed``. Without groups, one group. At most
    ``MAX_SAMPLE_GROUPS`` groups (a LossInputError naming ``sample_groups``); between groups, stops
    (CallCancelledError) once ``cancelled()`` says the caller is gone."""
    if groups is None:
        return sampler.sample(labels, background_label, generator)
    positives, negatives = [], []
    for index, rows in enumerate(group_rows(groups)):
        if index and index % CANCEL_CHECK_GROUPS == 0:
            check_cancelled(cancelled, f"sampling images {index} and on")
        sample = sampler.sample(labels[rows], background_label, generator)
        positives.append(rows[sample.positives])
        negatives.append(rows[sample.negatives])
    empty = labels.new_zeros(0)
    return Sample.of(
        torch.cat(positives).sort().values if positives else empty,
        torch.cat(negatives).sort().values if negatives else empty,
        labels,
    )


def group_rows(groups: Tensor) -> list[Tensor]:
    """The row indices of each group, each in increasing order, groups in increasing value order: one
    stable sort, O(N log N) (a scan of all N rows per group would be O(N x groups)). More than
    ``MAX_SAMPLE_GROUPS`` groups are refused."""
    ordered, order = torch.sort(groups, stable=True)
    counts = torch.unique_consecutive(ordered, return_counts=True)[1]
    if counts.numel() > MAX_SAMPLE_GROUPS:
        raise LossInputError(
            f"sample_groups holds {counts.numel()} distinct groups (images) over {groups.numel()} samples; a term "
            f"samples at most {MAX_SAMPLE_GROUPS} images (one batch): send one image index per sample, not one "
            "group per sample",
            field="sample_groups",
        )
    return list(order.split(counts.tolist()))


SAMPLERS: dict[str, type[PseudoSampler]] = {"RandomSampler": RandomSampler, "PseudoSampler": PseudoSampler}


def build_sampler(config: Any) -> PseudoSampler:
    """``dict(type='RandomSampler', num=..., ...)`` -> a sampler; every error names ``sampler.<key>``."""
    if not isinstance(config, Mapping) or not isinstance(config.get("type"), str):
        raise LossConfigError(
            f"sampler must be a dict with a 'type' of {sorted(SAMPLERS)}, got {config!r}", field="sampler"
        )
    kind = config["type"]
    if kind not in SAMPLERS:
        raise LossConfigError(f"sampler.type must be one of {sorted(SAMPLERS)}, got {kind!r}", field="sampler.type")
    cls = SAMPLERS[kind]
    try:
        return cls(**validate_params(kind, describe_params(cls), {k: v for k, v in config.items() if k != "type"}))
    except LossConfigError as error:
        if error.field and not error.field.startswith("sampler"):
            error.field = f"sampler.{error.field}"
        raise
    except TypeError as error:  # a required parameter is missing
        raise LossConfigError(f"sampler {kind}: {error}", field="sampler") from None


def sampler_config(sampler: PseudoSampler) -> dict[str, Any]:
    names = [p.name for p in describe_params(type(sampler))]
    return {"type": type(sampler).__name__, **{n: getattr(sampler, n) for n in names}}


def default_labels(target: Any) -> Tensor | None:
    """The class indices a sampler splits by default: an integer target, or target[0] of a tuple."""
    if isinstance(target, (tuple, list)) and target:
        target = target[0]
    if isinstance(target, Tensor) and not target.is_floating_point():
        return target
    return None


def apply_sample(
    sampler: PseudoSampler,
    labels: Any,
    pred: Tensor,
    weight: Tensor | None,
    seed: int | None,
    background_label: int,
    groups: Tensor | None = None,
    elementwise: bool = False,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[Tensor, Sample]:
    """Sample (per group of ``groups``, e.g. per image), and return the weight with every unkept
    sample zeroed (a new tensor) and the sample. Without a weight the new one has one entry per
    sample, or pred's shape when the loss is ``elementwise`` ([N, 4] boxes...). ``cancelled``: see
    ``sample_by_group``."""
    if labels is None:
        raise LossInputError(
            "the config has a sampler but the term has no class-index labels to sample by: send sample_labels "
            "(int, shape [N]) or an integer target",
            field="sample_labels",
        )
    labels = index_tensor("sample_labels", labels)
    if labels.dim() != 1 or pred.dim() == 0 or labels.shape[0] != pred.shape[0]:
        raise LossInputError(
            f"sample_labels must have shape [N] with N = pred's first dimension {list(pred.shape)[:1]}, got "
            f"{list(labels.shape)}",
            field="sample_labels",
        )
    if sampler.random and seed is None:
        raise LossInputError(
            "RandomSampler needs a seed in the request, so that the samples are reproducible", field="seed"
        )
    if groups is not None:
        groups = index_tensor("sample_groups", groups)
        if groups.shape != labels.shape:
            raise LossInputError(
                f"sample_groups must hold one group (image) index per sample, shape {list(labels.shape)}, "
                f"got {list(groups.shape)}",
                field="sample_groups",
            )
    generator = None
    if sampler.random:
        generator = torch.Generator().manual_seed(int(seed))
    sample = sample_by_group(sampler, labels, groups, background_label, generator, cancelled)
    keep = sample.keep.to(pred.dtype)
    if weight is None:
        return (_per_row(keep, pred).expand_as(pred).contiguous() if elementwise else keep), sample
    if weight.dim() == 0 or weight.shape[0] != labels.shape[0]:
        raise LossInputError(
            f"weight must have N = {labels.shape[0]} rows to be sampled, got {list(weight.shape)}", field="weight"
        )
    return weight * _per_row(keep, weight).to(weight.dtype), sample


def _per_row(mask: Tensor, like: Tensor) -> Tensor:
    """An [N] mask as [N, 1, ...] with ``like``'s rank, to broadcast over each row."""
    return mask.view(-1, *([1] * (like.dim() - 1)))
