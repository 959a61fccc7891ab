"""L2Loss, MarginL2Loss, TripletLoss, AssociativeEmbeddingLoss, GHMC and GHMR beyond the mmdet replay:
float64 gradchecks, GHM's momentum state, L2 random mining under a NumPy seed, ``match`` as JSON numbers,
and typed errors naming their field."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from support.mmdet_fixtures import FAMILIES, check_output, prepare

from losswire.server.losses import LOSSES, LossConfigError, LossInputError, build_loss
from losswire.server.losses.ae import AssociativeEmbeddingLoss

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gradcheck(fn, *inputs: torch.Tensor, **tolerances: float) -> None:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    options = dict(eps=1e-6, atol=1e-6, rtol=1e-4) | tolerances
    assert torch.autograd.gradcheck(fn, leaves, **options)


# --------------------------------------------------------------------------------------------------
# signatures: MMDetection 3.3's forward inputs and config parameters
# --------------------------------------------------------------------------------------------------
MMDET = {
    "L2Loss": (
        ["pred", "target", "weight", "avg_factor", "reduction_override"],
        dict(neg_pos_ub=-1, pos_margin=-1, neg_margin=-1, hard_mining=False, reduction="mean", loss_weight=1.0),
    ),
    "MarginL2Loss": (
        ["pred", "target", "weight", "avg_factor", "reduction_override"],
        dict(neg_pos_ub=-1, pos_margin=-1, neg_margin=-1, hard_mining=False, reduction="mean", loss_weight=1.0),
    ),
    "TripletLoss": (["inputs", "targets"], dict(margin=0.3, loss_weight=1.0, hard_mining=True)),
    "AssociativeEmbeddingLoss": (["pred", "target", "match"], dict(pull_weight=0.25, push_weight=0.25)),
    "GHMC": (
        ["pred", "target", "label_weight", "reduction_override", "kwargs"],
        dict(bins=10, momentum=0, use_sigmoid=True, loss_weight=1.0, reduction="mean"),
    ),
    "GHMR": (
        ["pred", "target", "label_weight", "avg_factor", "reduction_override"],
        dict(mu=0.02, bins=10, momentum=0, loss_weight=1.0, reduction="mean"),
    ),
}


@pytest.mark.parametrize("name", sorted(MMDET))
def test_signatures_match_mmdet(name):
    forward, params = MMDET[name]
    cls = LOSSES.get(name)
    assert list(inspect.signature(cls.forward).parameters)[1:] == forward
    description = LOSSES.describe(name)
    assert [i.name for i in description.inputs] == [n for n in forward if n != "kwargs"]
    assert [p.name for p in description.params] == list(params)
    assert {p.name: p.default for p in description.params} == params


def test_descriptions():
    ae = LOSSES.describe("AssociativeEmbeddingLoss")
    assert [i.kind for i in ae.inputs] == ["tensor", "tensor", "any"]
    assert ae.output.value == "scalar" and ae.differentiable == ("pred", "target")
    assert LOSSES.describe("TripletLoss").differentiable == ("inputs",)
    assert LOSSES.describe("GHMC").inputs[2].optional is False
    assert LOSSES.describe("GHMR").param("bins").type == "int"
    for name in ("L2Loss", "MarginL2Loss", "GHMC", "GHMR"):
        assert LOSSES.describe(name).output.value == "element" and LOSSES.describe(name).separable


# --------------------------------------------------------------------------------------------------
# L2Loss / MarginL2Loss
# --------------------------------------------------------------------------------------------------
def similarity_inputs(seed: int = 0, n: int = 6, m: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pred kept 0.02 away from every clamp edge the margins below can create; 7 positives, 2 neither."""
    g = _gen(seed)
    pred = torch.rand(n, m, generator=g, dtype=F64) * 1.8 - 0.4
    kinks = torch.tensor([0.0, 1.0, 0.2, 1.2, 0.15, 1.15, 0.1, 1.1], dtype=F64)
    near = (pred.unsqueeze(-1) - kinks).abs().min(-1).values < 0.02
    pred = torch.where(near, pred + 0.045, pred)
    target = torch.zeros(n, m, dtype=F64)
    order = torch.randperm(n * m, generator=g)
    target.view(-1)[order[:7]] = 1.0
    target.view(-1)[order[7:9]] = 0.5
    weight = torch.rand(n, m, generator=g, dtype=F64) + 0.3
    weight[0, 1] = 0.0
    return pred, target, weight


SIMILARITY_MODES = {
    "default": {},
    "margins": {"pos_margin": 0.2, "neg_margin": 0.15},
    "hard-mining": {"neg_pos_ub": 2, "neg_margin": 0.1, "hard_mining": True},
    "random-mining": {"neg_pos_ub": 2, "pos_margin": 0.2},
}


