"""mmdet reference cases for the distance- and shape-aware IoU losses: BoundedIoULoss, DIoULoss, CIoULoss,
EIoULoss and SIoULoss (IoULoss and GIoULoss live in ``cases_core``). Run through ``make_mmdet_fixtures.py iou``.

Every input set mixes box pairs chosen to reach each branch of the five losses: near-identical boxes
(EIoU's quadratic part, Bounded IoU's quadratic part), IoU above 0.5 (CIoU's aspect term), partial
overlap, boxes apart in x, in y and in both (negative extended intersection, Bounded IoU's clamped
centre cost), and centre offsets steeper or flatter than 45 degrees (SIoU's angle switch).
"""

from __future__ import annotations

import torch
from mmdet_harness import DTYPES, RED, TORCH_DTYPES, T, add_mode, add_overrides, cached, gen, pos_weight, run_case, unif

N = 8
# One profile per row: (|centre offset| / pred size in x, in y), (target / pred size in x, in y) ranges.
PROFILES = (
    ((0.002, 0.01), (0.002, 0.01), (0.98, 1.02), (0.98, 1.02)),  # near-identical: IoU > 0.9
    ((0.03, 0.1), (0.03, 0.1), (0.85, 1.15), (0.85, 1.15)),  # close: IoU > 0.5
    ((1.3, 1.8), (0.0, 0.2), (0.7, 1.3), (0.7, 1.3)),  # apart in x
    ((0.2, 0.45), (0.2, 0.45), (0.6, 1.4), (0.6, 1.4)),  # partial overlap
    ((1.3, 1.8), (1.3, 1.8), (0.7, 1.3), (0.7, 1.3)),  # apart in x and y
    ((0.0, 0.2), (1.3, 1.8), (0.7, 1.3), (0.7, 1.3)),  # apart in y
    ((0.01, 0.05), (0.25, 0.4), (0.8, 1.2), (0.8, 1.2)),  # steep centre offset
    ((0.25, 0.4), (0.01, 0.05), (0.5, 0.7), (1.3, 1.6)),  # flat offset, aspect ratio changed
)


def zoo_pair(g, n, dt):
    """pred/target [n, 4] valid boxes, row i following PROFILES[i % len(PROFILES)]."""
    rows_p, rows_t = [], []
    for i in range(n):
        fx, fy, sw, sh = PROFILES[i % len(PROFILES)]
        x1, y1 = float(unif(g, 0, 10, 1)), float(unif(g, 0, 10, 1))
        w, h = float(unif(g, 2, 6, 1)), float(unif(g, 2, 6, 1))
        sign = torch.where(torch.rand(2, generator=g) < 0.5, -1.0, 1.0).tolist()
        cx = x1 + w / 2 + sign[0] * float(unif(g, *fx, 1)) * w
        cy = y1 + h / 2 + sign[1] * float(unif(g, *fy, 1)) * h
        tw, th = w * float(unif(g, *sw, 1)), h * float(unif(g, *sh, 1))
        rows_p.append([x1, y1, x1 + w, y1 + h])
        rows_t.append([cx - tw / 2, cy - th / 2, cx + tw / 2, cy + th / 2])
    return T(torch.tensor(rows_p, dtype=torch.float64), dt), T(torch.tensor(rows_t, dtype=torch.float64), dt)


# Integer boxes: exact ties in every min/max, overlaps of exactly zero (touching edges, a shared corner),
# a zero-width box, and two zero-height boxes on one line (the enclosing box's height is 0: SIoU's floor).
TIE_PRED = [
    [0, 0, 2, 2],
    [0, 0, 2, 2],
    [0, 0, 2, 2],
    [0, 0, 4, 2],
    [0, 0, 4, 4],
    [0, 0, 2, 2],
    [1, 0, 1, 2],
    [0, 1, 2, 1],
]
TIE_TARGET = [
    [0, 0, 2, 2],
    [2, 0, 4, 2],
    [2, 2, 3, 4],
    [1, 0, 3, 2],
    [1, 1, 3, 3],
    [0, 1, 2, 3],
    [0, 0, 2, 2],
    [1, 1, 3, 1],
]

