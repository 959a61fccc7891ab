"""mmdet reference cases for the first losses: CrossEntropy, Focal, QFL, DFL, L1/SmoothL1/MSE/BalancedL1,
IoU/GIoU. Run through ``make_mmdet_fixtures.py core``."""

# ruff: noqa: N806  (math-style names: N/C sizes, L = loss name)
from __future__ import annotations

import torch
from mmdet_harness import (
    AFS,
    DTYPES,
    RED,
    TORCH_DTYPES,
    T,
    add_mode,
    add_overrides,
    box_pair,
    cached,
    gen,
    pos_weight,
    randint,
    randn,
    reg_pair,
    run_case,
    unif,
)


# --------------------------------------------------------------------------------------------------
# CrossEntropyLoss
# --------------------------------------------------------------------------------------------------
def ce_cases():
    L, N, C = "CrossEntropyLoss", 6, 5
    cw = [0.5, 1.0, 2.0, 0.8, 1.3]
    w_n = {"none": None, "N": lambda g, p, t, dt: pos_weight(g, (N,), dt)}
    w_none = {"none": None}

    def sm_labels(g, dt, force=None):
        pred = T(randn(g, N, C) * 1.5, dt)
        lab = randint(g, 0, C, N)
        if force is not None:
            for i, v in force:
                lab[i] = v
        return pred, lab

    # ---- softmax ---------------------------------------------------------------------------------
    add_mode(L, "softmax", {}, lambda g, dt: sm_labels(g, dt), w_n, full=True)
    add_mode(L, "softmax/class_weight", {"class_weight": cw}, lambda g, dt: sm_labels(g, dt), w_n)
    for ani in (False, True):
        add_mode(
            L,
            f"softmax/ignore_index-cfg-2/avg_non_ignore-{ani}",
            {"ignore_index": 2, "avg_non_ignore": ani},
            lambda g, dt: sm_labels(g, dt, force=[(1, 2), (4, 2)]),
            w_n,
        )
        add_mode(
            L,
            f"softmax/ignore_index-kwarg-2/avg_non_ignore-{ani}",
            {"avg_non_ignore": ani},
            lambda g, dt: sm_labels(g, dt, force=[(0, 2), (3, 2)]),
            w_none,
            extra_kwargs={"ignore_index": 2},
        )
        add_mode(
            L,
            f"softmax/default-ignore-minus100/avg_non_ignore-{ani}",
            {"avg_non_ignore": ani},
            lambda g, dt: sm_labels(g, dt, force=[(2, -100), (5, -100)]),
            w_n,
        )
    add_mode(
        L,
        "softmax/class_weight+default-ignore-minus100/avg_non_ignore-True",
        {"class_weight": cw, "avg_non_ignore": True},
        lambda g, dt: sm_labels(g, dt, force=[(2, -100)]),
        w_none,
    )
    # kwarg ignore_index overrides the cfg one
    add_mode(
        L,
        "softmax/ignore_index-cfg-2-kwarg-3",
        {"ignore_index": 2, "avg_non_ignore": True},
        lambda g, dt: sm_labels(g, dt, force=[(0, 2), (1, 3), (4, 3)]),
        w_none,
        extra_kwargs={"ignore_index": 3},
        afs=(None,),
    )
    add_overrides(
        L, "softmax", {}, lambda g, dt: sm_labels(g, dt), weight_fn=lambda g, p, t, dt: pos_weight(g, (N,), dt)
    )
    # quirk: weight [N,1] broadcasts against the [N] loss into [N,N] silently
    p, lab = cached(f"{L}/softmax/float32", lambda g: sm_labels(g, "float32"))
    run_case(
        f"{L}/softmax/quirk-weight-Nx1-broadcasts/mean/float32",
        {"type": L, "reduction": "mean", "loss_weight": 1.0},
        [p, lab, pos_weight(gen("ce-quirk-w"), (N, 1), "float32")],
        {},
        [[0]],
        "float32",
    )
    run_case(
        f"{L}/softmax/quirk-weight-Nx1-broadcasts/none/float32",
        {"type": L, "reduction": "none", "loss_weight": 1.0},
        [p, lab, pos_weight(gen("ce-quirk-w"), (N, 1), "float32")],
        {},
        [[0]],
        "float32",
    )

    # ---- sigmoid, index labels [N] (C == background, -100 ignored) -------------------------------
    def sig_index(g, dt, ignore=-100):
        pred = T(randn(g, N, C) * 1.5, dt)
        lab = randint(g, 0, C, N)
        lab[1] = C  # background
        lab[3] = C  # background
        lab[4] = ignore  # ignored
        return pred, lab

    add_mode(L, "sigmoid/index-labels", {"use_sigmoid": True}, lambda g, dt: sig_index(g, dt), w_n, full=True)
    add_mode(
        L,
        "sigmoid/index-labels/class_weight",
        {"use_sigmoid": True, "class_weight": cw},
        lambda g, dt: sig_index(g, dt),
        w_n,
    )
    for ani in (False, True):
        add_mode(
            L,
            f"sigmoid/index-labels/ignore_index-cfg-2/avg_non_ignore-{ani}",
            {"use_sigmoid": True, "ignore_index": 2, "avg_non_ignore": ani},
            lambda g, dt: sig_index(g, dt, ignore=2),
            w_n if ani else w_none,
        )
        add_mode(
            L,
            f"sigmoid/index-labels/default-ignore/avg_non_ignore-{ani}",
            {"use_sigmoid": True, "avg_non_ignore": ani},
            lambda g, dt: sig_index(g, dt),
            w_none,
            reductions=("mean",),
        )
    add_mode(
        L,
        "sigmoid/index-labels/ignore_index-kwarg-2",
        {"use_sigmoid": True, "avg_non_ignore": True},
        lambda g, dt: sig_index(g, dt, ignore=2),
        w_none,
        extra_kwargs={"ignore_index": 2},
    )

    # ---- sigmoid, same-shape targets [N,C] ------------------------------------------------------
    w_nc = {"none": None, "NxC": lambda g, p, t, dt: pos_weight(g, (N, C), dt)}

    def sig_soft(g, dt):
        return T(randn(g, N, C) * 1.5, dt), T(unif(g, 0, 1, N, C), dt)

    def sig_binary(g, dt, ignore=True):
        pred = T(randn(g, N, C) * 1.5, dt)
        tgt = (torch.rand(N, C, generator=g) < 0.35).double()
        if ignore:
            tgt[2, 1] = -1.0
            tgt[5, 3] = -1.0
        return pred, T(tgt, dt)

    def sig_binary_int(g, dt):
        pred = T(randn(g, N, C) * 1.5, dt)
        return pred, (torch.rand(N, C, generator=g) < 0.35).long()

    add_mode(L, "sigmoid/soft-target", {"use_sigmoid": True}, sig_soft, w_nc, full=True, grad_targets=[[1]])
    add_mode(L, "sigmoid/binary-float-target-with-minus1", {"use_sigmoid": True}, sig_binary, w_nc, grad_targets=[[1]])
    add_mode(
        L,
        "sigmoid/binary-float-target-with-minus1/avg_non_ignore-True",
        {"use_sigmoid": True, "avg_non_ignore": True},
        sig_binary,
        w_none,
        grad_targets=[[1]],
        reductions=("mean",),
    )
    add_mode(L, "sigmoid/binary-int64-target", {"use_sigmoid": True}, sig_binary_int, w_nc)
    add_mode(
        L,
        "sigmoid/soft-target/class_weight",
        {"use_sigmoid": True, "class_weight": cw},
        sig_soft,
        w_none,
        grad_targets=[[1]],
    )
    add_overrides(
        L,
        "sigmoid/index-labels",
        {"use_sigmoid": True},
        lambda g, dt: sig_index(g, dt),
        weight_fn=lambda g, p, t, dt: pos_weight(g, (N,), dt),
    )
    # weight [N] with same-shape targets: shape mismatch against [N,C]
    p, t = cached(f"{L}/sigmoid/soft-target/float32", lambda g: sig_soft(g, "float32"))
    run_case(
        f"{L}/sigmoid/soft-target/error-weight-N/mean/float32",
        {"type": L, "use_sigmoid": True, "reduction": "mean", "loss_weight": 1.0},
        [p, t, pos_weight(gen("ce-sig-wN"), (N,), "float32")],
        {},
        [[0], [1]],
        "float32",
    )

    # ---- use_mask: pred [N,C,H,W], target [N,H,W], label [N] in the weight slot ------------------
    Cm, H = 4, 3

    def mask_in(g, dt, c=Cm):
        pred = T(randn(g, N, c, H, H) * 1.5, dt)
        tgt = T(unif(g, 0, 1, N, H, H), dt)
        lab = randint(g, 0, c, N)
        return pred, tgt, lab

    for dt in DTYPES:
        pred, tgt, lab = cached(f"{L}/mask/{dt}", lambda g, dt=dt: mask_in(g, dt))
        for red in RED:
            for af in AFS:
                for lw in (1.0, 0.7) if (red == "mean" and af is None) else (1.0,):
                    kw = {} if af is None else {"avg_factor": af}
                    run_case(
                        f"{L}/mask/{red}/af-{af if af is not None else 'none'}/lw-{lw}/{dt}",
                        {"type": L, "use_mask": True, "reduction": red, "loss_weight": lw},
                        [pred, tgt, lab],
                        kw,
                        [[0], [1]],
                        dt,
                    )
        run_case(
            f"{L}/mask/reduction_override-mean-over-sum/{dt}",
            {"type": L, "use_mask": True, "reduction": "sum", "loss_weight": 1.0},
            [pred, tgt, lab],
            {"reduction_override": "mean"},
            [[0], [1]],
            dt,
        )
    pred, tgt, lab = cached(f"{L}/mask/float32", lambda g: mask_in(g, "float32"))
    run_case(
        f"{L}/mask/error-ignore_index-cfg/mean/float32",
        {"type": L, "use_mask": True, "ignore_index": 2, "reduction": "mean", "loss_weight": 1.0},
        [pred, tgt, lab],
        {},
        [[0], [1]],
        "float32",
    )
    # class_weight [C] goes to BCE's `weight` against the [N,H,W] slice: errors unless it broadcasts
    run_case(
        f"{L}/mask/error-class_weight-len-C4-vs-W3/mean/float32",
        {"type": L, "use_mask": True, "class_weight": [0.5, 1.0, 2.0, 0.8], "reduction": "mean", "loss_weight": 1.0},
        [pred, tgt, lab],
        {},
        [[0], [1]],
        "float32",
    )
    p3, t3, l3 = cached(f"{L}/mask-C3/float32", lambda g: mask_in(g, "float32", c=3))
    run_case(
        f"{L}/mask/quirk-class_weight-len-C3-broadcasts-over-W/mean/float32",
        {"type": L, "use_mask": True, "class_weight": [0.5, 1.0, 2.0], "reduction": "mean", "loss_weight": 1.0},
        [p3, t3, l3],
        {},
        [[0], [1]],
        "float32",
    )
    # use_sigmoid and use_mask together: rejected at build time
    run_case(
        f"{L}/error-use_sigmoid-and-use_mask/float32",
        {"type": L, "use_sigmoid": True, "use_mask": True, "reduction": "mean", "loss_weight": 1.0},
        [pred, tgt, lab],
        {},
        [[0]],
        "float32",
    )