@pytest.mark.parametrize("name", ["L2Loss", "MarginL2Loss"])
@pytest.mark.parametrize("mode", sorted(SIMILARITY_MODES))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_similarity_gradcheck(name, mode, reduction):
    # pred only: the target's labels (== 1, == 0) make the loss jump in the target
    module = build_loss(dict(type=name, reduction=reduction, loss_weight=0.7, **SIMILARITY_MODES[mode]))
    pred, target, weight = similarity_inputs()

    def fn(p):
        module.rng = np.random.RandomState(5)  # the same random negatives on every evaluation
        return module(p, target, weight)

    _gradcheck(fn, pred)


def test_l2_values_by_hand():
    pred = torch.tensor([[1.3, 0.6, -0.2, 0.7], [0.4, 0.9, 0.3, 0.05]], dtype=F64)
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0]], dtype=F64)
    weight = torch.tensor([[1.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=F64)
    loss = build_loss(dict(type="L2Loss", pos_margin=0.1, neg_margin=0.2, reduction="none"))
    # weight 0 at [0, 3]: target -1 there; pred -= margins, then clamp to [0, 1]
    shifted = torch.tensor([[1.0, 0.5, 0.0, 0.7], [0.2, 0.7, 0.3, 0.0]], dtype=F64)
    expected = (shifted - torch.where(weight > 0, target, -1.0)).square() * weight
    torch.testing.assert_close(loss(pred, target, weight), expected)
    mean = build_loss(dict(type="L2Loss", pos_margin=0.1, neg_margin=0.2))(pred, target, weight, avg_factor=100.0)
    torch.testing.assert_close(mean, expected.sum() / (7 + torch.finfo(torch.float32).eps))


def test_hard_mining_keeps_the_costliest_negatives():
    pred = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7, 0.2]], dtype=F64)
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=F64)
    loss = build_loss(dict(type="L2Loss", neg_pos_ub=2, hard_mining=True, reduction="none"))(pred, target)
    # 5 negatives > 2 * 1 positive: the two largest negative costs (0.7, 0.5) stay
    expected = torch.tensor([[0.01, 0.0, 0.25, 0.0, 0.49, 0.0]], dtype=F64)
    torch.testing.assert_close(loss, expected)


def test_l2_never_modifies_its_inputs():
    pred, target, weight = similarity_inputs()
    copies = [t.clone() for t in (pred, target, weight)]
    for name in ("L2Loss", "MarginL2Loss"):
        build_loss(dict(type=name, neg_pos_ub=1, pos_margin=0.2, neg_margin=0.1))(pred, target, weight)
    for tensor, copy in zip((pred, target, weight), copies, strict=True):
        assert torch.equal(tensor, copy)


def test_margin_l2_rounds_target_and_weight_to_float32():
    pred, target, weight = similarity_inputs()
    target = torch.where(target == 0.5, torch.tensor(1 / 3, dtype=F64), target)
    ours = build_loss(dict(type="MarginL2Loss", reduction="none"))(pred, target, weight)
    plain = build_loss(dict(type="L2Loss", reduction="none"))(pred, target, weight)
    rounded = build_loss(dict(type="L2Loss", reduction="none"))(pred, target.float().double(), weight.float().double())
    assert ours.dtype == F64 and not torch.equal(ours, plain)
    torch.testing.assert_close(ours, rounded, rtol=0, atol=0)


def _seeded_anchors() -> list[dict]:
    return [c for c in FAMILIES["misc"]["cases"] if "numpy_seeded" in c]


def test_random_mining_anchors_are_recorded():
    anchors = _seeded_anchors()
    assert {c["cfg"]["type"] for c in anchors} == {"L2Loss", "MarginL2Loss"}
    for anchor in anchors:
        records = anchor["numpy_seeded"]
        assert len({r["numpy_seed"] for r in records}) >= 3
        # the draw matters: the same inputs give different numbers under different seeds
        by_config: dict[tuple, set] = {}
        for record in records:
            key = (json.dumps(record["cfg"], sort_keys=True), record["dtype"])
            by_config.setdefault(key, set()).add(tuple(record["output"].flatten().tolist()))
        assert all(len(outputs) == len({r["numpy_seed"] for r in records}) for outputs in by_config.values())