w_n = lambda g, p, t, dt: pos_weight(g, (N,), dt)  # noqa: E731
w4 = lambda g, p, t, dt: pos_weight(g, (N, 4), dt)  # noqa: E731
w1 = lambda g, p, t, dt: pos_weight(g, (N, 1), dt)  # noqa: E731
mk = lambda g, dt: zoo_pair(g, N, dt)  # noqa: E731

# loss, weights in the full grid, weights in the short grid, options at non-default values
SPECS = (
    (
        "BoundedIoULoss",
        {"none": None, "Nx4": w4},
        {"Nx1": w1},
        (("beta-0.5/eps-0.01", {"beta": 0.5, "eps": 0.01}), ("beta-0.05", {"beta": 0.05})),
    ),
    ("DIoULoss", {"none": None, "N": w_n}, {"Nx4": w4}, (("eps-0.01", {"eps": 0.01}),)),
    ("CIoULoss", {"none": None, "N": w_n}, {"Nx4": w4}, (("eps-0.01", {"eps": 0.01}),)),
    (
        "EIoULoss",
        {"none": None, "N": w_n},
        {"Nx4": w4},
        (
            ("smooth_point-0.3", {"smooth_point": 0.3}),
            ("eps-0.01/smooth_point-0.05", {"eps": 0.01, "smooth_point": 0.05}),
        ),
    ),
    (
        "SIoULoss",
        {"none": None, "N": w_n},
        {"Nx4": w4},
        (("neg_gamma-True", {"neg_gamma": True}), ("eps-0.01", {"eps": 0.01})),
    ),
)


def _cfg(loss, red="mean", lw=1.0, **extra):
    return {"type": loss, **extra, "reduction": red, "loss_weight": lw}


def grid_cases(loss, full_weights, short_weights, options):
    main_weight = next(fn for name, fn in full_weights.items() if fn is not None)
    add_mode(loss, "default", {}, mk, full_weights, full=True, grad_targets=[[1]])
    add_mode(loss, "default", {}, mk, short_weights, grad_targets=[[1]])
    for mode, extra in options:
        add_mode(loss, mode, extra, mk, {"none": None, "w": main_weight}, grad_targets=[[1]])
    add_overrides(loss, "default", {}, mk, weight_fn=main_weight, grad_targets=[[1]])


def shortcut_cases(loss):
    """mmdet's early exit when no weight is positive: (pred * weight).sum(), every reduction."""
    for dt in DTYPES:
        p, t = cached(f"{loss}/default/{dt}", lambda g, dt=dt: mk(g, dt))
        shapes = [(N,), (N, 4)] + ([(N, 1)] if loss == "BoundedIoULoss" else [])
        for shp in shapes if dt == "float32" else [(N,)]:
            sname = "x".join(str(s) if s != N else "N" for s in shp)
            for red in RED:
                run_case(
                    f"{loss}/default/zero-weight-{sname}/{red}/lw-0.7/{dt}",
                    _cfg(loss, red, 0.7),
                    [p, t, torch.zeros(shp, dtype=TORCH_DTYPES[dt])],
                    {},
                    [[0], [1]],
                    dt,
                )
    # no positive entry, some negative: the shortcut's sum is not zero (and not scaled by loss_weight)
    p, t = cached(f"{loss}/default/float64", lambda g: mk(g, "float64"))
    neg = T(-unif(gen(f"{loss}-negative-weight"), 0.2, 1.0, N), "float64")
    neg[3] = 0.0
    run_case(
        f"{loss}/default/nonpositive-weight-N/mean/lw-0.7/float64",
        _cfg(loss, "mean", 0.7),
        [p, t, neg],
        {},
        [[0], [1]],
        "float64",
    )


def edge_cases(loss, options):
    for dt in DTYPES:
        # empty inputs: mmdet's mean is NaN, ours a zero with a gradient (the documented "empty" difference)
        pe, te = torch.zeros(0, 4, dtype=TORCH_DTYPES[dt]), torch.zeros(0, 4, dtype=TORCH_DTYPES[dt])
        for red in RED if dt == "float32" else ("mean",):
            run_case(f"{loss}/default/empty-0x4/{red}/lw-1.0/{dt}", _cfg(loss, red), [pe, te], {}, [[0], [1]], dt)
        # integer boxes: ties in every min/max (autograd splits the gradient), overlap exactly zero
        tp = T(torch.tensor(TIE_PRED, dtype=torch.float64), dt)
        tt = T(torch.tensor(TIE_TARGET, dtype=torch.float64), dt)
        run_case(f"{loss}/ties-integer-boxes/none/lw-1.0/{dt}", _cfg(loss, "none"), [tp, tt], {}, [[0], [1]], dt)
    mode, extra = options[0]
    run_case(
        f"{loss}/{mode}/ties-integer-boxes/none/lw-1.0/float64",
        _cfg(loss, "none", **extra),
        [tp, tt],
        {},
        [[0], [1]],
        "float64",
    )