# --------------------------------------------------------------------------------------------------
# FocalLoss
# --------------------------------------------------------------------------------------------------
def focal_cases():
    L, N, C = "FocalLoss", 6, 4

    def index_t(g, dt, activated=False):
        x = randn(g, N, C) * 1.5
        pred = T(torch.sigmoid(x) if activated else x, dt)
        lab = randint(g, 0, C + 1, N)
        lab[0] = C  # background
        lab[2] = 1
        return pred, lab

    def onehot_t(g, dt, activated=False):
        x = randn(g, N, C) * 1.5
        pred = T(torch.sigmoid(x) if activated else x, dt)
        lab = randint(g, 0, C + 1, N)
        lab[0] = C
        return pred, torch.nn.functional.one_hot(lab, C + 1)[:, :C].contiguous()

    def soft_t(g, dt):
        return T(randn(g, N, C) * 1.5, dt), T(unif(g, 0, 1, N, C), dt)

    wN = lambda g, p, t, dt: pos_weight(g, (N,), dt)  # noqa: E731
    wNC = lambda g, p, t, dt: pos_weight(g, (N, C), dt)  # noqa: E731
    wflat = lambda g, p, t, dt: pos_weight(g, (N * C,), dt)  # noqa: E731

    add_mode(L, "index-target", {}, index_t, {"none": None, "N": wN}, full=True)
    add_mode(L, "index-target", {}, index_t, {"NxC": wNC, "flat-NC": wflat})
    add_mode(L, "onehot-int64-target", {}, onehot_t, {"none": None, "N": wN, "NxC": wNC})
    add_mode(L, "soft-float-target", {}, soft_t, {"none": None, "N": wN, "NxC": wNC}, grad_targets=[[1]])
    for gamma, alpha in ((1.5, 0.25), (2.0, 0.5), (1.5, 0.5)):
        add_mode(
            L, f"index-target/gamma-{gamma}/alpha-{alpha}", {"gamma": gamma, "alpha": alpha}, index_t, {"none": None}
        )
    add_mode(
        L, "soft-float-target/gamma-1.5/alpha-0.5", {"gamma": 1.5, "alpha": 0.5}, soft_t, {"N": wN}, grad_targets=[[1]]
    )
    add_mode(
        L,
        "activated/index-target",
        {"activated": True},
        lambda g, dt: index_t(g, dt, activated=True),
        {"none": None, "N": wN},
    )
    add_mode(
        L,
        "activated/onehot-int64-target",
        {"activated": True},
        lambda g, dt: onehot_t(g, dt, activated=True),
        {"none": None, "NxC": wNC},
    )
    add_mode(
        L,
        "activated/index-target/gamma-1.5/alpha-0.5",
        {"activated": True, "gamma": 1.5, "alpha": 0.5},
        lambda g, dt: index_t(g, dt, activated=True),
        {"flat-NC": wflat},
        afs=(None,),
    )
    add_overrides(L, "index-target", {}, index_t, weight_fn=wN)
    p, t = cached(f"{L}/index-target/float32", lambda g: index_t(g, "float32"))
    run_case(
        f"{L}/index-target/error-invalid-reduction_override/float32",
        {"type": L, "reduction": "mean", "loss_weight": 1.0},
        [p, t],
        {"reduction_override": "max"},
        [[0]],
        "float32",
    )
    run_case(
        f"{L}/error-use_sigmoid-False/float32",
        {"type": L, "use_sigmoid": False, "reduction": "mean", "loss_weight": 1.0},
        [p, t],
        {},
        [[0]],
        "float32",
    )


