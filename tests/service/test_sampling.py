"""The sampling step: ``sampler`` in a loss config keeps the samples mmdet's samplers keep.

The index sets are compared with mmdet's own RandomSampler / PseudoSampler (fixtures from
``tests/reference/cases_samplers.py``); the service tests check that the loss then equals the loss
with every unkept sample's weight zeroed, reproducibly from the request's seed.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from support.paths import FIXTURES

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.server.evaluation import CallCancelledError, Evaluator, TermRequest, sampling
from losswire.server.evaluation.sampling import build_sampler, sample_by_group
from losswire.server.losses import LossConfigError, LossInputError, build_loss
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

RECORDS = torch.load(FIXTURES / "samplers.pt", weights_only=True)["cases"]


@pytest.mark.parametrize("record", RECORDS, ids=[r["id"] for r in RECORDS])
def test_samples_the_indices_mmdet_samples(record):
    sampler = build_sampler(record["sampler"])
    generator = torch.Generator().manual_seed(record["seed"])
    sample = sample_by_group(sampler, record["labels"], record["groups"], record["background"], generator)
    assert torch.equal(sample.positives.sort().values, record["positives"])
    assert torch.equal(sample.negatives.sort().values, record["negatives"])
    keep = torch.zeros(len(record["labels"]), dtype=torch.bool)
    keep[record["positives"]] = True
    keep[record["negatives"]] = True
    assert torch.equal(sample.keep, keep)


def _focal_batch(n: int = 200, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, classes, generator=g)
    labels = torch.full((n,), classes)  # background
    positive = torch.rand(n, generator=g) < 0.15
    labels[positive] = torch.randint(0, classes, (int(positive.sum()),), generator=g)
    labels[:3] = -1  # ignored: never sampled (and outside FocalLoss's label range: sample_labels carries them)
    return pred, labels


SAMPLER = {"type": "RandomSampler", "num": 64, "pos_fraction": 0.25, "neg_pos_ub": -1}


def test_the_loss_is_the_loss_with_unkept_samples_weighted_zero(target: str):
    pred, labels = _focal_batch()
    focal_labels = labels.clamp(min=0)
    cfg = {"type": "FocalLoss", "reduction": "sum"}
    remote = RemoteLoss({**cfg, "sampler": SAMPLER}, target, seed=11)
    leaf = pred.clone().requires_grad_()
    out = remote(leaf, focal_labels, sample_labels=labels)
    out.backward()
    sample = build_sampler(SAMPLER).sample(labels, 4, torch.Generator().manual_seed(11))
    assert sample.positives.numel() == 16 and sample.negatives.numel() == 48
    ref_leaf = pred.clone().requires_grad_()
    ref = build_loss(cfg)(ref_leaf, focal_labels, sample.keep.float())
    ref.backward()
    torch.testing.assert_close(out.detach(), ref.detach())
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)
    assert not leaf.grad[~sample.keep].any()


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(target: str):
    pred, labels = _focal_batch()
    labels = labels.clamp(min=0)
    cfg = {"type": "FocalLoss", "reduction": "sum", "sampler": SAMPLER}
    values = [RemoteLoss(cfg, target, seed=seed)(pred, labels).item() for seed in (5, 5, 6)]
    assert values[0] == values[1] != values[2]
    torch.manual_seed(3)  # no seed given: drawn from torch's global generator, so manual_seed reproduces
    first = RemoteLoss(cfg, target)(pred, labels).item()
    torch.manual_seed(3)
    assert RemoteLoss(cfg, target)(pred, labels).item() == first


def test_sampled_counts_come_back_and_box_losses_sample_by_sample_labels(client: LossClient):
    _, labels = _focal_batch(n=100)
    boxes = torch.rand(100, 4)
    request = pb.EvaluateRequest()
    term = request.terms.add(seed=1)
    codec.encode_config({"type": "SmoothL1Loss", "reduction": "sum", "sampler": SAMPLER}, term.config)
    codec.encode_tensor(boxes, term.pred)
    codec.encode_value(torch.zeros(100, 4), term.target)
    codec.encode_tensor(labels, term.sample_labels)
    result = client.evaluate(request).results[0]
    sample = build_sampler(SAMPLER).sample(labels, 4, torch.Generator().manual_seed(1))
    assert (result.sampled.positives, result.sampled.negatives) == (sample.positives.numel(), 64 - 16)
    expected = build_loss({"type": "SmoothL1Loss", "reduction": "sum"})(
        boxes, torch.zeros(100, 4), sample.keep.float()[:, None].expand(100, 4)
    )
    torch.testing.assert_close(codec.decode_tensor(result.loss, "loss"), expected)


def test_pseudo_sampler_keeps_positives_and_negatives_and_drops_ignored(target: str):
    pred, labels = _focal_batch()
    cfg = {"type": "FocalLoss", "reduction": "sum"}
    out = RemoteLoss({**cfg, "sampler": {"type": "PseudoSampler"}}, target)(
        pred, labels.clamp(min=0), sample_labels=labels
    )
    ref = build_loss(cfg)(pred, labels.clamp(min=0), (labels >= 0).float())
    torch.testing.assert_close(out, ref)


def _request(config: dict, seed: int | None = None, labels: bool = True) -> pb.EvaluateRequest:
    pred, target = _focal_batch(n=20)
    request = pb.EvaluateRequest()
    term = request.terms.add()
    if seed is not None:
        term.seed = seed
    codec.encode_config(config, term.config)
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(target.clamp(min=0) if labels else torch.rand(20, 4), term.target)
    return request


@pytest.mark.parametrize(
    "config, seed, labels, field, words",
    [
        ({"type": "FocalLoss", "sampler": SAMPLER}, None, True, "terms[0].seed", "needs a seed"),
        ({"type": "FocalLoss", "sampler": {"type": "OHEMSampler"}}, 1, True, "terms[0].config.sampler.type", "one of"),
        ({"type": "FocalLoss", "sampler": {**SAMPLER, "num": "many"}}, 1, True, "terms[0].config.sampler.num", "int"),
        (
            {"type": "FocalLoss", "sampler": {**SAMPLER, "add_gt_as_proposals": True}},
            1,
            True,
            "terms[0].config.sampler.add_gt_as_proposals",
            "no ground-truth boxes",
        ),
        ({"type": "FocalLoss", "sampler": SAMPLER}, 1, False, "terms[0].sample_labels", "sample_labels"),
        ({"type": "FocalLoss", "sampler": "RandomSampler"}, 1, True, "terms[0].config.sampler", "must be a dict"),
    ],
)
def test_sampler_mistakes_are_invalid_argument_naming_the_field(client, config, seed, labels, field, words):
    with pytest.raises(RemoteLossError) as caught:
        client.evaluate(_request(config, seed, labels))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field == field, caught.value.details
    assert words in caught.value.details


def test_describe_validates_and_normalises_the_sampler(client: LossClient):
    response = client.describe(
        {"type": "FocalLoss", "sampler": {"type": "RandomSampler", "num": 8.0, "pos_fraction": 0.5}}
    )
    sampler = codec.decode_config(response.config)["sampler"]
    assert sampler == {
        "type": "RandomSampler",
        "num": 8,
        "pos_fraction": 0.5,
        "neg_pos_ub": -1,
        "add_gt_as_proposals": False,
        "background_label": None,
    }
    with pytest.raises(LossConfigError):
        build_sampler({"type": "RandomSampler", "num": 8})  # pos_fraction is required


def test_softmax_cross_entropy_samples_with_its_background_column(target: str):
    """Softmax scores have C + 1 columns with background C; the default background follows."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(120, 5, generator=g)  # 4 classes + background
    labels = torch.where(torch.rand(120, generator=g) < 0.2, torch.randint(0, 4, (120,), generator=g), 4)
    cfg = {"type": "CrossEntropyLoss", "reduction": "sum"}
    sampler = {"type": "RandomSampler", "num": 32, "pos_fraction": 0.25}
    out = RemoteLoss({**cfg, "sampler": sampler}, target, seed=9)(scores, labels)
    sample = build_sampler(sampler).sample(labels, 4, torch.Generator().manual_seed(9))
    assert sample.negatives.numel() == 32 - sample.positives.numel() > 0
    torch.testing.assert_close(out, build_loss(cfg)(scores, labels, sample.keep.float()))


