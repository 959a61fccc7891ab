"""mmdet reference cases for the classification zoo: Varifocal, GaussianFocal, KnowledgeDistillationKLDiv,
Dice, MultiPosCrossEntropy, CrossEntropyCustom and FocalCustom. Run through ``make_mmdet_fixtures.py cls``.

Cases marked ``ours="refuse"`` are deliberate differences (losswire raises a LossError where mmdet
returns a number, usually a broadcast of mismatched shapes or a NaN); ``ours="float32"`` marks float64
cases where mmdet computes in float32 inside (sigmoid cross-entropy), compared at float32 tolerance.
"""

# ruff: noqa: N806  (math-style names: N/C sizes, L = loss name)
from __future__ import annotations

import torch
from mmdet_harness import (
    AFS,
    DTYPES,
    T,
    add_mode,
    add_overrides,
    cached,
    combos,
    gen,
    pos_weight,
    randint,
    randn,
    run_case,
    unif,
)

ONE_AF = (None,)  # option variants: avg_factor is covered by each loss's full grid


def _cfg(loss, reduction="mean", loss_weight=1.0, **extra):
    return {"type": loss, **extra, "reduction": reduction, "loss_weight": loss_weight}


# --------------------------------------------------------------------------------------------------
# VarifocalLoss
# --------------------------------------------------------------------------------------------------
def varifocal_cases():
    L, N, C = "VarifocalLoss", 6, 4

    def iou_target(g, dt, negative_entry=False):
        pred = T(randn(g, N, C) * 1.5, dt)
        tgt = torch.zeros(N, C, dtype=torch.float64)
        for i, c in ((0, 1), (2, 3), (3, 0), (5, 2)):
            tgt[i, c] = float(unif(g, 0.05, 0.95, 1))
        if negative_entry:
            tgt[1, 2] = -0.3  # a negative target value: treated as a negative, |p - q| with q = -0.3
        return pred, T(tgt, dt)

    w_nc = lambda g, p, t, dt: pos_weight(g, (N, C), dt)  # noqa: E731
    w_n1 = lambda g, p, t, dt: pos_weight(g, (N, 1), dt)  # noqa: E731
    w_c = lambda g, p, t, dt: pos_weight(g, (C,), dt)  # noqa: E731
    add_mode(L, "iou-target", {}, iou_target, {"none": None, "NxC": w_nc}, full=True, grad_targets=[[1]])
    add_mode(L, "iou-target", {}, iou_target, {"Nx1": w_n1, "C": w_c}, grad_targets=[[1]], afs=ONE_AF)
    add_mode(
        L,
        "iou-target/iou_weighted-False",
        {"iou_weighted": False},
        iou_target,
        {"none": None, "NxC": w_nc},
        grad_targets=[[1]],
        afs=ONE_AF,
    )
    add_mode(
        L,
        "iou-target/alpha-0.5/gamma-1.5",
        {"alpha": 0.5, "gamma": 1.5},
        iou_target,
        {"NxC": w_nc},
        grad_targets=[[1]],
        afs=ONE_AF,
    )
    add_mode(
        L,
        "negative-target-entry",
        {},
        lambda g, dt: iou_target(g, dt, True),
        {"none": None},
        grad_targets=[[1]],
        afs=ONE_AF,
    )
    add_overrides(L, "iou-target", {}, iou_target, weight_fn=w_nc, grad_targets=[[1]])

    p, t = cached(f"{L}/iou-target/float32", lambda g: iou_target(g, "float32"))
    run_case(f"{L}/error-use_sigmoid-False/float32", _cfg(L, use_sigmoid=False), [p, t], {}, [[0]])
    run_case(f"{L}/error-alpha-negative/float32", _cfg(L, alpha=-0.1), [p, t], {}, [[0]])
    run_case(f"{L}/error-target-shape/float32", _cfg(L), [p, t[:, :3]], {}, [[0]])
    # [N] = [6] does not broadcast against [6, 4]
    run_case(f"{L}/error-weight-N/float32", _cfg(L), [p, t, pos_weight(gen("vfl-wN"), (N,), "float32")], {}, [[0]])
    run_case(f"{L}/error-invalid-reduction_override/float32", _cfg(L), [p, t], {"reduction_override": "max"}, [[0]])