# --------------------------------------------------------------------------------------------------
# QualityFocalLoss
# --------------------------------------------------------------------------------------------------
def qfl_cases():
    L, N, C = "QualityFocalLoss", 6, 4

    def tuple_t(g, dt, activated=False):
        x = randn(g, N, C) * 1.5
        pred = T(torch.sigmoid(x) if activated else x, dt)
        lab = randint(g, 0, C, N)
        lab[1] = C
        lab[4] = C
        score = T(unif(g, 0.05, 0.95, N), dt)
        return pred, [lab, score]

    def dense_t(g, dt, activated=False):
        x = randn(g, N, C) * 1.5
        pred = T(torch.sigmoid(x) if activated else x, dt)
        tgt = torch.zeros(N, C, dtype=torch.float64)
        for i, c in ((0, 2), (2, 0), (3, 3), (5, 1)):
            tgt[i, c] = float(unif(g, 0.05, 0.95, 1))
        return pred, T(tgt, dt)

    wN = {"none": None, "N": lambda g, p, t, dt: pos_weight(g, (N,), dt)}
    add_mode(L, "tuple-target", {}, tuple_t, wN, full=True, grad_targets=[[1, 1]])
    add_mode(L, "dense-target", {}, dense_t, wN, grad_targets=[[1]])
    add_mode(L, "tuple-target/beta-1.0", {"beta": 1.0}, tuple_t, {"N": wN["N"]}, grad_targets=[[1, 1]])
    add_mode(L, "dense-target/beta-1.0", {"beta": 1.0}, dense_t, {"none": None}, grad_targets=[[1]])
    add_mode(
        L,
        "activated/tuple-target",
        {"activated": True},
        lambda g, dt: tuple_t(g, dt, activated=True),
        wN,
        grad_targets=[[1, 1]],
    )
    add_mode(
        L,
        "activated/dense-target",
        {"activated": True},
        lambda g, dt: dense_t(g, dt, activated=True),
        {"N": wN["N"]},
        grad_targets=[[1]],
    )
    add_overrides(L, "tuple-target", {}, tuple_t, weight_fn=wN["N"], grad_targets=[[1, 1]])
    p, t = cached(f"{L}/tuple-target/float32", lambda g: tuple_t(g, "float32"))
    run_case(
        f"{L}/tuple-target/quirk-weight-Nx1-broadcasts/none/float32",
        {"type": L, "reduction": "none", "loss_weight": 1.0},
        [p, t, pos_weight(gen("qfl-quirk"), (N, 1), "float32")],
        {},
        [[0], [1, 1]],
        "float32",
    )


