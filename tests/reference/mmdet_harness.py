"""The harness behind ``make_mmdet_fixtures.py``: mmdet's import shim, the case runner and the
deterministic input makers shared by every ``cases_<family>.py`` module.

Runs only in the reference virtualenv (see ``make_mmdet_fixtures.py``); never imported by the tests.

Import shim (kept here, never in losswire's runtime code):
1. ``mmdet/models/losses/focal_loss.py`` imports ``mmcv.ops``, which loads the compiled ``mmcv._ext``
   absent from mmcv-lite.  A placeholder ``mmcv._ext`` module whose attributes are stub functions (they
   raise if ever called) satisfies the import; on CPU FocalLoss never calls the compiled op.
2. ``import mmdet.models.losses`` would run ``mmdet/models/__init__.py`` (every backbone, head and
   detector).  A bare package object registered as ``mmdet.models`` with the real folder as ``__path__``
   lets ``mmdet.models.losses`` import unchanged.
"""

# ruff: noqa: N802  (math-style names: T() casts, N/C/H sizes, L = loss name)
from __future__ import annotations

import copy
import os
import sys
import types
import warnings
import zlib

import torch

RED = ("none", "mean", "sum")
AFS = (None, 3.7)
DTYPES = ("float32", "float64")
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


# --------------------------------------------------------------------------------------------------
# import shim
# --------------------------------------------------------------------------------------------------
def _install_shim():
    import mmcv  # noqa: F401  (the real pure-python mmcv-lite package)
    import mmdet

    ext = types.ModuleType("mmcv._ext")

    def _stub(name):
        def f(*a, **k):
            raise RuntimeError(f"mmcv._ext placeholder: compiled op {name} is unavailable")

        return f

    def _getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(name)

    ext.__getattr__ = _getattr
    sys.modules["mmcv._ext"] = ext

    models = types.ModuleType("mmdet.models")
    models.__path__ = [os.path.join(os.path.dirname(mmdet.__file__), "models")]
    models.__package__ = "mmdet.models"
    sys.modules["mmdet.models"] = models
    mmdet.models = models

    import mmdet.models.losses
    from mmdet.registry import MODELS

    return mmdet.__version__, MODELS


MMDET_VERSION, MODELS = _install_shim()


# --------------------------------------------------------------------------------------------------
# case runner
# --------------------------------------------------------------------------------------------------
CASES: list[dict] = []
_IDS: set[str] = set()
_ONES = {}