# --------------------------------------------------------------------------------------------------
# GaussianFocalLoss
# --------------------------------------------------------------------------------------------------
def _heatmap(g, shape, peaks):
    """Gaussian-like heatmap values in [0, 0.9) with exact 1s at ``peaks``."""
    tgt = unif(g, 0.0, 0.9, *shape) ** 2
    for idx in peaks:
        tgt[idx] = 1.0
    return tgt


def _weight_by_keyword(loss, mode, cfg_extra, make_inputs, weights, full=False, afs=AFS):
    """``add_mode`` with ``weight`` passed by keyword (GaussianFocalLoss's third slot is ``pos_inds``)."""
    for red, wname, af, lw, dt in combos(full, list(weights), afs=afs):
        base = f"{loss}/{mode}/{dt}"
        pred, target = cached(base, lambda g, dt=dt: make_inputs(g, dt))
        kwargs = {} if af is None else {"avg_factor": af}
        if weights[wname] is not None:
            wfn = weights[wname]
            kwargs["weight"] = cached(
                f"{base}/weight-{wname}", lambda g, wfn=wfn, p=pred, t=target, dt=dt: wfn(g, p, t, dt)
            )
        cid = f"{loss}/{mode}/weight-{wname}/{red}/af-{af if af is not None else 'none'}/lw-{lw}/{dt}"
        run_case(cid, _cfg(loss, red, lw, **cfg_extra), [pred, target], kwargs, [[0], [1]], dt)


