"""mmdet reference cases for the stateful losses: SeesawLoss (``cum_samples``) and EQLV2Loss
(``pos_grad``, ``neg_grad``, ``pos_neg``). Run through ``make_mmdet_fixtures.py stateful``.

Sequences feed one module several batches and record its state after each; single calls cover the
reductions and the inputs mmdet refuses.
"""

# ruff: noqa: N803, N806  (math-style names: N/C sizes, L = loss name)
from __future__ import annotations

import torch
from mmdet_harness import AFS, DTYPES, RED, T, gen, pos_weight, randint, randn, run_case, run_sequence

SEESAW_STATE = ("cum_samples",)
EQLV2_STATE = ("pos_grad", "neg_grad", "pos_neg")


# --------------------------------------------------------------------------------------------------
# SeesawLoss: cls_score [N, C + 2], labels [N] in [0, C] (C = background)
# --------------------------------------------------------------------------------------------------
def seesaw_batch(key, dt, N=8, C=4, kind="mixed"):
    """Labels skewed towards class 0 (so the mitigation factor bites); ``kind`` "mixed", "all-fg" or "all-bg"."""
    g = gen(f"seesaw/{key}")
    score = T(randn(g, N, C + 2) * 1.5, dt)
    if kind == "all-bg":
        labels = torch.full((N,), C, dtype=torch.int64)
    else:
        labels = torch.where(torch.rand(N, generator=g) < 0.45, 0, randint(g, 0, C + 1, N))
        if kind == "all-fg":
            labels = labels.clamp(max=C - 1)
        else:
            labels[-1] = C  # at least one background
            labels[0] = 0  # and one foreground
    return score, labels


def seesaw_sequences():
    L, C = "SeesawLoss", 4
    for dt in DTYPES:
        for return_dict in (True, False):
            tag = f"{dt}/return_dict-{return_dict}"
            calls = []
            for i in range(4):
                score, labels = seesaw_batch(f"seq/{tag}/{i}", dt)
                kwargs = {}
                args = [score, labels]
                if i == 1:
                    args.append(pos_weight(gen(f"seesaw/seq-w/{tag}"), (8,), dt))
                if i == 2:
                    kwargs["avg_factor"] = 3.7
                if i == 3:
                    kwargs["reduction_override"] = "sum"
                calls.append((args, kwargs, [[0]]))
            cfg = {"type": L, "num_classes": C, "return_dict": return_dict}
            run_sequence(f"{L}/seq/defaults/{tag}", cfg, calls, dt, state=SEESAW_STATE)

    # options at non-default values
    plans = [
        ("p0-q1.5-eps0.05-lw0.7", {"p": 0.0, "q": 1.5, "eps": 0.05, "loss_weight": 0.7}, "float64", True),
        ("p1.2-q0-sum", {"p": 1.2, "q": 0.0, "reduction": "sum"}, "float32", False),
        ("p0-q0", {"p": 0.0, "q": 0.0}, "float64", True),
        ("p2-q3-eps0.3-none", {"p": 2.0, "q": 3.0, "eps": 0.3, "reduction": "none"}, "float64", True),
        ("use_sigmoid-False-explicit-lw2", {"use_sigmoid": False, "loss_weight": 2.0}, "float32", True),
    ]
    for name, extra, dt, return_dict in plans:
        calls = []
        for i, kind in enumerate(("mixed", "all-bg", "mixed", "all-fg")):
            score, labels = seesaw_batch(f"seq/{name}/{i}", dt, kind=kind)
            args = [score, labels]
            if i == 2:
                args.append(pos_weight(gen(f"seesaw/seq-w/{name}"), (8,), dt))
            calls.append((args, {"reduction_override": "mean"} if i == 3 else {}, [[0]]))
        cfg = {"type": L, "num_classes": C, "return_dict": return_dict, **extra}
        run_sequence(f"{L}/seq/{name}/{dt}", cfg, calls, dt, state=SEESAW_STATE)

    # reduction 'none' summed (return_dict=False): defined when every label or none is foreground
    for dt in DTYPES:
        calls = []
        for i, kind in enumerate(("all-fg", "all-bg", "all-fg")):
            score, labels = seesaw_batch(f"seq/none-sum/{dt}/{i}", dt, kind=kind)
            calls.append(([score, labels, pos_weight(gen(f"seesaw/none-sum-w/{dt}/{i}"), (8,), dt)], {}, [[0]]))
        cfg = {"type": L, "num_classes": C, "return_dict": False, "reduction": "none", "loss_weight": 0.7}
        run_sequence(f"{L}/seq/none-return_dict-False-all-or-no-fg/{dt}", cfg, calls, dt, state=SEESAW_STATE)


