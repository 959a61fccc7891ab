"""mmdet reference cases for L2Loss, MarginL2Loss, TripletLoss, AssociativeEmbeddingLoss, GHMC and GHMR.
Run through ``make_mmdet_fixtures.py misc``.

Two things are particular to this family:

* mmdet's L2Loss and MarginL2Loss write into ``target`` (and into ``pred`` when a margin is > 0). Autograd
  refuses that on a leaf tensor, so mmdet fails whenever the caller's own leaf requires grad; in a model
  ``pred`` is a network output, never a leaf. Their cases therefore hand mmdet a non-leaf copy of every
  input that requires grad (``run_case_from_network``); the gradients recorded are the leaves'.
* Their random negative mining draws from NumPy's global generator, which the generic replay does not
  seed. The recorded random-mining cases are the deterministic ones (no positives: every negative drops;
  or negatives whose clamped cost and gradient are 0, so any subset gives the same numbers). Cases whose
  numbers depend on the draw are attached to those anchors under ``numpy_seeded``: each is one call made
  right after ``np.random.seed(numpy_seed)``, replayed the same way by ``tests/test_engine_misc_zoo.py``.
"""

# ruff: noqa: N803, N806  (math-style names: N/C sizes, L = loss name)
from __future__ import annotations

import copy
import warnings

import mmdet_harness as harness
import numpy as np
import torch
from mmdet_harness import MODELS, T, _alias, combos, gen, randint, randn, run_case, run_sequence, unif