@pytest.mark.parametrize("source", ["global", "rng"])
def test_random_mining_reproduces_mmdet_under_a_numpy_seed(source):
    for anchor in _seeded_anchors():
        for record in anchor["numpy_seeded"]:
            args, kwargs, leaves = prepare(record)
            module = build_loss(record["cfg"])
            if source == "global":
                np.random.seed(record["numpy_seed"])
            else:
                np.random.seed(12345)
                module.rng = np.random.RandomState(record["numpy_seed"])
            out = module(*args, **kwargs)
            check_output(record, record, out, leaves, context=f"{record['id']}: ")
            if source == "rng":  # a module's own generator leaves the global one alone
                np.random.seed(12345)
                expected = np.random.random()
                np.random.seed(12345)
                assert np.random.random() == expected


def test_random_mining_draws_once_per_call_from_numpy():
    pred, target, _ = similarity_inputs()
    module = build_loss(dict(type="L2Loss", neg_pos_ub=1, reduction="none"))
    np.random.seed(3)
    first = module(pred, target)
    second = module(pred, target)
    np.random.seed(3)
    assert torch.equal(module(pred, target), first) and not torch.equal(first, second)
    # kept: the first neg_pos_ub * positives (7) of a permutation of the negatives in row-major order
    negatives = (target == 0).flatten().nonzero().squeeze(1)
    kept = negatives[torch.from_numpy(np.random.RandomState(3).permutation(negatives.numel())[:7])]
    weight = torch.where(target == 0, 0.0, 1.0).flatten().index_fill(0, kept, 1.0).view_as(target)
    torch.testing.assert_close(first, (pred.clamp(0, 1) - target).square() * weight, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# TripletLoss
# --------------------------------------------------------------------------------------------------
def test_triplet_gradcheck():
    g = _gen(1)
    inputs = torch.randn(8, 5, generator=g, dtype=F64)
    targets = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    for margin in (0.3, 2.0):
        module = build_loss(dict(type="TripletLoss", margin=margin, loss_weight=0.7))
        _gradcheck(lambda x, module=module: module(x, targets), inputs)


def test_triplet_by_hand():
    inputs = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [3.0, 2.0]], dtype=F64)
    targets = torch.tensor([0, 1, 0, 1])
    loss = build_loss(dict(type="TripletLoss", margin=0.5))(inputs, targets)
    # anchor 0: ap 1, an 3; anchor 1: ap 2, an sqrt(10); anchor 2: ap 1, an sqrt(10); anchor 3: ap 2, an sqrt(10)
    hinge = [max(0.0, 1 - 3 + 0.5), max(0.0, 2 - 10**0.5 + 0.5), 0.0, max(0.0, 2 - 10**0.5 + 0.5)]
    torch.testing.assert_close(loss, torch.tensor(sum(hinge) / 4, dtype=F64))
    column = build_loss(dict(type="TripletLoss", margin=0.5))(inputs, targets.view(-1, 1))
    assert torch.equal(loss, column)


# --------------------------------------------------------------------------------------------------
# AssociativeEmbeddingLoss
# --------------------------------------------------------------------------------------------------
MATCH = [[[[1, 2], [4, 5]], [[0, 0], [3, 6]], [[2, 1], [5, 3]]], [[[3, 3], [5, 6]]], []]