# --------------------------------------------------------------------------------------------------
# DistributionFocalLoss
# --------------------------------------------------------------------------------------------------
def dfl_cases():
    L, N, n = "DistributionFocalLoss", 6, 7

    def inputs(g, dt):
        pred = T(randn(g, N, n + 1) * 1.5, dt)
        lab = []
        while len(lab) < N:
            v = float(unif(g, 0, n, 1))
            if abs(v - round(v)) > 0.05:
                lab.append(v)
        return pred, T(torch.tensor(lab, dtype=torch.float64), dt)

    wN = {"none": None, "N": lambda g, p, t, dt: pos_weight(g, (N,), dt)}
    add_mode(L, "float-label", {}, inputs, wN, full=True, grad_targets=[[1]])
    add_overrides(L, "float-label", {}, inputs, weight_fn=wN["N"], grad_targets=[[1]])
    for dt in DTYPES:
        p, t = cached(f"{L}/float-label/{dt}", lambda g, dt=dt: inputs(g, dt))
        t2 = t.clone()
        t2[3] = float(n)
        run_case(
            f"{L}/error-label-equals-n/mean/{dt}",
            {"type": L, "reduction": "mean", "loss_weight": 1.0},
            [p, t2],
            {},
            [[0], [1]],
            dt,
        )