def seesaw_singles():
    L, C, N = "SeesawLoss", 4, 8
    for dt in DTYPES:
        score, labels = seesaw_batch(f"single/{dt}", dt)
        weight = pos_weight(gen(f"seesaw/single-w/{dt}"), (N,), dt)
        for red in RED:
            for af in AFS:
                for wname, w in (("none", None), ("N", weight)):
                    args = [score, labels] if w is None else [score, labels, w]
                    kwargs = {} if af is None else {"avg_factor": af}
                    cfg = {"type": L, "num_classes": C, "reduction": red, "loss_weight": 0.7 if af else 1.0}
                    cid = f"{L}/single/weight-{wname}/{red}/af-{af if af is not None else 'none'}/{dt}"
                    run_case(cid, cfg, args, kwargs, [[0]], dt)
        # (override 'none' with return_dict=False sums a [P] and an [N] part: see the error cases)
        for ov, red in (("mean", "sum"), ("sum", "none")):
            cfg = {"type": L, "num_classes": C, "reduction": red, "return_dict": False}
            run_case(
                f"{L}/single/reduction_override-{ov}-over-{red}/return_dict-False/{dt}",
                cfg,
                [score, labels],
                {"reduction_override": ov},
                [[0]],
                dt,
            )
        fg_score, fg_labels = seesaw_batch(f"single/all-fg/{dt}", dt, kind="all-fg")
        run_case(
            f"{L}/single/all-fg/none/return_dict-False/{dt}",
            {"type": L, "num_classes": C, "reduction": "none", "return_dict": False},
            [fg_score, fg_labels],
            {},
            [[0]],
            dt,
        )
        bg_score, bg_labels = seesaw_batch(f"single/all-bg/{dt}", dt, kind="all-bg")
        for red in RED:
            run_case(
                f"{L}/single/no-fg/{red}/{dt}",
                {"type": L, "num_classes": C, "reduction": red},
                [bg_score, bg_labels],
                {},
                [[0]],
                dt,
            )

    dt = "float32"
    score, labels = seesaw_batch("single/float32", dt)
    cfg = {"type": L, "num_classes": C}
    err = "error"
    run_case(f"{L}/{err}/use_sigmoid-True/{dt}", {**cfg, "use_sigmoid": True}, [score, labels], {}, [[0]], dt)
    run_case(f"{L}/{err}/cls_score-C+1-channels/{dt}", cfg, [score[:, :-1], labels], {}, [[0]], dt)
    run_case(f"{L}/{err}/labels-length-N-1/{dt}", cfg, [score, labels[:-1]], {}, [[0]], dt)
    too_big = labels.clone()
    too_big[2] = C + 1
    run_case(f"{L}/{err}/labels-above-background/{dt}", cfg, [score, too_big], {}, [[0]], dt)
    negative = labels.clone()
    negative[2] = -1
    run_case(f"{L}/{err}/labels-negative/{dt}", cfg, [score, negative], {}, [[0]], dt)
    run_case(f"{L}/{err}/labels-float/{dt}", cfg, [score, labels.to(torch.float32)], {}, [[0]], dt)
    run_case(
        f"{L}/{err}/label_weights-length-N-1/{dt}",
        cfg,
        [score, labels, pos_weight(gen("seesaw/w-short"), (N - 1,), dt)],
        {},
        [[0]],
        dt,
    )
    run_case(f"{L}/{err}/reduction_override-avg/{dt}", cfg, [score, labels], {"reduction_override": "avg"}, [[0]], dt)
    run_case(
        f"{L}/{err}/sum-with-avg_factor/{dt}",
        {**cfg, "reduction": "sum"},
        [score, labels],
        {"avg_factor": 3.7},
        [[0]],
        dt,
    )
    run_case(
        f"{L}/{err}/none-return_dict-False-some-fg/{dt}",
        {**cfg, "reduction": "none", "return_dict": False},
        [score, labels],
        {},
        [[0]],
        dt,
    )
    # deliberate differences: mmdet returns numbers
    run_case(
        f"{L}/quirk/label_weights-Nx1-broadcasts/mean/{dt}",
        cfg,
        [score, labels, pos_weight(gen("seesaw/w-Nx1"), (N, 1), dt)],
        {},
        [[0]],
        dt,
        ours="refuse",
    )
    one_fg = torch.full((N,), C, dtype=torch.int64)
    one_fg[3] = 1
    run_case(
        f"{L}/quirk/none-return_dict-False-one-fg-broadcasts/{dt}",
        {**cfg, "reduction": "none", "return_dict": False},
        [score, one_fg],
        {},
        [[0]],
        dt,
        ours="refuse",
    )
    run_case(
        f"{L}/empty/mean/{dt}",
        cfg,
        [torch.zeros(0, C + 2, dtype=torch.float32), torch.zeros(0, dtype=torch.int64)],
        {},
        [[0]],
        dt,
        ours="empty",
    )