def _maps(channels: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left and bottom-right embedding maps [3, channels, 6, 7]."""
    g = _gen(seed)
    return tuple(torch.randn(3, channels, 6, 7, generator=g, dtype=F64) * 0.6 for _ in range(2))


@pytest.mark.parametrize("channels", [1, 2])
def test_ae_gradcheck(channels):
    tl, br = _maps(channels)
    module = build_loss(dict(type="AssociativeEmbeddingLoss", pull_weight=0.5, push_weight=1.5))
    _gradcheck(lambda a, b: module(a, b, MATCH), tl, br)


def test_ae_by_hand():
    tl = torch.zeros(1, 1, 2, 2, dtype=F64)
    br = torch.zeros(1, 1, 2, 2, dtype=F64)
    tl[0, 0, 0, 0], br[0, 0, 1, 1] = 0.2, 0.6  # object 0: mean 0.4
    tl[0, 0, 0, 1], br[0, 0, 1, 0] = 1.0, 0.8  # object 1: mean 0.9
    pull, push = build_loss(dict(type="AssociativeEmbeddingLoss", pull_weight=1.0, push_weight=1.0))(
        tl, br, [[[[0, 0], [1, 1]], [[0, 1], [1, 0]]]]
    )
    torch.testing.assert_close(pull, torch.tensor((0.04 + 0.04 + 0.01 + 0.01) / 2, dtype=F64))
    torch.testing.assert_close(push, torch.tensor(2 * (1 - 0.5) / 2, dtype=F64))


def _pairwise_push(values: torch.Tensor) -> torch.Tensor:
    """The push sum by its definition: every ordered pair of distinct embeddings of one image."""
    off_diagonal = 1 - torch.eye(values.numel(), dtype=values.dtype)
    return torch.relu(off_diagonal * (1 - (values[:, None] - values[None, :]).abs())).sum()


def _push_by_definition(values: torch.Tensor, image: torch.Tensor, images: int):
    sums, slopes = torch.zeros(images, dtype=F64), torch.zeros_like(values)
    for b in range(images):
        mine = (image == b).nonzero().squeeze(1)
        leaf = values[mine].clone().requires_grad_()
        total = _pairwise_push(leaf)
        if leaf.numel():
            total.backward()
            slopes[mine] = leaf.grad
        sums[b] = total.detach()
    return sums, slopes


def _spread(kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Embeddings of 6 images (0, 1, 2 and many each) spread as ``kind`` says."""
    sizes = [0, 1, 2, 40, 300, 7]
    image = torch.repeat_interleave(torch.arange(6), torch.tensor(sizes))
    n = int(image.numel())
    if kind == "normal":
        values = torch.randn(n, generator=g, dtype=F64) * 1.5
    elif kind == "quarter-grid":  # ties, and gaps of exactly 1 (on the edge of the window)
        values = torch.randint(-8, 8, (n,), generator=g).to(F64) / 4
    elif kind == "integers":  # every distinct pair exactly 1 or more apart
        values = torch.randint(-3, 3, (n,), generator=g).to(F64)
    elif kind == "huge":  # far beyond float32's integers: ties, and values 1e20 apart
        values = torch.randint(0, 3, (n,), generator=g).to(F64) * 1e20 + 1e30
    else:  # "tiny": differences near float64's resolution of the values
        values = 0.5 + torch.randint(0, 4, (n,), generator=g).to(F64) * 1e-13
    return values, image, len(sizes)


@pytest.mark.parametrize("kind", ["normal", "quarter-grid", "integers", "huge", "tiny"])
def test_ae_push_sums_and_slopes_equal_the_pairwise_definition(kind):
    """The push term is computed from sorted embeddings (counts of neighbours within 1) instead of the
    E x E matrix of its definition: the sums agree to float64 rounding, and every slope (the gradient,
    with |.| and max(0, .) taking 0 at their kinks as autograd does) exactly."""
    from losswire.server.losses.ae import push_pairs

    values, image, images = _spread(kind, _gen(11))
    order = torch.randperm(values.numel(), generator=_gen(12))  # images interleaved, values unsorted
    values, image = values[order], image[order]
    sums, slopes = push_pairs(values, image, images)
    expected_sums, expected_slopes = _push_by_definition(values, image, images)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-12, atol=1e-9)
    assert torch.equal(slopes, expected_slopes)


@pytest.mark.parametrize("channels", [1, 3])
def test_ae_module_equals_the_per_image_definition(channels):
    """The whole loss, every image at once, against the per-image definition in float64: values and the
    gradients of both maps, with 40 objects in an image and duplicated corners (tied embeddings)."""
    g = _gen(21)
    tl, br = (torch.randn(4, channels, 5, 6, generator=g, dtype=F64) for _ in range(2))
    rows = torch.randint(0, 5, (40, 4), generator=g)
    rows[:, 1::2] %= 6
    pairs = [[[a, b], [c, d]] for a, b, c, d in rows.tolist()]
    match = [pairs, pairs[:1], [], pairs[:7] * 2]
    module = build_loss(dict(type="AssociativeEmbeddingLoss", pull_weight=0.7, push_weight=1.3))
    leaves = [tl.clone().requires_grad_(), br.clone().requires_grad_()]
    pull, push = module(*leaves, match)
    (pull + 2 * push).backward()
    refs = [tl.clone().requires_grad_(), br.clone().requires_grad_()]
    ref_pull = ref_push = torch.zeros((), dtype=F64)
    for i, image in enumerate(match):
        if len(image) == 0:
            continue
        y0, x0, y1, x1 = torch.tensor([[a, b, c, d] for (a, b), (c, d) in image]).unbind(1)
        e_tl, e_br = refs[0][i][:, y0, x0].t().reshape(-1), refs[1][i][:, y1, x1].t().reshape(-1)
        mean = (e_tl + e_br) / 2
        count = mean.numel()
        ref_pull = ref_pull + ((e_tl - mean) ** 2 + (e_br - mean) ** 2).sum() / count
        if count > 1:
            ref_push = ref_push + _pairwise_push(mean) / (count * (count - 1))
    (0.7 * ref_pull + 2 * 1.3 * ref_push).backward()
    torch.testing.assert_close(pull, 0.7 * ref_pull.detach())
    torch.testing.assert_close(push, 1.3 * ref_push.detach())
    for leaf, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(leaf.grad, ref.grad)