# --------------------------------------------------------------------------------------------------
# L1 / SmoothL1 / MSE / BalancedL1
# --------------------------------------------------------------------------------------------------
def reg_cases():
    N = 5
    w4 = lambda g, p, t, dt: pos_weight(g, (N, 4), dt)  # noqa: E731
    w1 = lambda g, p, t, dt: pos_weight(g, (N, 1), dt)  # noqa: E731
    mk = lambda g, dt: reg_pair(g, N, dt)  # noqa: E731
    specs = [
        ("L1Loss", "default", {}),
        ("SmoothL1Loss", "beta-1.0", {"beta": 1.0}),
        ("MSELoss", "default", {}),
        ("BalancedL1Loss", "default", {}),
    ]
    for L, mode, extra in specs:
        add_mode(L, mode, extra, mk, {"none": None, "Nx4": w4}, full=True, grad_targets=[[1]])
        add_mode(L, mode, extra, mk, {"Nx1": w1}, grad_targets=[[1]])
        add_overrides(L, mode, extra, mk, weight_fn=w4, grad_targets=[[1]])
        # all-zero weight, every reduction
        for dt in DTYPES:
            p, t = cached(f"{L}/{mode}/{dt}", lambda g, dt=dt: mk(g, dt))
            shapes = [(N, 4)] + ([(N, 1), (N,)] if dt == "float32" else [])
            for shp in shapes:
                wz = torch.zeros(shp, dtype=TORCH_DTYPES[dt])
                sname = "x".join(str(s) if s != N else "N" for s in shp)
                for red in RED:
                    run_case(
                        f"{L}/{mode}/zero-weight-{sname}/{red}/lw-0.7/{dt}",
                        {"type": L, **extra, "reduction": red, "loss_weight": 0.7},
                        [p, t, wz],
                        {},
                        [[0], [1]],
                        dt,
                    )
            run_case(
                f"{L}/{mode}/zero-weight-Nx4/sum/af-3.7/lw-1.0/{dt}",
                {"type": L, **extra, "reduction": "sum", "loss_weight": 1.0},
                [p, t, torch.zeros(N, 4, dtype=TORCH_DTYPES[dt])],
                {"avg_factor": 3.7},
                [[0], [1]],
                dt,
            )
            # empty inputs
            pe = torch.zeros(0, 4, dtype=TORCH_DTYPES[dt])
            te = torch.zeros(0, 4, dtype=TORCH_DTYPES[dt])
            for red in RED:
                run_case(
                    f"{L}/{mode}/empty-0x4/{red}/lw-1.0/{dt}",
                    {"type": L, **extra, "reduction": red, "loss_weight": 1.0},
                    [pe, te],
                    {},
                    [[0], [1]],
                    dt,
                )
            run_case(
                f"{L}/{mode}/empty-0x4/mean/af-3.7/lw-1.0/{dt}",
                {"type": L, **extra, "reduction": "mean", "loss_weight": 1.0},
                [pe, te],
                {"avg_factor": 3.7},
                [[0], [1]],
                dt,
            )
    # loss-specific options
    add_mode("SmoothL1Loss", "beta-0.5", {"beta": 0.5}, mk, {"none": None, "Nx4": w4}, grad_targets=[[1]])
    add_mode(
        "BalancedL1Loss",
        "alpha-0.3/gamma-1.0/beta-0.8",
        {"alpha": 0.3, "gamma": 1.0, "beta": 0.8},
        mk,
        {"none": None, "Nx4": w4},
        grad_targets=[[1]],
    )
    add_mode(
        "BalancedL1Loss",
        "alpha-0.5/gamma-2.0/beta-0.5",
        {"alpha": 0.5, "gamma": 2.0, "beta": 0.5},
        mk,
        {"Nx1": w1},
        grad_targets=[[1]],
    )
    p, t = cached("L1Loss/default/float32", lambda g: mk(g, "float32"))
    run_case(
        "L1Loss/default/error-invalid-reduction_override/float32",
        {"type": "L1Loss", "reduction": "mean", "loss_weight": 1.0},
        [p, t],
        {"reduction_override": "max"},
        [[0], [1]],
        "float32",
    )
    run_case(
        "L1Loss/default/error-shape-mismatch/float32",
        {"type": "L1Loss", "reduction": "mean", "loss_weight": 1.0},
        [p, t[:, :3]],
        {},
        [[0], [1]],
        "float32",
    )
    # the walkthrough example
    wp = torch.tensor([[0.0, 2.0, 3.0, 0.0], [0.0, 2.0, 3.0, 0.0]])
    wt = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ww = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    run_case(
        "L1Loss/walkthrough/unweighted/mean/float32",
        {"type": "L1Loss", "reduction": "mean", "loss_weight": 1.0},
        [wp, wt],
        {},
        [[0], [1]],
        "float32",
    )
    run_case(
        "L1Loss/walkthrough/weighted/mean/float32",
        {"type": "L1Loss", "reduction": "mean", "loss_weight": 1.0},
        [wp, wt, ww],
        {},
        [[0], [1]],
        "float32",
    )