def gaussian_focal_cases():
    L, N, C = "GaussianFocalLoss", 6, 4

    def flat(g, dt):
        pred = torch.sigmoid(randn(g, N, C) * 1.5)
        return T(pred, dt), T(_heatmap(g, (N, C), [(0, 1), (2, 3), (4, 0)]), dt)

    def image(g, dt):
        B, H, W = 2, 3, 4
        pred = torch.sigmoid(randn(g, B, C, H, W) * 1.5)
        return T(pred, dt), T(_heatmap(g, (B, C, H, W), [(0, 1, 1, 2), (1, 3, 0, 0), (1, 0, 2, 3)]), dt)

    w_nc = lambda g, p, t, dt: pos_weight(g, (N, C), dt)  # noqa: E731
    w_n1 = lambda g, p, t, dt: pos_weight(g, (N, 1), dt)  # noqa: E731
    # the third positional slot is pos_inds: weights go by keyword
    _weight_by_keyword(L, "heatmap-NxC", {}, flat, {"none": None, "NxC": w_nc}, full=True)
    _weight_by_keyword(L, "heatmap-NxC", {}, flat, {"Nx1": w_n1}, afs=ONE_AF)
    _weight_by_keyword(L, "heatmap-BxCxHxW", {}, image, {"none": None}, afs=ONE_AF)
    _weight_by_keyword(
        L, "heatmap-NxC/alpha-1.5/gamma-3.0", {"alpha": 1.5, "gamma": 3.0}, flat, {"NxC": w_nc}, afs=ONE_AF
    )
    _weight_by_keyword(
        L,
        "heatmap-NxC/pos_weight-0.6/neg_weight-1.8",
        {"pos_weight": 0.6, "neg_weight": 1.8},
        flat,
        {"none": None, "NxC": w_nc},
        afs=ONE_AF,
    )
    for cfg_red, override, af, dt in (
        ("mean", "sum", None, "float32"),
        ("sum", "none", None, "float64"),
        ("none", "mean", 3.7, "float64"),
        ("mean", "none", 3.7, "float32"),
    ):
        p, t = cached(f"{L}/heatmap-NxC/{dt}", lambda g, dt=dt: flat(g, dt))
        w = cached(f"{L}/heatmap-NxC/{dt}/weight-NxC", lambda g, dt=dt: w_nc(g, None, None, dt))
        kwargs = {"weight": w, "reduction_override": override, **({} if af is None else {"avg_factor": af})}
        run_case(
            f"{L}/heatmap-NxC/reduction_override-{override}-over-{cfg_red}/weight-NxC/af-{af or 'none'}/{dt}",
            _cfg(L, cfg_red),
            [p, t],
            kwargs,
            [[0], [1]],
            dt,
        )
    p, t = cached(f"{L}/heatmap-NxC/float32", lambda g: flat(g, "float32"))
    w = cached(f"{L}/heatmap-NxC/float32/weight-NxC", lambda g: w_nc(g, None, None, "float32"))
    # a weight passed third lands in pos_inds: mmdet then asserts on the missing pos_labels
    run_case(f"{L}/error-weight-positional-is-pos_inds/float32", _cfg(L), [p, t, w], {}, [[0]])

    # ---- pos_inds / pos_labels (CenterNet-update): positives from indices, parts reduced apart ----
    inds = torch.tensor([0, 2, 5, 3])
    labels = torch.tensor([1, 3, 0, 2])
    pos = {"pos_inds": inds, "pos_labels": labels}
    add_mode(
        L,
        "pos_inds",
        {},
        flat,
        {"none": None},
        full=True,
        grad_targets=[[1]],
        extra_kwargs=pos,
        reductions=("mean", "sum"),
    )
    add_mode(
        L,
        "pos_inds/alpha-1.5/gamma-3.0/pos_weight-0.6/neg_weight-1.8",
        {"alpha": 1.5, "gamma": 3.0, "pos_weight": 0.6, "neg_weight": 1.8},
        flat,
        {"none": None},
        grad_targets=[[1]],
        extra_kwargs=pos,
        reductions=("mean", "sum"),
        afs=ONE_AF,
    )
    for dt in DTYPES:
        p, t = cached(f"{L}/heatmap-NxC/{dt}", lambda g, dt=dt: flat(g, dt))
        # positional, as a head calls it
        run_case(f"{L}/pos_inds/positional/mean/{dt}", _cfg(L), [p, t, inds, labels], {}, [[0], [1]], dt)
        run_case(
            f"{L}/pos_inds/positional/sum/af-none/lw-0.7/{dt}",
            _cfg(L, "sum", 0.7),
            [p, t, inds, labels],
            {},
            [[0], [1]],
            dt,
        )
        run_case(
            f"{L}/pos_inds/reduction_override-sum-over-mean/{dt}",
            _cfg(L),
            [p, t, inds, labels],
            {"reduction_override": "sum"},
            [[0], [1]],
            dt,
        )
    p, t = cached(f"{L}/heatmap-NxC/float64", lambda g: flat(g, "float64"))
    dt = "float64"
    run_case(
        f"{L}/pos_inds/duplicate-rows/mean/{dt}",
        _cfg(L),
        [p, t, torch.tensor([1, 1, 4]), torch.tensor([0, 2, 2])],
        {},
        [[0], [1]],
        dt,
    )
    run_case(
        f"{L}/pos_inds/negative-row-index/mean/{dt}",
        _cfg(L),
        [p, t, torch.tensor([-1, 2]), torch.tensor([3, 1])],
        {},
        [[0], [1]],
        dt,
    )
    run_case(
        f"{L}/pos_inds/bool-mask/mean/{dt}",
        _cfg(L),
        [p, t, torch.tensor([1, 0, 1, 0, 0, 1]).bool(), torch.tensor([2, 0, 1])],
        {},
        [[0], [1]],
        dt,
    )
    run_case(
        f"{L}/pos_inds/weight-ignored/mean/{dt}",
        _cfg(L),
        [p, t, inds, labels, pos_weight(gen("gfl-ignored-w"), (N, C), dt)],
        {},
        [[0], [1]],
        dt,
    )
    run_case(
        f"{L}/pos_labels-without-pos_inds-ignored/mean/{dt}", _cfg(L), [p, t], {"pos_labels": labels}, [[0], [1]], dt
    )
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    run_case(
        f"{L}/pos_inds/no-positives/mean/af-3.7/{dt}", _cfg(L), [p, t, *empty], {"avg_factor": 3.7}, [[0], [1]], dt
    )
    run_case(f"{L}/pos_inds/no-positives/sum/{dt}", _cfg(L, "sum"), [p, t, *empty], {}, [[0], [1]], dt)

    p, t = cached(f"{L}/heatmap-NxC/float32", lambda g: flat(g, "float32"))
    run_case(f"{L}/pos_inds/error-pos_labels-missing/float32", _cfg(L), [p, t, inds], {}, [[0]])
    run_case(
        f"{L}/pos_inds/error-pos_labels-out-of-range/float32",
        _cfg(L),
        [p, t, inds, torch.tensor([1, 4, 0, 2])],
        {},
        [[0]],
    )
    run_case(
        f"{L}/pos_inds/error-pos_inds-out-of-range/float32",
        _cfg(L),
        [p, t, torch.tensor([0, 6]), torch.tensor([1, 1])],
        {},
        [[0]],
    )
    run_case(f"{L}/pos_inds/error-pos_labels-longer/float32", _cfg(L), [p, t, inds[:2], labels[:3]], {}, [[0]])
    pi, ti = cached(f"{L}/heatmap-BxCxHxW/float32", lambda g: image(g, "float32"))
    run_case(
        f"{L}/pos_inds/error-pred-4d/float32", _cfg(L), [pi, ti, torch.tensor([0, 1]), torch.tensor([1, 2])], {}, [[0]]
    )
    # reduction 'none': [M, 1] positives + [N, C] negatives only broadcast for M == 1 or M == N
    run_case(f"{L}/pos_inds/error-none-M4/float32", _cfg(L, "none"), [p, t, inds, labels], {}, [[0]])
    run_case(
        f"{L}/pos_inds/refuse-none-M-equals-N/float32",
        _cfg(L, "none"),
        [p, t, torch.arange(N), torch.tensor([1, 3, 0, 2, 2, 1])],
        {},
        [[0]],
        ours="refuse",
    )
    # gather keeps only the first len(pos_labels) positives when pos_labels is shorter than pos_inds
    run_case(
        f"{L}/pos_inds/refuse-pos_labels-shorter/float32", _cfg(L), [p, t, inds, labels[:2]], {}, [[0]], ours="refuse"
    )
    # probabilities outside [0, 1]: NaN in mmdet's default path, a finite number off the positives with pos_inds
    bad = p.clone()
    bad[1, 1] = -0.2
    run_case(f"{L}/refuse-pred-below-0/mean/float32", _cfg(L), [bad, t], {}, [[0]], ours="refuse")
    run_case(
        f"{L}/pos_inds/refuse-pred-below-0/mean/float32", _cfg(L), [bad, t, inds, labels], {}, [[0]], ours="refuse"
    )
    # a target that broadcasts to pred without being pred's shape
    run_case(f"{L}/refuse-target-broadcast-1xC/mean/float32", _cfg(L), [p, t[:1]], {}, [[0]], ours="refuse")
    run_case(f"{L}/error-target-shape/float32", _cfg(L), [p, t[:, :3]], {}, [[0]])
    run_case(f"{L}/error-invalid-reduction_override/float32", _cfg(L), [p, t], {"reduction_override": "max"}, [[0]])