def test_ae_a_non_finite_embedding_spoils_only_its_image():
    """inf in an image's embeddings makes its push NaN, with no gradient from it (as the pairwise
    definition does: inf - inf on its diagonal, and max(0, NaN) passes none); the other image's push and
    its gradient are what they are without it."""
    from losswire.server.losses.ae import corner_positions, pull_push

    tl, br = _maps(1)
    match = [MATCH[0], MATCH[0], []]
    rows = corner_positions(match, 3, 6, 7)
    clean = [tl.clone().requires_grad_(), br.clone().requires_grad_()]
    _, clean_push = pull_push(*clean, rows)
    clean_push[1].backward()
    spoiled_tl = tl.clone()
    spoiled_tl[0, 0, 1, 2] = float("inf")  # image 0's first top-left corner
    spoiled = [spoiled_tl.requires_grad_(), br.clone().requires_grad_()]
    _, push = pull_push(*spoiled, rows)
    assert push[0].isnan() and torch.equal(push[1], clean_push[1])
    push.nan_to_num().sum().backward()
    for leaf, reference in zip(spoiled, clean, strict=True):
        assert torch.equal(leaf.grad, reference.grad)


def test_ae_many_objects_in_one_image():
    """8,000 corner pairs in one image, on a grid of 1/8 (ties, and gaps of exactly 1, everywhere): the
    sorted computation against the definition (512 MB of float64 a matrix), a chunk of rows at a time."""
    from losswire.server.losses.ae import push_pairs

    g = _gen(31)
    count = 8_000
    values = torch.randint(-400, 400, (count,), generator=g).to(F64) / 8
    sums, slopes = push_pairs(values, torch.zeros(count, dtype=torch.long), 1)
    total, slope = torch.zeros((), dtype=F64), torch.zeros_like(values)
    for rows in torch.arange(count).split(1_000):
        gaps = values[rows, None] - values[None, :]
        near = (gaps.abs() < 1) & (rows[:, None] != torch.arange(count)[None, :])
        total += torch.where(near, 1 - gaps.abs(), 0).sum()
        slope[rows] = 2 * torch.where(near, -torch.sign(gaps), 0).sum(1)
    torch.testing.assert_close(sums[0], total, rtol=1e-12, atol=0)
    assert torch.equal(slopes, slope)


def test_ae_match_as_json_floats():
    tl, br = _maps(2)
    module = build_loss(dict(type="AssociativeEmbeddingLoss"))
    as_json = json.loads(json.dumps([[[[float(v) for v in c] for c in pair] for pair in image] for image in MATCH]))
    assert isinstance(as_json[0][0][0][0], float)
    ints, floats = module(tl, br, MATCH), module(tl, br, as_json)
    assert isinstance(floats, tuple) and len(floats) == 2
    for a, b in zip(ints, floats, strict=True):
        assert torch.equal(a, b)
    tuples = module(tl, br, tuple(tuple(tuple(map(tuple, pair)) for pair in image) for image in MATCH))
    assert torch.equal(tuples[0], ints[0])


def test_ae_empty_batch_gives_zeros_with_a_gradient():
    tl = torch.zeros(0, 1, 4, 4, requires_grad=True)
    pull, push = build_loss(dict(type="AssociativeEmbeddingLoss"))(tl, tl.detach(), [])
    assert pull.item() == 0 and push.item() == 0
    (pull + push).backward()
    assert tl.grad is not None


@pytest.mark.parametrize(
    "match, message",
    [
        ([[[[2.5, 1], [3, 3]]], [], []], r"match\[0\]\[0\]\[0\]\[0\] must be an integer y coordinate, got float 2.5"),
        ([[[["1", 1], [3, 3]]], [], []], r"integer y coordinate, got str '1'"),
        ([[[[True, 1], [3, 3]]], [], []], r"integer y coordinate, got bool True"),
        ([[[[1, None], [3, 3]]], [], []], r"integer x coordinate, got NoneType"),
        ([[[[1, 1], [3, 3], [0, 0]]], [], []], r"match\[0\]\[0\] must be a corner pair"),
        ([[[[1, 1, 1], [3, 3]]], [], []], r"match\[0\]\[0\]\[0\] must be a corner \[y, x\], got 3 entries"),
        ([[[[1, 1], 3]], [], []], r"match\[0\]\[0\]\[1\] must be a corner \[y, x\], got int"),
        ([[[[-1, 2], [3, 3]]], [], []], r"y coordinate in \[0, 6\).*got -1"),
        ([[[[1, 2], [3, 7]]], [], []], r"x coordinate in \[0, 7\).*got 7"),
        ([[], []], r"one list of corner pairs per image: 3 for pred's batch, got 2"),
        ([[], [], [], []], r"got 4"),
        (None, r"match must be a list of 3 per-image lists"),
        ([[], 5, []], r"match\[1\] must be a list of corner pairs"),
    ],
)
def test_ae_match_errors(match, message):
    tl, br = _maps(1)
    with pytest.raises(LossInputError, match=message) as info:
        AssociativeEmbeddingLoss()(tl, br, match)
    assert info.value.field == "match"