# --------------------------------------------------------------------------------------------------
# IoULoss / GIoULoss
# --------------------------------------------------------------------------------------------------
def iou_cases():
    N = 6
    wN = lambda g, p, t, dt: pos_weight(g, (N,), dt)  # noqa: E731
    w4 = lambda g, p, t, dt: pos_weight(g, (N, 4), dt)  # noqa: E731
    mk = lambda g, dt: box_pair(g, N, dt)  # noqa: E731

    add_mode("IoULoss", "mode-log", {"mode": "log"}, mk, {"none": None, "N": wN}, full=True, grad_targets=[[1]])
    add_mode("IoULoss", "mode-log", {"mode": "log"}, mk, {"Nx4": w4}, grad_targets=[[1]])
    add_mode("IoULoss", "mode-linear", {"mode": "linear"}, mk, {"none": None, "N": wN}, grad_targets=[[1]])
    add_mode("IoULoss", "mode-square", {"mode": "square"}, mk, {"none": None, "Nx4": w4}, grad_targets=[[1]])
    add_mode("IoULoss", "mode-log/eps-0.01", {"mode": "log", "eps": 0.01}, mk, {"N": wN}, grad_targets=[[1]])
    add_mode("IoULoss", "linear-True", {"linear": True}, mk, {"none": None}, grad_targets=[[1]])
    add_overrides("IoULoss", "mode-log", {"mode": "log"}, mk, weight_fn=wN, grad_targets=[[1]])

    add_mode("GIoULoss", "default", {}, mk, {"none": None, "N": wN}, full=True, grad_targets=[[1]])
    add_mode("GIoULoss", "default", {}, mk, {"Nx4": w4}, grad_targets=[[1]])
    add_mode("GIoULoss", "eps-0.01", {"eps": 0.01}, mk, {"none": None}, grad_targets=[[1]])
    add_overrides("GIoULoss", "default", {}, mk, weight_fn=wN, grad_targets=[[1]])

    for L, mode, extra in (("IoULoss", "mode-log", {"mode": "log"}), ("GIoULoss", "default", {})):
        for dt in DTYPES:
            p, t = cached(f"{L}/{mode}/{dt}", lambda g, dt=dt: mk(g, dt))
            shapes = [(N,)] + ([(N, 4)] if dt == "float32" else [])
            for shp in shapes:
                wz = torch.zeros(shp, dtype=TORCH_DTYPES[dt])
                sname = "x".join(str(s) if s != N else "N" for s in shp)
                for red in RED:
                    run_case(
                        f"{L}/{mode}/zero-weight-{sname}/{red}/lw-0.7/{dt}",
                        {"type": L, **extra, "reduction": red, "loss_weight": 0.7},
                        [p, t, wz],
                        {},
                        [[0], [1]],
                        dt,
                    )
            pe = torch.zeros(0, 4, dtype=TORCH_DTYPES[dt])
            te = torch.zeros(0, 4, dtype=TORCH_DTYPES[dt])
            for red in RED:
                run_case(
                    f"{L}/{mode}/empty-0x4/{red}/lw-1.0/{dt}",
                    {"type": L, **extra, "reduction": red, "loss_weight": 1.0},
                    [pe, te],
                    {},
                    [[0], [1]],
                    dt,
                )
        p, t = cached(f"{L}/{mode}/float32", lambda g: mk(g, "float32"))
        run_case(
            f"{L}/{mode}/error-weight-Nx1/mean/float32",
            {"type": L, **extra, "reduction": "mean", "loss_weight": 1.0},
            [p, t, pos_weight(gen(f"{L}-wN1"), (N, 1), "float32")],
            {},
            [[0], [1]],
            "float32",
        )
    # iou mode name outside the allowed set: rejected at build time
    p, t = cached("IoULoss/mode-log/float32", lambda g: mk(g, "float32"))
    run_case(
        "IoULoss/error-mode-cube/float32",
        {"type": "IoULoss", "mode": "cube", "reduction": "mean", "loss_weight": 1.0},
        [p, t],
        {},
        [[0], [1]],
        "float32",
    )


def cases():
    ce_cases()
    focal_cases()
    qfl_cases()
    dfl_cases()
    reg_cases()
    iou_cases()