# --------------------------------------------------------------------------------------------------
# KnowledgeDistillationKLDivLoss
# --------------------------------------------------------------------------------------------------
def kd_cases():
    L, N, C = "KnowledgeDistillationKLDivLoss", 6, 5

    def logits(g, dt):
        return T(randn(g, N, C) * 2.0, dt), T(randn(g, N, C) * 2.0, dt)

    def logits_3d(g, dt):
        return T(randn(g, N, C, 3) * 2.0, dt), T(randn(g, N, C, 3) * 2.0, dt)

    w_n = lambda g, p, t, dt: pos_weight(g, (N,), dt)  # noqa: E731
    # the teacher is detached: mmdet gives soft_label no gradient
    add_mode(L, "default-T10", {}, logits, {"none": None, "N": w_n}, full=True, grad_targets=[[1]])
    for temp in (1, 2, 1.5):
        add_mode(L, f"T-{temp}", {"T": temp}, logits, {"none": None, "N": w_n}, grad_targets=[[1]], afs=ONE_AF)
    add_mode(L, "logits-NxCx3/T-2", {"T": 2}, logits_3d, {"none": None}, grad_targets=[[1]], afs=ONE_AF)
    add_overrides(L, "default-T10", {}, logits, weight_fn=w_n, grad_targets=[[1]])

    p, t = cached(f"{L}/default-T10/float32", lambda g: logits(g, "float32"))
    run_case(f"{L}/error-T-below-1/float32", _cfg(L, T=0.5), [p, t], {}, [[0]])
    run_case(f"{L}/error-shape-mismatch/float32", _cfg(L), [p, t[:, :4]], {}, [[0]])
    run_case(f"{L}/error-pred-1d/float32", _cfg(L), [p[0], t[0]], {}, [[0]])
    run_case(f"{L}/error-invalid-reduction_override/float32", _cfg(L), [p, t], {"reduction_override": "max"}, [[0]])
    # [N, 1] weight on the [N] loss: an [N, N] outer product in mmdet
    run_case(
        f"{L}/refuse-weight-Nx1-broadcasts/mean/float32",
        _cfg(L),
        [p, t, pos_weight(gen("kd-wN1"), (N, 1), "float32")],
        {},
        [[0]],
        ours="refuse",
    )