def test_ae_tensor_errors():
    tl, br = _maps(1)
    module = AssociativeEmbeddingLoss()
    with pytest.raises(LossInputError) as info:
        module(tl[:, 0], br[:, 0], MATCH)
    assert info.value.field == "pred"
    with pytest.raises(LossInputError) as info:
        module(tl, br.repeat(1, 2, 1, 1), MATCH)
    assert info.value.field == "target"


# --------------------------------------------------------------------------------------------------
# GHMC / GHMR
# --------------------------------------------------------------------------------------------------
def ghmc_inputs(seed: int = 3, n: int = 10, c: int = 4, labels: torch.Tensor | None = None, bins: int = 7):
    """Logits whose gradient norms g lie in the middle half of their bin (finite differences stay in it)."""
    g = _gen(seed)
    if labels is None:
        target = (torch.rand(n, c, generator=g) < 0.3).double()
    else:
        target = (labels.unsqueeze(1) == torch.arange(c)).double()
    bin_index = torch.randint(0, bins, (n, c), generator=g)
    norm = (bin_index + 0.25 + 0.5 * torch.rand(n, c, generator=g, dtype=F64)) / bins
    prob = torch.where(target == 1, 1 - norm, norm)
    pred = torch.log(prob / (1 - prob))
    label_weight = torch.ones(n, c, dtype=F64)
    label_weight.view(-1)[torch.randperm(n * c, generator=g)[:4]] = 0.0
    return pred, target, label_weight