def gen(key: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(key.encode()))
    return g


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return [_clone(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _alias(x):
    """A distinct tensor object over the same storage: torch.save stores a shared storage once (keeps the
    file small) while each loaded case still gets its own tensor objects (requires_grad_ on one case's
    input does not leak into another case)."""
    if isinstance(x, torch.Tensor):
        return x.detach().view(x.shape)
    if isinstance(x, list):
        return [_alias(v) for v in x]
    if isinstance(x, dict):
        return {k: _alias(v) for k, v in x.items()}
    return x


def _get(args, path):
    x = args
    for i in path:
        x = x[i]
    return x


def _for_call(args):
    # nested python lists (tuple targets) become tuples, as the consumer does
    return [tuple(a) if isinstance(a, list) else a for a in args]


def _upstream(cid, out):
    """The upstream gradient for one output tensor: ones for a scalar, seeded noise otherwise."""
    if out.dim() == 0:
        if out.dtype not in _ONES:
            _ONES[out.dtype] = torch.ones((), dtype=out.dtype)
        return _alias(_ONES[out.dtype])
    return torch.randn(out.shape, generator=gen("grad_output/" + cid), dtype=out.dtype)


def _parts(out):
    """A loss output as [(key, tensor)]: a tensor is [("", t)], a tuple [("0", a), ("1", b)], a dict its items."""
    if isinstance(out, torch.Tensor):
        return [("", out)]
    if isinstance(out, (tuple, list)):
        return [(str(i), t) for i, t in enumerate(out)]
    if isinstance(out, dict):
        return list(out.items())
    raise TypeError(f"unexpected loss output {type(out).__name__}")


def _restructure(out, values):
    if isinstance(out, torch.Tensor):
        return values[0]
    if isinstance(out, (tuple, list)):
        return list(values)
    return dict(zip(out, values, strict=True))


def _call(module, args, kwargs, grad_paths, cid):
    """One forward + backward; returns (output, grad_output, grads) in the output's structure."""
    call_args, call_kwargs = _clone(args), _clone(kwargs)
    leaves = []
    for p in grad_paths:
        t = _get(call_args, p)
        assert t.is_floating_point(), (cid, p)
        t.requires_grad_(True)
        leaves.append(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = module(*_for_call(call_args), **call_kwargs)
    parts = _parts(out)
    ups = [_upstream(f"{cid}/{key}" if key else cid, t) for key, t in parts]
    live = [(t, g) for (_, t), g in zip(parts, ups, strict=True) if t.requires_grad]
    if live and leaves:
        grads = torch.autograd.grad([t for t, _ in live], leaves, [g for _, g in live], allow_unused=True)
        grads = [None if gr is None else gr.detach() for gr in grads]
    else:
        grads = [None] * len(leaves)
    output = _restructure(out, [t.detach().clone() for _, t in parts])
    return output, _restructure(out, ups), grads


def _new_case(cid, cfg, args, kwargs, grad_paths, dtype, ours):
    assert cid not in _IDS, cid
    _IDS.add(cid)
    return {
        "id": cid,
        "cfg": copy.deepcopy(cfg),
        "args": _alias(list(args)),
        "kwargs": _alias(dict(kwargs or {})),
        "grad_paths": [list(p) for p in grad_paths],
        "output": None,
        "grad_output": None,
        "grads": None,
        "error": None,
        "dtype": dtype,
        "ours": ours,
    }


def run_case(cid, cfg, args, kwargs=None, grad_paths=((0,),), dtype="float32", ours=None):
    """Run one case through mmdet and append the record. ``args``/``kwargs`` are stored as given
    (tensors may be shared between cases: never mutated, mmdet gets clones).

    The output may be a tensor, a tuple (stored as a list) or a dict of tensors; ``grad_output`` has
    the same structure and ``grads`` are those of the sum over all parts. ``ours`` records a deliberate
    difference documented in docs/semantics.md: ``"refuse"`` (losswire raises a LossError where mmdet
    returns a number) -- None means losswire must match mmdet, error included."""
    case = _new_case(cid, cfg, args, kwargs, grad_paths, dtype, ours)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = MODELS.build(copy.deepcopy(cfg))
        case["output"], case["grad_output"], case["grads"] = _call(module, args, kwargs or {}, grad_paths, cid)
    except Exception as e:
        case["error"] = f"{type(e).__name__}: {e}"
        case["output"] = case["grad_output"] = case["grads"] = None
    CASES.append(case)
    return case


def run_sequence(cid, cfg, calls, dtype="float32", state=()):
    """A stateful loss: one module fed ``calls`` in order, each ``(args, kwargs, grad_paths)``.

    Records ``steps``: per call the output, grad_output, grads and the module's ``state`` attributes
    after the call (e.g. SeesawLoss's ``cum_samples``), so a replay can check every step."""
    case = _new_case(cid, cfg, [], {}, [], dtype, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = MODELS.build(copy.deepcopy(cfg))
    steps = []
    for i, (args, kwargs, grad_paths) in enumerate(calls):
        output, grad_output, grads = _call(module, args, kwargs or {}, grad_paths, f"{cid}/step{i}")
        steps.append(
            {
                "args": _alias(list(args)),
                "kwargs": _alias(dict(kwargs or {})),
                "grad_paths": [list(p) for p in grad_paths],
                "output": output,
                "grad_output": grad_output,
                "grads": grads,
                "state": {name: _state_value(getattr(module, name)) for name in state},
            }
        )
    case["steps"] = steps
    CASES.append(case)
    return case


def _state_value(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return torch.as_tensor(value)


def reset():
    CASES.clear()
    _IDS.clear()


def save(family, file_name=None):
    """Write the collected cases to ``fixtures/mmdet_<family>.pt`` (or ``file_name``) and print a summary."""
    path = os.path.join(FIXTURE_DIR, file_name or f"mmdet_{family}.pt")
    data = {"mmdet_version": str(MMDET_VERSION), "torch_version": str(torch.__version__), "cases": list(CASES)}
    os.makedirs(FIXTURE_DIR, exist_ok=True)
    torch.save(data, path)
    back = torch.load(path, weights_only=True)  # the consumer loads with weights_only=True
    assert len(back["cases"]) == len(CASES)
    counts: dict[str, list[int]] = {}
    for c in CASES:
        k = c["id"].split("/")[0]
        counts.setdefault(k, [0, 0])
        counts[k][0] += 1
        counts[k][1] += c.get("error") is not None
    for k, (n, e) in counts.items():
        print(f"{k:32s} {n:4d} cases ({e} errors)")
    print(f"{family}: {len(CASES)} cases, {os.path.getsize(path)} bytes -> {path}")


# --------------------------------------------------------------------------------------------------
# deterministic inputs (generated in float64, then cast)
# --------------------------------------------------------------------------------------------------
def T(x, dt):
    return x.to(TORCH_DTYPES[dt])


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def unif(g, lo, hi, *shape):
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)


def randint(g, lo, hi, *shape):
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64)


def pos_weight(g, shape, dt, zero_one=True):
    """Positive weights in [0.2, 1.5]; one entry set to 0 (a realistic masked sample)."""
    w = unif(g, 0.2, 1.5, *shape)
    if zero_one and w.numel() > 2:
        w.view(-1)[1] = 0.0
    return T(w, dt)


def reg_pair(g, n, dt, avoid=(0.5, 0.8, 1.0)):
    """pred/target [n,4] with |pred-target| in [0.05, 2.5], kept 0.04 away from every beta in `avoid`."""
    pred = randn(g, n, 4) * 2.0
    mags = []
    while len(mags) < n * 4:
        m = float(unif(g, 0.05, 2.5, 1))
        if all(abs(m - b) > 0.04 for b in avoid):
            mags.append(m)
    sign = torch.where(torch.rand(n, 4, generator=g) < 0.5, -1.0, 1.0).double()
    target = pred - sign * torch.tensor(mags, dtype=torch.float64).view(n, 4)
    return T(pred, dt), T(target, dt)


def box_pair(g, n, dt, nonoverlap=(2,)):
    """Valid boxes (x1<x2, y1<y2); target partially overlaps pred except rows in `nonoverlap`."""
    x1 = unif(g, 0, 10, n)
    y1 = unif(g, 0, 10, n)
    w = unif(g, 2, 6, n)
    h = unif(g, 2, 6, n)
    pred = torch.stack([x1, y1, x1 + w, y1 + h], 1)
    tx1 = x1 + unif(g, -1.5, 1.5, n)
    ty1 = y1 + unif(g, -1.5, 1.5, n)
    tw = w * unif(g, 0.6, 1.4, n)
    th = h * unif(g, 0.6, 1.4, n)
    target = torch.stack([tx1, ty1, tx1 + tw, ty1 + th], 1)
    for r in nonoverlap:
        if r < n:
            target[r, 0::2] += 30.0
    return T(pred, dt), T(target, dt)


# --------------------------------------------------------------------------------------------------
# grid helper
# --------------------------------------------------------------------------------------------------
LWS = (1.0, 0.7)


def combos(full, weights, reductions=RED, afs=AFS):
    """full: every (reduction, weight, avg_factor) in both dtypes (loss_weight alternating so that both
    loss weights meet both dtypes and both avg_factors). not full: one (loss_weight, dtype) per
    (reduction, weight, avg_factor), rotating."""
    rot = [(1.0, "float32"), (0.7, "float64"), (1.0, "float64"), (0.7, "float32")]
    i = 0
    for red in reductions:
        for wname in weights:
            for af in afs:
                if full:
                    for j, dt in enumerate(DTYPES):
                        yield red, wname, af, LWS[(i + j) % 2], dt
                else:
                    lw, dt = rot[i % 4]
                    yield red, wname, af, lw, dt
                i += 1


_INPUT_CACHE = {}


def cached(key, fn):
    if key not in _INPUT_CACHE:
        _INPUT_CACHE[key] = fn(gen(key))
    return _INPUT_CACHE[key]


def add_mode(
    loss, mode, cfg_extra, make_inputs, weights, full=False, grad_targets=(), extra_kwargs=None, reductions=RED, afs=AFS
):
    """make_inputs(g, dt) -> (pred, target); weights: {name: fn(g, pred, target, dt) or None}."""
    for red, wname, af, lw, dt in combos(full, list(weights), reductions, afs):
        base = f"{loss}/{mode}/{dt}"
        pred, target = cached(base, lambda g, dt=dt: make_inputs(g, dt))
        args = [pred, target]
        wfn = weights[wname]
        if wfn is not None:
            args.append(cached(f"{base}/weight-{wname}", lambda g, wfn=wfn, p=pred, t=target, dt=dt: wfn(g, p, t, dt)))
        cfg = {"type": loss, **cfg_extra, "reduction": red, "loss_weight": lw}
        kwargs = dict(extra_kwargs or {})
        if af is not None:
            kwargs["avg_factor"] = af
        cid = f"{loss}/{mode}/weight-{wname}/{red}/af-{af if af is not None else 'none'}/lw-{lw}/{dt}"
        run_case(cid, cfg, args, kwargs, [[0]] + [list(p) for p in grad_targets], dt)


def add_overrides(loss, mode, cfg_extra, make_inputs, weight_fn=None, grad_targets=(), extra_kwargs=None):
    """reduction_override passed in forward, overriding a different cfg reduction."""
    plan = [
        ("mean", "sum", None, "float32"),
        ("sum", "none", None, "float64"),
        ("none", "mean", None, "float32"),
        ("sum", "mean", 3.7, "float64"),
        ("mean", "none", 3.7, "float32"),
    ]
    for cfg_red, ov, af, dt in plan:
        base = f"{loss}/{mode}/{dt}"
        pred, target = cached(base, lambda g, dt=dt: make_inputs(g, dt))
        args = [pred, target]
        wname = "none"
        if weight_fn is not None:
            args.append(cached(f"{base}/weight-override", lambda g, p=pred, t=target, dt=dt: weight_fn(g, p, t, dt)))
            wname = "override-w"
        kwargs = dict(extra_kwargs or {})
        kwargs["reduction_override"] = ov
        if af is not None:
            kwargs["avg_factor"] = af
        cfg = {"type": loss, **cfg_extra, "reduction": cfg_red, "loss_weight": 1.0}
        cid = (
            f"{loss}/{mode}/reduction_override-{ov}-over-{cfg_red}/weight-{wname}/"
            f"af-{af if af is not None else 'none'}/{dt}"
        )
        run_case(cid, cfg, args, kwargs, [[0]] + [list(p) for p in grad_targets], dt)