# --------------------------------------------------------------------------------------------------
# DiceLoss (forward order: pred, target, weight, reduction_override, avg_factor)
# --------------------------------------------------------------------------------------------------
def dice_cases():
    L, N, H, W = "DiceLoss", 5, 4, 3

    def masks(g, dt, activated=False):
        x = randn(g, N, H, W) * 1.5
        pred = torch.sigmoid(x) if activated else x
        return T(pred, dt), T((torch.rand(N, H, W, generator=g) < 0.4).double(), dt)

    def soft(g, dt):
        return T(randn(g, N, H, W) * 1.5, dt), T(unif(g, 0, 1, N, H, W), dt)

    def points(g, dt):
        return T(randn(g, N, 7) * 1.5, dt), T((torch.rand(N, 7, generator=g) < 0.5).double(), dt)

    w_n = lambda g, p, t, dt: pos_weight(g, (N,), dt)  # noqa: E731
    add_mode(L, "mask-NxHxW", {}, masks, {"none": None, "N": w_n}, full=True, grad_targets=[[1]])
    add_mode(L, "soft-NxHxW", {}, soft, {"none": None, "N": w_n}, grad_targets=[[1]], afs=ONE_AF)
    add_mode(L, "points-NxP", {}, points, {"N": w_n}, grad_targets=[[1]], afs=ONE_AF)
    add_mode(L, "mask-NxHxW/naive_dice", {"naive_dice": True}, soft, {"none": None, "N": w_n}, grad_targets=[[1]])
    add_mode(L, "mask-NxHxW/eps-0.1", {"eps": 0.1}, soft, {"N": w_n}, grad_targets=[[1]], afs=ONE_AF)
    add_mode(
        L,
        "mask-NxHxW/naive_dice/eps-0.1",
        {"naive_dice": True, "eps": 0.1},
        soft,
        {"none": None},
        grad_targets=[[1]],
        afs=ONE_AF,
    )
    add_mode(
        L,
        "activate-False",
        {"activate": False},
        lambda g, dt: masks(g, dt, True),
        {"none": None, "N": w_n},
        grad_targets=[[1]],
        afs=ONE_AF,
    )
    add_mode(
        L,
        "activate-False/use_sigmoid-False",
        {"activate": False, "use_sigmoid": False},
        lambda g, dt: masks(g, dt, True),
        {"none": None},
        grad_targets=[[1]],
        afs=ONE_AF,
    )
    add_overrides(L, "mask-NxHxW", {}, masks, weight_fn=w_n, grad_targets=[[1]])

    for dt in DTYPES:
        p, t = cached(f"{L}/mask-NxHxW/{dt}", lambda g, dt=dt: masks(g, dt))
        w = cached(f"{L}/mask-NxHxW/{dt}/weight-N", lambda g, dt=dt: w_n(g, None, None, dt))
        # reduction_override and avg_factor positionally, in mmdet's order
        run_case(
            f"{L}/positional-reduction_override-then-avg_factor/mean-3.7/{dt}",
            _cfg(L, "sum"),
            [p, t, w, "mean", 3.7],
            {},
            [[0], [1]],
            dt,
        )
        run_case(f"{L}/positional-reduction_override/none/{dt}", _cfg(L), [p, t, None, "none"], {}, [[0], [1]], dt)
    p, t = cached(f"{L}/mask-NxHxW/float32", lambda g: masks(g, "float32"))
    run_case(f"{L}/int64-target/mean/float32", _cfg(L), [p, t.long()], {}, [[0]])
    run_case(f"{L}/bool-target/sum/float32", _cfg(L, "sum"), [p, t.bool()], {}, [[0]])
    run_case(f"{L}/pred-Nx1xHxW-target-NxHxW/mean/float32", _cfg(L), [p.unsqueeze(1), t], {}, [[0], [1]])
    p64, t64 = cached(f"{L}/mask-NxHxW/float64", lambda g: masks(g, "float64"))
    run_case(
        f"{L}/float64-target-rounded-to-float32/none/float64",
        _cfg(L, "none"),
        [p64, t64 * 0.3 + 0.1],
        {},
        [[0], [1]],
        "float64",
    )

    run_case(f"{L}/error-use_sigmoid-False-activate-True/float32", _cfg(L, use_sigmoid=False), [p, t], {}, [[0]])
    run_case(
        f"{L}/error-weight-Nx1/float32", _cfg(L), [p, t, pos_weight(gen("dice-wN1"), (N, 1), "float32")], {}, [[0]]
    )
    run_case(
        f"{L}/error-weight-length/float32", _cfg(L), [p, t, pos_weight(gen("dice-w4"), (N - 1,), "float32")], {}, [[0]]
    )
    run_case(f"{L}/error-target-shape/float32", _cfg(L), [p, t[:, :3]], {}, [[0]])
    run_case(f"{L}/error-pred-1d/float32", _cfg(L), [p[:, 0, 0], t[:, 0, 0]], {}, [[0]])
    run_case(f"{L}/error-sum-with-avg_factor/float32", _cfg(L, "sum"), [p, t], {"avg_factor": 3.7}, [[0]])
    run_case(f"{L}/error-invalid-reduction_override/float32", _cfg(L), [p, t, None, "max"], {}, [[0]])
    # a target of [N, 1] broadcasts in the product but not in sum(t^2): mmdet returns a number
    run_case(f"{L}/refuse-target-Nx1-broadcasts/mean/float32", _cfg(L), [p, t[:, :1, 0]], {}, [[0]], ours="refuse")