def ghmr_inputs(seed: int = 4, n: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    pred = torch.randn(n, 4, generator=g, dtype=F64)
    norm = torch.rand(n, 4, generator=g, dtype=F64) * 0.97 + 0.02
    d = norm * 0.02 / torch.sqrt(1 - norm * norm) * torch.where(torch.rand(n, 4, generator=g) < 0.5, -1.0, 1.0)
    label_weight = torch.rand(n, 4, generator=g, dtype=F64) + 0.5
    label_weight[2, 1] = 0.0
    return pred, pred - d, label_weight


def _stateless(module, call):
    """``call`` on a fresh copy of the module's state each time (gradcheck evaluates many times)."""
    state = {k: v.clone() for k, v in module.state_dict().items()}

    def fn(*inputs):
        module.load_state_dict(state)
        return call(*inputs)

    return fn


@pytest.mark.parametrize("momentum", [0.0, 0.75])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("index_target", [False, True])
def test_ghmc_gradcheck(momentum, reduction, index_target):
    # mmdet casts GHMC's target to float32, so its BCE is float32-rounded even for float64 logits:
    # finite differences need a larger step and tolerance than the float64 losses
    module = build_loss(dict(type="GHMC", momentum=momentum, reduction=reduction, loss_weight=0.7, bins=7))
    pred, target, label_weight = ghmc_inputs()
    if index_target:
        target = torch.tensor([0, 4, 2, -1, 3, 1, 4, 0, 2, 3])
        pred, _, _ = ghmc_inputs(labels=target)
        label_weight = torch.tensor([1.0, 1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=F64)
    _gradcheck(_stateless(module, lambda p: module(p, target, label_weight)), pred, eps=1e-3, atol=1e-4, rtol=1e-3)
    # and the gradient exactly: (sigmoid(pred) - target) times the weights, which are constants
    fresh = build_loss(dict(type="GHMC", momentum=momentum, reduction="none", bins=7))
    leaf = pred.clone().requires_grad_()
    elementwise = fresh(leaf, target, label_weight)
    dense = (target.unsqueeze(1) == torch.arange(4)).double() if index_target else target
    bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, dense.float(), reduction="none")
    weights = elementwise.detach() / bce  # the float32-rounded BCE, as in the loss
    assert weights.unique().numel() > 2  # several bins in use
    (grad,) = torch.autograd.grad(elementwise.sum(), leaf)
    torch.testing.assert_close(grad, (pred.sigmoid() - dense) * weights, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("momentum", [0.0, 0.6])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ghmr_gradcheck(momentum, reduction):
    module = build_loss(dict(type="GHMR", momentum=momentum, reduction=reduction, loss_weight=0.7, mu=0.05))
    pred, target, label_weight = ghmr_inputs()
    _gradcheck(_stateless(module, lambda p, t: module(p, t, label_weight)), pred, target)


def test_ghmc_weights_by_hand():
    # 2 bins: g = |sigmoid(pred) - target|; valid entries 3, bin counts [2, 1]
    pred = torch.tensor([[0.0, 3.0], [-3.0, 0.5]], dtype=F64)
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    label_weight = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)
    loss = build_loss(dict(type="GHMC", bins=2, reduction="none"))(pred, target, label_weight)
    # g = [0.5, 0.047, 0.953, -] -> bins [1, 0, 1]: counts [1, 2]; weights tot / count / n, n = 2
    weights = torch.tensor([[3 / 2 / 2, 3 / 1 / 2], [3 / 2 / 2, 0.0]], dtype=F64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
    torch.testing.assert_close(loss, (bce.float() * weights).to(F64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["GHMC", "GHMR"])
def test_ghm_momentum_state_updates_once_per_forward(name):
    mmt = 0.75
    module = build_loss(dict(type=name, momentum=mmt, bins=5))
    assert "acc_sum" in dict(module.named_buffers()) and "edges" in dict(module.named_buffers())
    assert "acc_sum" in module.state_dict() and module.acc_sum.dtype == torch.float32
    assert not hasattr(build_loss(dict(type=name)), "acc_sum")
    pred, target, label_weight = (ghmc_inputs if name == "GHMC" else ghmr_inputs)()
    if name == "GHMC":
        g = (pred.sigmoid() - target).abs()
    else:
        d = pred - target
        g = d.abs() / torch.sqrt(d * d + 0.02**2)
    counts = torch.bincount(torch.bucketize(g[label_weight > 0].float(), module.edges, right=True) - 1, minlength=5)
    assert torch.equal(module.acc_sum, torch.zeros(5))

    leaf = pred.clone().requires_grad_()
    module(leaf, target, label_weight).backward()  # a backward does not touch the state
    expected = (1 - mmt) * counts.float()
    torch.testing.assert_close(module.acc_sum, expected)
    module(pred, target, label_weight, reduction_override="none")
    expected = torch.where(counts > 0, mmt * expected + ((1 - mmt) * counts.double()).float(), expected)
    torch.testing.assert_close(module.acc_sum, expected, rtol=0, atol=0)
    before = module.acc_sum.clone()
    with pytest.raises(LossInputError):  # a refused forward leaves the state alone
        module(pred, target, label_weight, reduction_override="sum")
    with pytest.raises(LossInputError):
        module(pred, target, label_weight.expand(2, -1, -1))
    assert torch.equal(module.acc_sum, before)
    # the weights follow the state: a second identical call differs from the first
    fresh = build_loss(dict(type=name, momentum=mmt, bins=5))
    assert not torch.equal(fresh(pred, target, label_weight), module(pred, target, label_weight))
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.acc_sum, module.acc_sum)


def test_ghmc_ignores_extra_keyword_arguments_and_label_weight_magnitude():
    pred, target, label_weight = ghmc_inputs()
    module = build_loss(dict(type="GHMC"))
    plain = module(pred, target, label_weight)
    assert torch.equal(module(pred, target, label_weight, avg_factor=3.7, weight=None), plain)
    assert torch.equal(module(pred, target, label_weight * 5.0), plain)


def test_ghmr_ignores_avg_factor_and_divides_by_the_label_weight_sum():
    pred, target, label_weight = ghmr_inputs()
    module = build_loss(dict(type="GHMR"))
    mean = module(pred, target, label_weight, avg_factor=3.7)
    none = module(pred, target, label_weight, reduction_override="none")
    tot = label_weight.float().sum().item()
    torch.testing.assert_close(mean, none.sum() / (tot + torch.finfo(torch.float32).eps), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------
# typed errors
# --------------------------------------------------------------------------------------------------
def _similarity32():
    pred, target, weight = similarity_inputs()
    return pred.float(), target.float(), weight.float()


ERRORS = [
    # (id, config, call, error type, field)
    ("L2-sum", dict(type="L2Loss", reduction="sum"), lambda m, p, t, w: m(p, t), LossConfigError, "reduction"),
    (
        "L2-override-sum",
        dict(type="L2Loss"),
        lambda m, p, t, w: m(p, t, reduction_override="sum"),
        LossInputError,
        "reduction_override",
    ),
    ("L2-weight-Nx1", dict(type="L2Loss"), lambda m, p, t, w: m(p, t, w[:, :1]), LossInputError, "weight"),
    ("L2-shape", dict(type="L2Loss"), lambda m, p, t, w: m(p, t[:, :3]), LossInputError, "target"),
    ("L2-bool-target", dict(type="L2Loss"), lambda m, p, t, w: m(p, t > 0), LossInputError, "target"),
    ("L2-int-pred", dict(type="L2Loss"), lambda m, p, t, w: m(p.long(), t), LossInputError, "pred"),
    (
        "L2-1d-mining",
        dict(type="L2Loss", neg_pos_ub=1),
        lambda m, p, t, w: m(p[0], torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])),
        LossInputError,
        "target",
    ),
    (
        "MarginL2-3d-mining",
        dict(type="MarginL2Loss", neg_pos_ub=1, hard_mining=True),
        lambda m, p, t, w: m(p.view(2, 3, 8), t.view(2, 3, 8)),
        LossInputError,
        "target",
    ),
    (
        "MarginL2-sum",
        dict(type="MarginL2Loss", reduction="sum"),
        lambda m, p, t, w: m(p, t),
        LossConfigError,
        "reduction",
    ),
]


@pytest.mark.parametrize("cfg, call, error, field", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_similarity_errors(cfg, call, error, field):
    pred, target, weight = _similarity32()
    with pytest.raises(error) as info:
        call(build_loss(cfg), pred, target, weight)
    assert info.value.field == field


def test_three_d_inputs_are_fine_without_mining():
    pred, target, _ = _similarity32()
    out = build_loss(dict(type="L2Loss", neg_pos_ub=100, reduction="none"))(pred.view(2, 3, 8), target.view(2, 3, 8))
    assert out.shape == (2, 3, 8)


def test_triplet_errors():
    x = torch.randn(6, 3, generator=_gen(0))
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    cases = [
        (dict(hard_mining=False), (x, labels), LossConfigError, "hard_mining"),
        ({}, (x, torch.zeros(6)), LossInputError, "targets"),
        ({}, (x[0], labels), LossInputError, "inputs"),
        ({}, (x.long(), labels), LossInputError, "inputs"),
        ({}, (x, labels[:4]), LossInputError, "targets"),
        ({}, (x, labels.view(2, 3)), LossInputError, "targets"),
        ({}, (x[:0], labels[:0]), LossInputError, "inputs"),
    ]
    for extra, args, error, field in cases:
        with pytest.raises(error) as info:
            build_loss(dict(type="TripletLoss", **extra))(*args)
        assert info.value.field == field, (extra, field)
    with pytest.raises(LossInputError, match=r"at least two different labels.*all 6 share label 3"):
        build_loss(dict(type="TripletLoss"))(x, torch.full((6,), 3))


def test_ghm_errors():
    pred, target, label_weight = ghmc_inputs()
    cases = [
        (dict(type="GHMC", use_sigmoid=False), (pred, target, label_weight), {}, LossConfigError, "use_sigmoid"),
        (dict(type="GHMC", bins=0), (pred, target, label_weight), {}, LossConfigError, "bins"),
        (dict(type="GHMR", bins=-3), (pred, target, label_weight), {}, LossConfigError, "bins"),
        (dict(type="GHMC", reduction="sum"), (pred, target, label_weight), {}, LossConfigError, "reduction"),
        (
            dict(type="GHMC"),
            (pred, target, label_weight),
            {"reduction_override": "sum"},
            LossInputError,
            "reduction_override",
        ),
        (
            dict(type="GHMC"),
            (pred, target, label_weight),
            {"reduction_override": "max"},
            LossInputError,
            "reduction_override",
        ),
        (dict(type="GHMC"), (pred, target[:, :2], label_weight), {}, LossInputError, "target"),
        (dict(type="GHMC"), (pred, target, label_weight[None]), {}, LossInputError, "label_weight"),
        (dict(type="GHMC"), (pred, target.argmax(1), label_weight), {}, LossInputError, "label_weight"),
        (dict(type="GHMC"), (pred, target.argmax(1)[:7], label_weight[:, 0]), {}, LossInputError, "target"),
        (dict(type="GHMC"), (pred, target.argmax(1).double(), label_weight[:, 0]), {}, LossInputError, "target"),
        (dict(type="GHMC"), (pred.long(), target, label_weight), {}, LossInputError, "pred"),
        (dict(type="GHMR", reduction="sum"), (pred, target, label_weight), {}, LossConfigError, "reduction"),
        (dict(type="GHMR"), (pred, target[:1], label_weight), {}, LossInputError, "target"),
        (dict(type="GHMR"), (pred, target, label_weight[None].expand(2, -1, -1)), {}, LossInputError, "label_weight"),
    ]
    for cfg, args, kwargs, error, field in cases:
        with pytest.raises(error) as info:
            build_loss(cfg)(*args, **kwargs)
        assert info.value.field == field, (cfg, kwargs, field)