def test_per_image_sampling_through_remote_loss_is_the_heads_loop(target: str):
    """sample_groups: each image sampled with its own budget, as mmdet's per-image loop (fixture)."""
    record = next(r for r in RECORDS if r["groups"] is not None)
    labels, groups = record["labels"], record["groups"]
    scores = torch.randn(len(labels), record["background"], generator=torch.Generator().manual_seed(0))
    cfg = {"type": "FocalLoss", "reduction": "sum"}
    remote = RemoteLoss({**cfg, "sampler": record["sampler"]}, target, seed=record["seed"])
    out = remote(scores, labels.clamp(min=0), sample_labels=labels, sample_groups=groups)
    keep = torch.zeros(len(labels))
    keep[record["positives"]] = 1.0
    keep[record["negatives"]] = 1.0
    assert keep.sum() > record["sampler"]["num"]  # three budgets, not one
    torch.testing.assert_close(out, build_loss(cfg)(scores, labels.clamp(min=0), keep))


def _old_sample_by_group(sampler, labels, groups, background, generator):
    """The grouping as it was: a scan of all N rows per group (O(N x groups)), the reference of order."""
    positives, negatives = [], []
    for group in torch.unique(groups):
        rows = torch.nonzero(groups == group).flatten()
        sample = sampler.sample(labels[rows], background, generator)
        positives.append(rows[sample.positives])
        negatives.append(rows[sample.negatives])
    empty = labels.new_zeros(0)
    return (
        torch.cat(positives).sort().values if positives else empty,
        torch.cat(negatives).sort().values if negatives else empty,
    )