# --------------------------------------------------------------------------------------------------
# MultiPosCrossEntropyLoss
# --------------------------------------------------------------------------------------------------
def multipos_cases():
    L, N, M = "MultiPosCrossEntropyLoss", 6, 5

    def pairs(g, dt, int_labels=False, others=False):
        score = T(randn(g, N, M) * 2.0, dt)
        lab = (torch.rand(N, M, generator=g) < 0.4).double()
        lab[0, 1] = 1.0
        lab[0, 3] = 0.0
        lab[1] = 0.0  # no positive: loss 0
        lab[2] = 1.0  # no negative: loss 0
        if others:  # neither >= 1 nor == 0: a logit of 0 on both sides in mmdet
            lab[3, 0] = -1.0
            lab[4, 2] = 0.5
            lab[1, 4] = -1.0
        return score, (lab.long() if int_labels else T(lab, dt))

    w_n = lambda g, p, t, dt: pos_weight(g, (N,), dt)  # noqa: E731
    add_mode(L, "float-labels", {}, pairs, {"none": None, "N": w_n}, full=True, grad_targets=[[1]])
    add_mode(L, "int64-labels", {}, lambda g, dt: pairs(g, dt, True), {"none": None, "N": w_n}, afs=ONE_AF)
    add_mode(
        L,
        "labels-neither-0-nor-positive",
        {},
        lambda g, dt: pairs(g, dt, others=True),
        {"none": None, "N": w_n},
        afs=ONE_AF,
    )
    add_overrides(L, "float-labels", {}, pairs, weight_fn=w_n)

    p, t = cached(f"{L}/float-labels/float32", lambda g: pairs(g, "float32"))
    run_case(f"{L}/large-logits/none/float32", _cfg(L, "none"), [p * 40, t], {}, [[0]])
    run_case(f"{L}/error-shape-mismatch/float32", _cfg(L), [p, t[:, :4]], {}, [[0]])
    run_case(f"{L}/error-3d/float32", _cfg(L), [p.unsqueeze(-1), t.unsqueeze(-1)], {}, [[0]])
    run_case(f"{L}/error-invalid-reduction_override/float32", _cfg(L), [p, t], {"reduction_override": "max"}, [[0]])
    run_case(
        f"{L}/refuse-weight-Nx1-broadcasts/mean/float32",
        _cfg(L),
        [p, t, pos_weight(gen("mpce-wN1"), (N, 1), "float32")],
        {},
        [[0]],
        ours="refuse",
    )