# --------------------------------------------------------------------------------------------------
# EQLV2Loss: cls_score [N, C + 1], label [N] in [0, C] (C = background)
# --------------------------------------------------------------------------------------------------
def eqlv2_batch(key, dt, N=8, C=4):
    g = gen(f"eqlv2/{key}")
    score = T(randn(g, N, C + 1) * 1.5, dt)
    label = torch.where(torch.rand(N, generator=g) < 0.4, 0, randint(g, 0, C + 1, N))
    label[-1] = C
    return score, label


def eqlv2_sequences():
    L, C, N = "EQLV2Loss", 4, 8
    plans = [
        ("defaults", {}, DTYPES),
        ("mu0.5-alpha2-gamma6-lw0.7", {"mu": 0.5, "alpha": 2.0, "gamma": 6, "loss_weight": 0.7}, ("float64",)),
        (
            "ignored-options",
            {
                "use_sigmoid": False,
                "reduction": "sum",
                "class_weight": [0.5, 1.0, 2.0, 0.8, 1.3],
                "vis_grad": True,
                "test_with_obj": False,
            },
            ("float32",),
        ),
        ("gamma1-mu0.1-alpha0.5", {"gamma": 1, "mu": 0.1, "alpha": 0.5}, ("float64",)),
    ]
    for name, extra, dtypes in plans:
        for dt in dtypes:
            calls = []
            for i in range(4):
                score, label = eqlv2_batch(f"seq/{name}/{dt}/{i}", dt)
                args, kwargs = [score, label], {}
                if i == 1:  # weight, avg_factor and reduction_override are ignored, as in mmdet
                    args.append(pos_weight(gen(f"eqlv2/seq-w/{name}/{dt}"), (N, C + 1), dt))
                    kwargs = {"avg_factor": 3.7, "reduction_override": "none"}
                calls.append((args, kwargs, [[0]]))
            cfg = {"type": L, "num_classes": C, **extra}
            run_sequence(f"{L}/seq/{name}/{dt}", cfg, calls, dt, state=EQLV2_STATE)


def eqlv2_singles():
    L, C = "EQLV2Loss", 4
    for dt in DTYPES:
        score, label = eqlv2_batch(f"single/{dt}", dt)
        for red in RED:
            run_case(
                f"{L}/single/{red}/{dt}", {"type": L, "num_classes": C, "reduction": red}, [score, label], {}, [[0]], dt
            )
    dt = "float32"
    score, label = eqlv2_batch("single/float32", dt)
    cfg = {"type": L, "num_classes": C}
    err = "error"
    run_case(f"{L}/{err}/cls_score-C+2-channels/{dt}", cfg, [torch.cat([score, score[:, :1]], 1), label], {}, [[0]], dt)
    run_case(f"{L}/{err}/cls_score-3d/{dt}", cfg, [score[None], label], {}, [[0]], dt)
    run_case(f"{L}/{err}/label-length-N-1/{dt}", cfg, [score, label[:-1]], {}, [[0]], dt)
    too_big = label.clone()
    too_big[1] = C + 1
    run_case(f"{L}/{err}/label-above-background/{dt}", cfg, [score, too_big], {}, [[0]], dt)
    run_case(f"{L}/{err}/label-float/{dt}", cfg, [score, label.to(torch.float32)], {}, [[0]], dt)
    # deliberate differences: mmdet returns numbers
    negative = label.clone()
    negative[1] = -1
    run_case(f"{L}/quirk/label-negative-wraps-to-background/{dt}", cfg, [score, negative], {}, [[0]], dt, ours="refuse")
    run_case(f"{L}/quirk/label-Nx1-broadcasts/{dt}", cfg, [score, label[:, None]], {}, [[0]], dt, ours="refuse")
    run_case(
        f"{L}/empty/{dt}",
        cfg,
        [torch.zeros(0, C + 1, dtype=torch.float32), torch.zeros(0, dtype=torch.int64)],
        {},
        [[0]],
        dt,
        ours="empty",
    )


def cases():
    seesaw_sequences()
    seesaw_singles()
    eqlv2_sequences()
    eqlv2_singles()