def error_cases(loss):
    """Inputs mmdet answers with an internal error; we raise a LossError naming the field."""
    p, t = cached(f"{loss}/default/float32", lambda g: mk(g, "float32"))
    p6, t6 = p[:6], t[:6]
    bad = [
        ("error-pred-3d-2x3x4", [p6.reshape(2, 3, 4), t6.reshape(2, 3, 4)], {}),
        ("error-pred-1d", [p[0], t[0]], {}),
        ("error-target-shape-5x4", [p, t[:5]], {}),
        ("error-invalid-reduction_override", [p, t], {"reduction_override": "max"}),
    ]
    if loss == "BoundedIoULoss":
        # the per-coordinate loss [N, 4] does not broadcast with a per-box weight [N]
        bad.append(("error-weight-N", [p, t, pos_weight(gen(f"{loss}-wN"), (N,), "float32")], {}))
    else:
        # a 2-D weight must be [N, 4] (it is averaged over the coordinates); [N + 1] does not broadcast
        bad.append(("error-weight-Nx1", [p, t, pos_weight(gen(f"{loss}-wN1"), (N, 1), "float32")], {}))
        bad.append(("error-weight-N+1", [p, t, pos_weight(gen(f"{loss}-wN+1"), (N + 1,), "float32")], {}))
    for name, args, kwargs in bad:
        run_case(f"{loss}/{name}/float32", _cfg(loss), args, kwargs, [[0]], "float32")
    # deliberate difference: [2, 4, 4] boxes get through mmdet's column indexing and mix coordinates of
    # different boxes into a number; we take 2-D [N, 4] boxes only
    p8, t8 = p.reshape(2, 4, 4), t.reshape(2, 4, 4)
    run_case(f"{loss}/refuse-pred-3d-2x4x4/float32", _cfg(loss), [p8, t8], {}, [[0]], "float32", ours="refuse")


def specific_cases():
    p, t = cached("BoundedIoULoss/default/float32", lambda g: mk(g, "float32"))
    # quirk kept: with N == 4 a per-box weight [4] broadcasts over the coordinate columns instead
    run_case(
        "BoundedIoULoss/quirk-weight-4-for-N-4-weights-coordinates/mean/float32",
        _cfg("BoundedIoULoss"),
        [p[:4], t[:4], pos_weight(gen("biou-w4"), (4,), "float32")],
        {},
        [[0], [1]],
        "float32",
    )
    # deliberate differences: a zero smooth-L1 threshold divides by zero (NaN gradient in mmdet for
    # BoundedIoULoss, a NaN loss for EIoULoss); we reject the config
    run_case(
        "BoundedIoULoss/refuse-beta-0/float32",
        _cfg("BoundedIoULoss", beta=0.0),
        [p, t],
        {},
        [[0]],
        "float32",
        ours="refuse",
    )
    pe, te = cached("EIoULoss/default/float32", lambda g: mk(g, "float32"))
    run_case(
        "EIoULoss/refuse-smooth_point-0/float32",
        _cfg("EIoULoss", smooth_point=0.0),
        [pe, te],
        {},
        [[0]],
        "float32",
        ours="refuse",
    )
    # deliberate difference (docs/semantics.md): an invalid reduction_override is checked before the shortcut
    pd, td = cached("DIoULoss/default/float32", lambda g: mk(g, "float32"))
    run_case(
        "DIoULoss/refuse-invalid-reduction_override-with-zero-weight/float32",
        _cfg("DIoULoss"),
        [pd, td, torch.zeros(N)],
        {"reduction_override": "max"},
        [[0]],
        "float32",
        ours="refuse",
    )


def cases():
    for loss, full_weights, short_weights, options in SPECS:
        grid_cases(loss, full_weights, short_weights, options)
        shortcut_cases(loss)
        edge_cases(loss, options)
        error_cases(loss)
    specific_cases()