# --------------------------------------------------------------------------------------------------
# CrossEntropyCustomLoss (CrossEntropyLoss's forward; num_classes sizes the classifier)
# --------------------------------------------------------------------------------------------------
def ce_custom_cases():
    L, N, K = "CrossEntropyCustomLoss", 6, 4  # K foreground classes
    w_n = lambda g, p, t, dt: pos_weight(g, (N,), dt)  # noqa: E731

    def softmax_in(g, dt, force=()):
        score = T(randn(g, N, K + 1) * 1.5, dt)  # K classes + background
        lab = randint(g, 0, K + 1, N)
        lab[1] = K
        for i, v in force:
            lab[i] = v
        return score, lab

    def sigmoid_in(g, dt):
        score = T(randn(g, N, K) * 1.5, dt)
        lab = randint(g, 0, K, N)
        lab[1] = K  # background
        lab[4] = -100  # ignored
        return score, lab

    add_mode(L, "softmax", {"num_classes": K}, softmax_in, {"none": None, "N": w_n}, full=True)
    add_mode(
        L,
        "softmax/class_weight",
        {"num_classes": K, "class_weight": [0.5, 1.0, 2.0, 0.8, 1.3]},
        softmax_in,
        {"N": w_n},
        afs=ONE_AF,
    )
    add_mode(
        L,
        "softmax/ignore_index-2/avg_non_ignore",
        {"num_classes": K, "ignore_index": 2, "avg_non_ignore": True},
        lambda g, dt: softmax_in(g, dt, [(0, 2), (3, 2)]),
        {"none": None},
        afs=ONE_AF,
    )
    add_overrides(L, "softmax", {"num_classes": K}, softmax_in, weight_fn=w_n)
    # sigmoid: mmdet computes BCE in float32 (labels cast to float32): float64 compared at float32 tolerance
    for red in ("none", "mean", "sum"):
        for dt in DTYPES:
            base = f"{L}/sigmoid/{dt}"
            p, lab = cached(base, lambda g, dt=dt: sigmoid_in(g, dt))
            w = cached(f"{base}/weight-N", lambda g, dt=dt: w_n(g, None, None, dt))
            run_case(
                f"{L}/sigmoid/weight-N/{red}/lw-0.7/{dt}",
                _cfg(L, red, 0.7, use_sigmoid=True, num_classes=K),
                [p, lab, w],
                {},
                [[0]],
                dt,
                ours="float32" if dt == "float64" else None,
            )
    p, lab = cached(f"{L}/sigmoid/float32", lambda g: sigmoid_in(g, "float32"))
    run_case(
        f"{L}/sigmoid/avg_non_ignore/class_weight/mean/float32",
        _cfg(L, use_sigmoid=True, num_classes=K, avg_non_ignore=True, class_weight=[0.5, 1.0, 2.0, 0.8]),
        [p, lab],
        {},
        [[0]],
    )
    run_case(
        f"{L}/sigmoid/reduction_override-none-over-mean/af-3.7/float32",
        _cfg(L, use_sigmoid=True, num_classes=K),
        [p, lab],
        {"reduction_override": "none", "avg_factor": 3.7},
        [[0]],
    )
    # mask mode: [N, K, H, W] logits, [N, H, W] targets, RoI classes in the weight slot
    for dt in DTYPES:
        g = gen(f"{L}/mask/{dt}")
        pm, tm, lm = T(randn(g, N, K, 3, 3), dt), T(unif(g, 0, 1, N, 3, 3), dt), randint(g, 0, K, N)
        run_case(
            f"{L}/mask/mean/lw-0.7/{dt}",
            _cfg(L, "mean", 0.7, use_mask=True, num_classes=K),
            [pm, tm, lm],
            {},
            [[0], [1]],
            dt,
            ours="float32" if dt == "float64" else None,
        )
    # num_classes does not enter the loss: a classifier wider than num_classes + 1 computes all the same
    p, lab = cached(f"{L}/softmax/float32", lambda g: softmax_in(g, "float32"))
    run_case(
        f"{L}/softmax/num_classes-2-does-not-enter-the-loss/mean/float32", _cfg(L, num_classes=2), [p, lab], {}, [[0]]
    )
    run_case(f"{L}/error-num_classes-default-minus1/float32", _cfg(L), [p, lab], {}, [[0]])
    run_case(
        f"{L}/error-use_sigmoid-and-use_mask/float32",
        _cfg(L, use_sigmoid=True, use_mask=True, num_classes=K),
        [p, lab],
        {},
        [[0]],
    )
    run_case(
        f"{L}/softmax/error-label-out-of-range/float32",
        _cfg(L, num_classes=K),
        [p, torch.tensor([0, 1, 5, 2, 3, 4])],
        {},
        [[0]],
    )