@pytest.mark.parametrize("seed", range(6))
def test_grouping_draws_exactly_what_the_scan_per_group_drew(seed):
    """One stable sort finds each group's rows, in increasing order: the same draws in the same order."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 600, (1,), generator=g))
    groups = torch.randint(-3, int(torch.randint(1, 40, (1,), generator=g)), (n,), generator=g)
    labels = torch.randint(-1, 6, (n,), generator=g)  # 5 background, -1 ignored
    sampler = build_sampler({"type": "RandomSampler", "num": 8, "pos_fraction": 0.25, "neg_pos_ub": 2})
    rows = sampling.group_rows(groups)
    assert [r.tolist() for r in rows] == [torch.nonzero(groups == v).flatten().tolist() for v in groups.unique()]
    sample = sample_by_group(sampler, labels, groups, 5, torch.Generator().manual_seed(seed))
    positives, negatives = _old_sample_by_group(sampler, labels, groups, 5, torch.Generator().manual_seed(seed))
    assert torch.equal(sample.positives, positives) and torch.equal(sample.negatives, negatives)


def test_more_groups_than_a_batch_has_images_are_refused_naming_the_field():
    bound = sampling.MAX_SAMPLE_GROUPS
    sampler = build_sampler({"type": "RandomSampler", "num": 4, "pos_fraction": 0.5})
    labels = torch.zeros(bound + 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    sample = sample_by_group(sampler, labels[:bound], torch.arange(bound), 1, generator)  # at the bound: fine
    assert sample.keep.all()
    with pytest.raises(LossInputError) as caught:
        sample_by_group(sampler, labels, torch.arange(bound + 1), 1, generator)
    assert caught.value.field == "sample_groups"
    assert str(bound) in str(caught.value) and str(bound + 1) in str(caught.value)


def test_the_per_image_loop_stops_once_the_caller_is_gone():
    """The evaluator's ``cancelled`` reaches the per-image loop: it stops between images, not after all."""
    n = 3000
    calls = []

    def cancelled() -> bool:  # the caller goes away once the forward has begun (the first check passes)
        calls.append(1)
        return len(calls) > 1

    term = TermRequest(
        name="t",
        config={"type": "FocalLoss", "sampler": {"type": "RandomSampler", "num": 4, "pos_fraction": 0.5}},
        pred=torch.randn(n, 1),
        target=torch.zeros(n, dtype=torch.long),
        seed=1,
        sample_groups=torch.arange(n),
    )
    with pytest.raises(CallCancelledError, match="sampling images"):
        Evaluator(fused=False).evaluate(term, cancelled)


def test_too_many_sample_groups_are_invalid_argument_through_the_server(client: LossClient):
    n = sampling.MAX_SAMPLE_GROUPS + 1
    request = pb.EvaluateRequest()
    term = request.terms.add(seed=1)
    codec.encode_config({"type": "FocalLoss", "sampler": SAMPLER}, term.config)
    codec.encode_tensor(torch.randn(n, 1), term.pred)
    codec.encode_value(torch.zeros(n, dtype=torch.long), term.target)
    codec.encode_tensor(torch.arange(n, dtype=torch.int32), term.sample_groups)
    with pytest.raises(RemoteLossError) as caught:
        client.evaluate(request)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field == "terms[0].sample_groups", caught.value.details
    assert f"at most {sampling.MAX_SAMPLE_GROUPS} images" in caught.value.details