SEEDS = (0, 1, 2)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
class _FromNetwork(torch.nn.Module):
    """Calls an mmdet loss with non-leaf copies of the inputs that require grad, as a network's outputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        args = [a.clone() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args]
        return self.inner(*args, **kwargs)


def _build(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _FromNetwork(MODELS.build(copy.deepcopy(cfg)))


def run_case_from_network(cid, cfg, args, kwargs=None, grad_paths=((0,),), dtype="float32", ours=None):
    """``run_case`` for losses that write into their inputs (see the module notes)."""
    case = harness._new_case(cid, cfg, args, kwargs, grad_paths, dtype, ours)
    try:
        module = _build(cfg)
        case["output"], case["grad_output"], case["grads"] = harness._call(module, args, kwargs or {}, grad_paths, cid)
    except Exception as e:
        case["error"] = f"{type(e).__name__}: {e}"
    harness.CASES.append(case)
    return case


def seeded_record(cid, cfg, args, grad_paths, dtype, seed):
    """One call after ``np.random.seed(seed)``: the record a seeded replay compares with."""
    np.random.seed(seed)
    output, grad_output, grads = harness._call(_build(cfg), args, {}, grad_paths, cid)
    return {
        "id": cid,
        "numpy_seed": seed,
        "cfg": copy.deepcopy(cfg),
        "args": _alias(list(args)),
        "kwargs": {},
        "grad_paths": [list(p) for p in grad_paths],
        "output": output,
        "grad_output": grad_output,
        "grads": grads,
        "dtype": dtype,
        "ours": None,
    }


# --------------------------------------------------------------------------------------------------
# L2Loss / MarginL2Loss
# --------------------------------------------------------------------------------------------------
N, M = 6, 8


def similarity(g, dt, positives=7, soft=3, free_negatives=False, int_target=False):
    """pred [N, M] in [-0.3, 1.3] (some clamped); target 0 with ``positives`` ones and ``soft`` values in
    (0.2, 0.8) that are neither. ``free_negatives``: every negative's pred <= -0.05, so its clamped cost
    and gradient are 0 whichever negatives mining keeps."""
    pred = unif(g, -0.3, 1.3, N, M)
    target = torch.zeros(N, M, dtype=torch.float64)
    order = torch.randperm(N * M, generator=g)
    target.view(-1)[order[:positives]] = 1.0
    target.view(-1)[order[positives : positives + soft]] = unif(g, 0.2, 0.8, soft)
    if free_negatives:
        pred = torch.where(target == 0, unif(g, -0.6, -0.05, N, M), pred)
    if int_target:
        return T(pred, dt), target.round().long()
    return T(pred, dt), T(target, dt)


def sim_weight(g, dt, negative=False):
    """Weights in [0.2, 1.5] with two zeros (ignored entries); ``negative``: one entry -0.5."""
    w = unif(g, 0.2, 1.5, N, M)
    w[0, 1] = 0.0
    w[3, 5] = 0.0
    if negative:
        w[2, 2] = -0.5
    return T(w, dt)


def l2_grid(L, mode, cfg_extra, make, full=False, target_grad=True, weights=("none", "w"), afs=(None,)):
    for red, wname, af, lw, dt in combos(full, list(weights), reductions=("none", "mean"), afs=afs):
        pred, target = harness.cached(f"{L}/{mode}/{dt}", lambda g, dt=dt: make(g, dt))
        args = [pred, target]
        if wname != "none":
            args.append(
                harness.cached(f"{L}/{mode}/{dt}/{wname}", lambda g, dt=dt, n=wname: sim_weight(g, dt, n == "w-neg"))
            )
        cfg = {"type": L, **cfg_extra, "reduction": red, "loss_weight": lw}
        kwargs = {} if af is None else {"avg_factor": af}
        cid = f"{L}/{mode}/weight-{wname}/{red}/af-{af if af is not None else 'none'}/lw-{lw}/{dt}"
        run_case_from_network(cid, cfg, args, kwargs, [[0], [1]] if target_grad else [[0]], dt)


def similarity_cases(L, full):
    """``full``: every mining variant (L2Loss); MarginL2Loss shares the code and differs in its float32 terms."""
    hard = {"neg_pos_ub": 3, "pos_margin": 0.0, "neg_margin": 0.1, "hard_mining": True}  # QDTrack's auxiliary loss
    # avg_factor is ignored (replaced by the count of positive weights): 3.7 must change nothing
    l2_grid(
        L,
        "default",
        {},
        similarity,
        full=True,
        weights=("none", "w", "w-neg") if full else ("none", "w"),
        afs=(None, 3.7),
    )
    l2_grid(L, "margins", {"pos_margin": 0.2, "neg_margin": 0.15}, similarity, weights=("w",))
    l2_grid(L, "int-target", {"pos_margin": 0.2}, lambda g, dt: similarity(g, dt, int_target=True), target_grad=False)
    l2_grid(L, "hard-mining/qdtrack", hard, similarity)
    if full:
        l2_grid(L, "hard-mining/ub-2-no-margins", {"neg_pos_ub": 2, "hard_mining": True}, similarity)
        # mining not triggered: 38 negatives <= 10 * 7 positives
        l2_grid(L, "hard-mining/ub-10-not-reached", {"neg_pos_ub": 10, "hard_mining": True}, similarity, weights=("w",))
        l2_grid(
            L,
            "hard-mining/no-positives",
            {"neg_pos_ub": 3, "hard_mining": True},
            lambda g, dt: similarity(g, dt, positives=0),
            weights=("w",),
        )
    # random mining: deterministic configurations only (module notes); the draws are under numpy_seeded
    random_cfg = {"neg_pos_ub": 2, "neg_margin": 0.1}
    l2_grid(L, "random-mining/free-negatives", random_cfg, lambda g, dt: similarity(g, dt, free_negatives=True))
    l2_grid(
        L,
        "random-mining/no-positives",
        {"neg_pos_ub": 2},
        lambda g, dt: similarity(g, dt, positives=0),
        weights=("none",),
    )
    seeded = [("ub-2", {"neg_pos_ub": 2}, "mean")]
    if full:
        seeded.append(("ub-1-margins", {"neg_pos_ub": 1, "pos_margin": 0.2, "neg_margin": 0.1}, "none"))
    anchor = harness.CASES[-1]
    anchor["numpy_seeded"] = [
        seeded_record(
            f"{L}/random-mining/numpy-seed-{seed}/{cfg_name}/{dt}",
            {"type": L, **cfg, "reduction": red, "loss_weight": 0.7},
            [*harness.cached(f"{L}/seeded/{dt}", lambda g, dt=dt: similarity(g, dt))],
            [[0], [1]],
            dt,
            seed,
        )
        for seed in SEEDS
        for dt in ("float32", "float64")
        for cfg_name, cfg, red in seeded
    ]

    pred, target = harness.cached(f"{L}/default/float32", lambda g: similarity(g, "float32"))
    base = {"type": L, "reduction": "mean", "loss_weight": 1.0}
    for ov, cfg_red in (("none", "mean"), ("mean", "none"), ("mean", "sum")):
        run_case_from_network(
            f"{L}/default/reduction_override-{ov}-over-{cfg_red}/float32",
            {**base, "reduction": cfg_red},
            [pred, target],
            {"reduction_override": ov},
            [[0], [1]],
        )
    # errors where mmdet raises
    run_case_from_network(f"{L}/error-reduction-sum/float32", {**base, "reduction": "sum"}, [pred, target])
    run_case_from_network(
        f"{L}/error-reduction_override-sum/float32", base, [pred, target], {"reduction_override": "sum"}
    )
    run_case_from_network(
        f"{L}/error-invalid-reduction_override/float32", base, [pred, target], {"reduction_override": "max"}
    )
    run_case_from_network(f"{L}/error-shape-mismatch/float32", base, [pred, target[:, :7]])
    run_case_from_network(f"{L}/error-weight-Nx1/float32", base, [pred, target, torch.ones(N, 1)])
    mining = {**base, "neg_pos_ub": 1, "hard_mining": True}
    run_case_from_network(f"{L}/error-1d-with-mining/float32", mining, [pred[0], target[0]])
    # 3-D inputs with mining: mmdet marks whole rows of its [N, M, K] mask from 2 of the 3 indices
    # (positives lose their weight too) -- we refuse
    g = gen(f"{L}/3d")
    p3 = T(unif(g, 0, 1, 2, 3, 4), "float32")
    t3 = torch.zeros(2, 3, 4)
    t3[0, 0, 0] = 1.0
    run_case_from_network(
        f"{L}/refuse-3d-with-random-mining/float32", {**mining, "hard_mining": False}, [p3, t3], ours="refuse"
    )
    run_case_from_network(f"{L}/error-3d-with-hard-mining/float32", mining, [p3, t3])
    empty = torch.zeros(0, M)
    run_case_from_network(f"{L}/empty-0xM/mean/float32", base, [empty, empty], {}, [[0], [1]])


# --------------------------------------------------------------------------------------------------
# TripletLoss
# --------------------------------------------------------------------------------------------------
def triplet_cases():
    L, B, D = "TripletLoss", 8, 5

    def embeddings(g, dt, ties=False):
        x = randn(g, B, D)
        labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])  # identity 3 is seen once
        if ties:  # two identical embeddings of identity 0: anchor 5 ties between them for its hardest positive
            x[2] = x[0]
        return T(x, dt), labels

    configs = [
        ("default", {}),
        ("margin-0.8", {"margin": 0.8}),
        ("margin-0", {"margin": 0.0}),
    ]
    for i, (name, extra) in enumerate(configs):
        for j, dt in enumerate(("float32", "float64")):
            x, labels = harness.cached(f"{L}/{dt}", lambda g, dt=dt: embeddings(g, dt))
            lw = (1.0, 0.7)[(i + j) % 2]
            run_case(f"{L}/{name}/lw-{lw}/{dt}", {"type": L, **extra, "loss_weight": lw}, [x, labels], {}, [[0]], dt)
    for dt in ("float32", "float64"):
        x, labels = harness.cached(f"{L}/ties/{dt}", lambda g, dt=dt: embeddings(g, dt, ties=True))
        run_case(f"{L}/tied-embeddings/{dt}", {"type": L}, [x, labels], {}, [[0]], dt)
    x, labels = harness.cached(f"{L}/float32", lambda g: embeddings(g, "float32"))
    run_case(f"{L}/targets-Bx1/float32", {"type": L}, [x, labels.view(-1, 1)], {}, [[0]])
    run_case(f"{L}/targets-int32/float32", {"type": L, "margin": 0.5}, [x, labels.int()], {}, [[0]])
    run_case(f"{L}/error-hard_mining-False/float32", {"type": L, "hard_mining": False}, [x, labels])
    run_case(f"{L}/error-one-label/float32", {"type": L}, [x, torch.zeros(B, dtype=torch.long)])
    run_case(f"{L}/error-1d-inputs/float32", {"type": L}, [x[0], labels[:1]])
    run_case(f"{L}/error-targets-length/float32", {"type": L}, [x, labels[:5]])
    run_case(f"{L}/error-empty/float32", {"type": L}, [x[:0], labels[:0]])


# --------------------------------------------------------------------------------------------------
# AssociativeEmbeddingLoss
# --------------------------------------------------------------------------------------------------
MATCH = [
    [[[1, 2], [4, 5]], [[0, 0], [3, 6]], [[2, 1], [5, 3]]],  # three objects
    [[[3, 3], [5, 6]]],  # one object: push 0
    [],  # no object
]


def ae_cases():
    L, B, H, W = "AssociativeEmbeddingLoss", 3, 6, 7

    def maps(g, dt, channels=1):
        return T(randn(g, B, channels, H, W) * 0.6, dt), T(randn(g, B, channels, H, W) * 0.6, dt)

    for name, extra in [("default", {}), ("weights-0.5-1.5", {"pull_weight": 0.5, "push_weight": 1.5})]:
        for dt in ("float32", "float64"):
            for channels in (1, 2):
                tl, br = harness.cached(f"{L}/M{channels}/{dt}", lambda g, dt=dt, c=channels: maps(g, dt, c))
                cid = f"{L}/{name}/M-{channels}/{dt}"
                run_case(cid, {"type": L, **extra}, [tl, br, MATCH], {}, [[0], [1]], dt)
    tl, br = harness.cached(f"{L}/M1/float32", lambda g: maps(g, "float32"))
    # close embeddings: every push term inside the margin
    run_case(f"{L}/close-embeddings/float32", {"type": L}, [tl * 0.1, br * 0.1, MATCH], {}, [[0], [1]])
    run_case(f"{L}/all-images-empty/float32", {"type": L}, [tl, br, [[], [], []]], {}, [[0], [1]])
    cfg = {"type": L}
    run_case(f"{L}/error-match-shorter-than-batch/float32", cfg, [tl, br, MATCH[:2]])
    run_case(f"{L}/error-y-out-of-range/float32", cfg, [tl, br, [[[[H, 0], [1, 1]]], [], []]])
    run_case(f"{L}/error-x-out-of-range/float32", cfg, [tl, br, [[[[0, 0], [1, W]]], [], []]])
    run_case(f"{L}/error-non-integral-coordinate/float32", cfg, [tl, br, [[[[2.5, 1], [3, 3]]], [], []]])
    run_case(f"{L}/error-channel-mismatch/float32", cfg, [tl, br.repeat(1, 2, 1, 1), MATCH])
    run_case(f"{L}/error-3d-pred/float32", cfg, [tl[:, 0], br[:, 0], MATCH])
    # mmdet indexes with a negative coordinate from the end of the map; we refuse
    run_case(f"{L}/refuse-negative-coordinate/float32", cfg, [tl, br, [[[[-1, 2], [3, 3]]], [], []]], ours="refuse")
    # mmdet ignores match entries beyond the batch; we refuse
    run_case(f"{L}/refuse-match-longer-than-batch/float32", cfg, [tl, br, [*MATCH, []]], ours="refuse")


# --------------------------------------------------------------------------------------------------
# GHMC / GHMR
# --------------------------------------------------------------------------------------------------
def ghmc_dense(g, dt, n=10, c=4, soft=False):
    pred = randn(g, n, c) * 2.5
    target = unif(g, 0, 1, n, c) if soft else (torch.rand(n, c, generator=g) < 0.3).double()
    label_weight = torch.ones(n, c, dtype=torch.float64)
    label_weight.view(-1)[torch.randperm(n * c, generator=g)[:4]] = 0.0
    return T(pred, dt), T(target, dt), T(label_weight, dt)


def ghmc_index(g, dt, n=10, c=4):
    pred = randn(g, n, c) * 2.5
    labels = randint(g, 0, c + 1, n)  # c = background
    labels[3] = -1  # outside [0, c): an all-zero row too
    label_weight = torch.ones(n, dtype=torch.float64)
    label_weight[[1, 6]] = 0.0
    return T(pred, dt), labels, T(label_weight, dt)


def ghmr_inputs(g, dt, n=10, mu=0.02):
    """target = pred - d with the gradient norms |d| / sqrt(d^2 + mu^2) spread over (0.02, 0.999)."""
    pred = randn(g, n, 4)
    norm = unif(g, 0.02, 0.999, n, 4)
    sign = torch.where(torch.rand(n, 4, generator=g) < 0.5, -1.0, 1.0).double()
    d = sign * norm * mu / torch.sqrt(1 - norm * norm)
    label_weight = unif(g, 0.5, 1.5, n, 4)
    label_weight.view(-1)[torch.randperm(n * 4, generator=g)[:5]] = 0.0
    return T(pred, dt), T(pred - d, dt), T(label_weight, dt)


def ghm_grid(L, mode, cfg_extra, make, grad_paths, full=False, kwargs=None, lw_slice=None):
    for red, _, _, lw, dt in combos(full, ["label_weight"], reductions=("none", "mean"), afs=(None,)):
        args = list(harness.cached(f"{L}/{mode}/{dt}", lambda g, dt=dt: make(g, dt)))
        if lw_slice is not None:
            args[2] = lw_slice(args[2])
        cfg = {"type": L, **cfg_extra, "reduction": red, "loss_weight": lw}
        run_case(f"{L}/{mode}/{red}/lw-{lw}/{dt}", cfg, args, dict(kwargs or {}), grad_paths, dt)


def ghmc_cases():
    L = "GHMC"
    both = [[0], [1]]
    ghm_grid(L, "dense-binary", {}, ghmc_dense, both, full=True)
    ghm_grid(L, "dense-soft", {}, lambda g, dt: ghmc_dense(g, dt, soft=True), both, full=True)
    ghm_grid(L, "dense-binary/bins-5", {"bins": 5}, ghmc_dense, both)
    ghm_grid(L, "dense-binary/bins-30", {"bins": 30}, ghmc_dense, both)
    ghm_grid(L, "dense-binary/bins-1", {"bins": 1}, ghmc_dense, both)
    ghm_grid(L, "dense-binary/label_weight-Nx1", {}, ghmc_dense, both, lw_slice=lambda w: w[:, :1] + 0.5)
    ghm_grid(L, "index-target", {}, ghmc_index, [[0]], full=True)
    ghm_grid(L, "index-target/label_weight-Nx1", {}, ghmc_index, [[0]], lw_slice=lambda w: w.view(-1, 1))
    # momentum > 0 on a fresh module: mmdet's first call
    ghm_grid(L, "dense-binary/momentum-0.75-first-call", {"momentum": 0.75}, ghmc_dense, both)
    pred, target, lw = harness.cached(f"{L}/dense-binary/float32", lambda g: ghmc_dense(g, "float32"))
    base = {"type": L, "reduction": "mean", "loss_weight": 1.0}
    run_case(
        f"{L}/reduction_override-none-over-mean/float32", base, [pred, target, lw], {"reduction_override": "none"}, both
    )
    run_case(
        f"{L}/reduction_override-mean-over-none/float32",
        {**base, "reduction": "none"},
        [pred, target, lw],
        {"reduction_override": "mean"},
        both,
    )
    run_case(f"{L}/all-ignored/float32", base, [pred, target, torch.zeros_like(lw)], {}, both)
    run_case(f"{L}/target-int64/float32", base, [pred, target.long(), lw], {}, [[0]])
    run_case(f"{L}/error-reduction-sum/float32", {**base, "reduction": "sum"}, [pred, target, lw])
    run_case(f"{L}/error-reduction_override-sum/float32", base, [pred, target, lw], {"reduction_override": "sum"})
    run_case(f"{L}/error-use_sigmoid-False/float32", {**base, "use_sigmoid": False}, [pred, target, lw])
    run_case(f"{L}/error-target-shape/float32", base, [pred, target[:, :1], lw])
    run_case(f"{L}/error-label_weight-enlarges/float32", base, [pred, target, lw.expand(2, -1, -1)])
    run_case(f"{L}/error-bins-negative/float32", {**base, "bins": -2}, [pred, target, lw])
    # bins=0: mmdet's edges are NaN and every weight 0, so it returns 0 -- we refuse the config
    run_case(f"{L}/refuse-bins-0/float32", {**base, "bins": 0}, [pred, target, lw], ours="refuse")
    p, labels, lwi = harness.cached(f"{L}/index-target/float32", lambda g: ghmc_index(g, "float32"))
    run_case(f"{L}/index-target/error-label_weight-NxC/float32", base, [p, labels, lw])
    run_case(f"{L}/index-target/error-labels-length/float32", base, [p, labels[:7], lwi])

    # momentum: one module, several calls; acc_sum after each
    for dt, mmt in (("float32", 0.75), ("float64", 0.9)):
        calls = []
        for i, n in enumerate((10, 7, 12, 9)):
            args = list(harness.cached(f"{L}/seq/{i}/{dt}", lambda g, dt=dt, n=n: ghmc_dense(g, dt, n=n)))
            calls.append((args, {"reduction_override": "none"} if i == 2 else {}, both))
        cfg = {"type": L, "momentum": mmt, "bins": 10, "loss_weight": 0.7}
        run_sequence(f"{L}/momentum-{mmt}/dense/{dt}", cfg, calls, dt, state=("acc_sum",))
    calls = [
        (list(harness.cached(f"{L}/seq-index/{i}", lambda g: ghmc_index(g, "float32"))), {}, [[0]]) for i in range(3)
    ]
    run_sequence(
        f"{L}/momentum-0.5/index-target/bins-6/float32",
        {"type": L, "momentum": 0.5, "bins": 6},
        calls,
        "float32",
        state=("acc_sum",),
    )


def ghmr_cases():
    L = "GHMR"
    both = [[0], [1]]
    ghm_grid(L, "default", {}, ghmr_inputs, both, full=True)
    ghm_grid(L, "mu-0.1", {"mu": 0.1}, ghmr_inputs, both)
    ghm_grid(L, "bins-6", {"bins": 6}, ghmr_inputs, both)
    ghm_grid(L, "avg_factor-ignored", {}, ghmr_inputs, both, kwargs={"avg_factor": 3.7})
    ghm_grid(L, "label_weight-Nx1", {}, ghmr_inputs, both, lw_slice=lambda w: w[:, :1])
    ghm_grid(L, "momentum-0.6-first-call", {"momentum": 0.6}, ghmr_inputs, both)
    pred, target, lw = harness.cached(f"{L}/default/float32", lambda g: ghmr_inputs(g, "float32"))
    base = {"type": L, "reduction": "mean", "loss_weight": 1.0}
    run_case(
        f"{L}/reduction_override-none-over-mean/float32", base, [pred, target, lw], {"reduction_override": "none"}, both
    )
    run_case(f"{L}/label_weight-small/float32", base, [pred, target, lw * 0.01], {}, both)  # tot floors at 1
    run_case(f"{L}/error-reduction-sum/float32", {**base, "reduction": "sum"}, [pred, target, lw])
    run_case(f"{L}/error-reduction_override-sum/float32", base, [pred, target, lw], {"reduction_override": "sum"})
    run_case(f"{L}/error-label_weight-enlarges/float32", base, [pred, target, lw.expand(2, -1, -1)])
    run_case(f"{L}/error-invalid-reduction_override/float32", base, [pred, target, lw], {"reduction_override": "max"})
    # a [1, 4] target broadcasts over pred's rows in mmdet; we want equal shapes
    run_case(f"{L}/refuse-target-broadcasts/float32", base, [pred, target[:1], lw], ours="refuse")

    for dt, mmt in (("float32", 0.5), ("float64", 0.8)):
        calls = []
        for i, n in enumerate((10, 6, 11)):
            args = list(harness.cached(f"{L}/seq/{i}/{dt}", lambda g, dt=dt, n=n: ghmr_inputs(g, dt, n=n)))
            calls.append((args, {}, both))
        cfg = {"type": L, "momentum": mmt, "mu": 0.02, "loss_weight": 0.7}
        run_sequence(f"{L}/momentum-{mmt}/{dt}", cfg, calls, dt, state=("acc_sum",))


def _float32_gradients(case):
    """GHMC (BCE against its float32 target) and MarginL2Loss (float32 target copy) round a float64 call's
    gradient to float32 after the upstream gradient is applied. A non-scalar output's gradient sent for
    ones and scaled by the upstream gradient afterwards (the separable fast path over the wire) then
    differs in the last float32 bits, so such cases are compared at float32 tolerance."""
    if case["dtype"] != "float64" or case["cfg"]["type"] not in ("GHMC", "MarginL2Loss"):
        return False
    if case["cfg"]["type"] == "MarginL2Loss" and [1] not in case["grad_paths"]:
        return False  # only the target's gradient goes through the float32 copy
    outputs = [step["output"] for step in case["steps"]] if "steps" in case else [case["output"]]
    return any(out is not None and out.dim() > 0 for out in outputs)


def cases():
    similarity_cases("L2Loss", full=True)
    similarity_cases("MarginL2Loss", full=False)
    triplet_cases()
    ae_cases()
    ghmc_cases()
    ghmr_cases()
    for case in harness.CASES:
        if _float32_gradients(case):
            case["ours"] = "float32"