# --------------------------------------------------------------------------------------------------
# FocalCustomLoss (always logits, class-index targets only)
# --------------------------------------------------------------------------------------------------
def focal_custom_cases():
    L, N, C = "FocalCustomLoss", 6, 4

    def index_t(g, dt):
        pred = T(randn(g, N, C) * 1.5, dt)
        lab = randint(g, 0, C + 1, N)
        lab[0] = C  # background
        lab[2] = 1
        return pred, lab

    w_n = lambda g, p, t, dt: pos_weight(g, (N,), dt)  # noqa: E731
    w_nc = lambda g, p, t, dt: pos_weight(g, (N, C), dt)  # noqa: E731
    w_flat = lambda g, p, t, dt: pos_weight(g, (N * C,), dt)  # noqa: E731
    nc = {"num_classes": C}
    add_mode(L, "index-target", nc, index_t, {"none": None, "N": w_n}, full=True)
    add_mode(L, "index-target", nc, index_t, {"NxC": w_nc, "flat-NC": w_flat})
    add_mode(L, "index-target/gamma-1.5/alpha-0.5", {**nc, "gamma": 1.5, "alpha": 0.5}, index_t, {"N": w_n}, afs=ONE_AF)
    # activated=True has no effect in mmdet 3.3: pred is still taken as logits
    add_mode(L, "index-target/activated-True-ignored", {**nc, "activated": True}, index_t, {"none": None}, afs=ONE_AF)
    add_overrides(L, "index-target", nc, index_t, weight_fn=w_n)

    p, lab = cached(f"{L}/index-target/float32", lambda g: index_t(g, "float32"))
    run_case(f"{L}/error-num_classes-default-minus1/float32", _cfg(L), [p, lab], {}, [[0]])
    run_case(f"{L}/error-use_sigmoid-False/float32", _cfg(L, use_sigmoid=False, num_classes=C), [p, lab], {}, [[0]])
    onehot = torch.nn.functional.one_hot(lab, C + 1)[:, :C].contiguous()
    run_case(f"{L}/error-onehot-target/float32", _cfg(L, **nc), [p, onehot], {}, [[0]])
    run_case(f"{L}/error-float-target/float32", _cfg(L, **nc), [p, onehot.float()], {}, [[0]])
    run_case(f"{L}/error-target-above-C/float32", _cfg(L, **nc), [p, torch.tensor([0, 1, 5, 2, 3, 4])], {}, [[0]])
    run_case(f"{L}/error-target-negative/float32", _cfg(L, **nc), [p, torch.tensor([0, 1, -1, 2, 3, 4])], {}, [[0]])
    run_case(
        f"{L}/error-weight-length/float32",
        _cfg(L, **nc),
        [p, lab, pos_weight(gen("fcl-w5"), (5,), "float32")],
        {},
        [[0]],
    )
    run_case(
        f"{L}/error-invalid-reduction_override/float32", _cfg(L, **nc), [p, lab], {"reduction_override": "max"}, [[0]]
    )


def cases():
    varifocal_cases()
    gaussian_focal_cases()
    kd_cases()
    dice_cases()
    multipos_cases()
    ce_custom_cases()
    focal_custom_cases()
