"""What a config and its shapes cost is known before anything is built: ``LOSSES.estimate``.

The pathological configs that a tiny request could once use to make the server allocate without bound
get large estimates naming the parameter to blame, computed from the numbers alone (microseconds; a
config too large to allocate at all is estimated just the same). The constants are calibrated against
measured peaks (the slow test below measures them again, in a subprocess: memory_probe.py).

Measured here (a 2-core VM, one intra-op thread; estimate / measured peak of a forward + backward of
8M-element float32 inputs unless marked; memory_probe.py's cases):

    FocalLoss 1.50 (float64 1.50), FocalCustomLoss 1.50, dense target 1.67, QualityFocalLoss 1.51,
    VarifocalLoss 1.70, GaussianFocalLoss 1.51, CrossEntropyLoss softmax 1.65 (float64 1.67), sigmoid 1.57,
    mask 1.78, CrossEntropyCustomLoss 1.67, KD 1.60, DFL 1.89, DiceLoss 1.67, MultiPosCE 1.58,
    L1 1.53, MSE 1.63, SmoothL1 1.58, BalancedL1 1.51, IoU 1.63, GIoU 1.47 (float64 1.46), DIoU 1.58,
    CIoU 1.43, EIoU 1.59, SIoU 1.55, BoundedIoU 1.52, GHMC 1.90 (float64 2.72), GHMR 1.45,
    EQLV2Loss 1.60, SeesawLoss 1.57, L2Loss 2.02 (float64 2.67), MarginL2Loss 1.51, TripletLoss 1.43,
    AssociativeEmbeddingLoss maps 1.43, 200,000 objects 1.29 (float64 1.21), 200,000 images 1.46, 400,000
    empty images 1.39;
    GHMC 25M bins with momentum: building 1.50, forward 1.45; EQLV2Loss / SeesawLoss 5M classes: 1.55 / 1.42.

    The pathological cases at full size (measured / estimated):
    GHMC bins=2.5e8, building          1.866 / 1.863 GiB ("bins")
    EQLV2Loss num_classes=1e8          1.118 / 1.118 GiB ("num_classes")
    SeesawLoss num_classes=1e8         0.373 / 0.373 GiB ("num_classes")
    SeesawLoss num_classes=8000, a [1, 8002] forward   1.017 / 1.192 GiB ("num_classes")
    TripletLoss [8000, 1] forward      1.610 / 2.265 GiB ("inputs")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from losswire.server.losses import LOSSES, Estimate, LossConfigError, LossInputError, Registry, WeightedLoss

GIB = 2**30
PROBE = Path(__file__).with_name("memory_probe.py")

PATHOLOGICAL = [
    # config, shapes, at least this many bytes in all, the parameter to name
    (dict(type="GHMC", bins=2.5e8), None, 1.8 * GIB, "bins"),
    (dict(type="EQLV2Loss", num_classes=1e8), None, 1.1 * GIB, "num_classes"),
    (dict(type="SeesawLoss", num_classes=1e8), None, 0.37 * GIB, "num_classes"),
    (dict(type="SeesawLoss", num_classes=8000), {"cls_score": (1, 8002), "labels": (1,)}, 1.0 * GIB, "num_classes"),
    (dict(type="TripletLoss"), {"inputs": (8000, 1), "targets": (8000,)}, 1.6 * GIB, "inputs"),
    (dict(type="GHMR", bins=10**18), None, 8e18, "bins"),  # no machine has it: nothing is allocated
    (dict(type="AssociativeEmbeddingLoss"), {"pred": (1, 1, 64, 64), "match": (1, 10**8)}, 20 * GIB, "match"),
]


@pytest.mark.parametrize(("cfg", "shapes", "least", "parameter"), PATHOLOGICAL, ids=lambda v: str(v)[:40])
def test_pathological_configs_get_large_estimates_naming_the_parameter(cfg, shapes, least, parameter):
    estimate = LOSSES.estimate(cfg, shapes)
    assert estimate.total_bytes >= least
    assert estimate.parameter == parameter


@pytest.mark.parametrize(("cfg", "shapes", "least", "parameter"), PATHOLOGICAL, ids=lambda v: str(v)[:40])
def test_estimates_take_microseconds(cfg, shapes, least, parameter):
    LOSSES.estimate(cfg, shapes)  # warm
    start = time.perf_counter()
    for _ in range(100):
        LOSSES.estimate(cfg, shapes)
    assert (time.perf_counter() - start) / 100 < 1e-3  # about 20-100 us here


def test_estimates_allocate_nothing():
    """Building the config's module would take 8 exabytes: the estimate returns it without trying."""
    estimate = LOSSES.estimate(dict(type="EQLV2Loss", num_classes=2**62), {"cls_score": (1, 2**62 + 1)})
    assert estimate.module_bytes == 12 * 2**62 and estimate.module_parameter == "num_classes"
    assert LOSSES.estimate(dict(type="FocalLoss"), {"pred": (2**40, 2**20)}).forward_bytes > 2**62


def test_without_shapes_only_the_module_counts():
    bare = LOSSES.estimate(dict(type="GHMC", bins=1000))
    assert bare.forward_bytes == 0 and bare.module_bytes == 1001 * 8
    assert LOSSES.estimate(dict(type="FocalLoss")) == Estimate(0, 0, 0, "pred", "pred")
    with_momentum = LOSSES.estimate(dict(type="GHMC", bins=1000, momentum=0.5))
    assert with_momentum.module_bytes == 1001 * 8 + 1000 * 4  # acc_sum


def test_the_forward_term_grows_with_the_inputs_and_their_dtype():
    small = LOSSES.estimate(dict(type="FocalLoss"), {"pred": (100, 80), "target": (100,)})
    big = LOSSES.estimate(dict(type="FocalLoss"), {"pred": (1000, 80), "target": (1000,)})
    double = LOSSES.estimate(dict(type="FocalLoss"), {"pred": (1000, 80), "target": (1000,)}, itemsize=8)
    assert big.forward_bytes == 10 * small.forward_bytes and double.forward_bytes == 2 * big.forward_bytes
    assert big.work > small.work > 0


def test_quadratic_terms_follow_their_driver():
    """Seesaw's [C, C] table exists only with the mitigation factor on (p > 0); Triplet's [B, B] grows
    with the batch, not the feature size."""
    shapes = {"cls_score": (4, 2002), "labels": (4,)}
    with_table = LOSSES.estimate(dict(type="SeesawLoss", num_classes=2000), shapes)
    without = LOSSES.estimate(dict(type="SeesawLoss", num_classes=2000, p=0.0), shapes)
    assert with_table.forward_bytes > 50 * without.forward_bytes and with_table.forward_parameter == "num_classes"
    assert without.forward_parameter == "cls_score"
    wide = LOSSES.estimate(dict(type="TripletLoss"), {"inputs": (100, 4096)})
    tall = LOSSES.estimate(dict(type="TripletLoss"), {"inputs": (4096, 100)})
    assert tall.forward_bytes > 10 * wide.forward_bytes


def test_associative_embedding_is_linear_in_its_embeddings():
    """Its push term is computed from sorted embeddings, not from the pairs' matrix: twice the corner pairs,
    or channels, cost twice the bytes beyond the maps."""
    maps = (4, 1, 128, 128)

    def extra(match: tuple[int, int], channels: int = 1) -> int:
        shapes = {"pred": (maps[0], channels, *maps[2:]), "match": match}
        without = LOSSES.estimate(dict(type="AssociativeEmbeddingLoss"), {**shapes, "match": (maps[0], 0)})
        return LOSSES.estimate(dict(type="AssociativeEmbeddingLoss"), shapes).forward_bytes - without.forward_bytes

    assert extra((4, 2000)) == 2 * extra((4, 1000)) == extra((4, 1000), channels=2) > 0
    many = LOSSES.estimate(dict(type="AssociativeEmbeddingLoss"), {"pred": maps, "match": (4, 4 * 10**6)})
    assert many.parameter == "match"


def test_cross_entropy_costs_by_mode():
    shapes = {"cls_score": (1000, 80), "label": (1000,)}
    softmax, sigmoid = (LOSSES.estimate(dict(type="CrossEntropyLoss", use_sigmoid=s), shapes) for s in (False, True))
    assert sigmoid.forward_bytes > softmax.forward_bytes > 0


def test_tuple_inputs_and_bad_shapes():
    qfl = LOSSES.estimate(dict(type="QualityFocalLoss"), {"pred": (10, 3), "target": ((10,), (10,))})
    assert qfl.forward_bytes > 0
    for shapes in ({"pred": (-1, 3)}, {"pred": "10x3"}, {"pred": (2.5,)}, [("pred", (1,))]):
        with pytest.raises(LossInputError, match="shape"):
            LOSSES.estimate(dict(type="FocalLoss"), shapes)


def test_the_config_is_validated_first():
    with pytest.raises(LossConfigError, match=r"GHMC.bins must be an int64"):
        LOSSES.estimate(dict(type="GHMC", bins=2**63))
    with pytest.raises(LossConfigError, match=r"SeesawLoss.num_classes must be >= 1, got 0"):
        LOSSES.estimate(dict(type="SeesawLoss", num_classes=0))


def test_a_plugin_without_an_estimate_gets_the_default():
    registry = Registry("estimates")

    @registry.register_module()
    class Plain(nn.Module):
        """A plugin module declaring no cost."""

        def forward(self, scores: torch.Tensor) -> torch.Tensor:
            return scores.sum()

    @registry.register_module()
    class Weighted(WeightedLoss):
        """A plugin on the engine's base: its default cost model."""

        def forward(self, pred: torch.Tensor) -> torch.Tensor:
            return self.finish(pred, None, self.reduction, None)

    plain = registry.estimate(dict(type="Plain"), {"scores": (10, 10)})
    weighted = registry.estimate(dict(type="Weighted"), {"pred": (10, 10)})
    assert plain == Estimate(0, 16 * 100 * 4, 40 * 100, "scores", "scores")
    assert weighted == Estimate(0, 16 * 100 * 4, 40 * 100, "pred", "pred")


def test_every_loss_declares_an_estimate():
    """Every built-in loss costs its inputs something and names a config key or an input of its own."""
    for name in LOSSES.names():
        description = LOSSES.describe(name)
        params = {"num_classes": 2} if "num_classes" in [p.name for p in description.params] else {}
        inputs = [i.name for i in description.inputs]
        estimate = LOSSES.estimate({"type": name, **params}, {inputs[0]: (8, 4, 2, 2)})
        assert estimate.forward_bytes > 0, name
        assert estimate.parameter in {*inputs, *(p.name for p in description.params)}, name


# -- calibration -----------------------------------------------------------------------------------


def _probe(cases: list[str]) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, str(PROBE), *cases], env=env, capture_output=True, text=True, timeout=600, check=True
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_estimates_hold_against_measured_peaks():
    """Every estimate lies within [0.5, 4] times the measured peak (forward + backward, and building)."""
    sys.path.insert(0, str(PROBE.parent))
    try:
        import memory_probe
    finally:
        sys.path.remove(str(PROBE.parent))
    cases = [c for c in memory_probe.CASES if c not in memory_probe.FULL_SIZE]
    cases += [f"{c}@float64" for c in ("FocalLoss", "GIoULoss", "CrossEntropyLoss", "GHMC", "TripletLoss/batch")]
    ratios = {}
    for result in _probe(cases):
        for part in ("forward_bytes", "module_bytes"):
            measured, estimated = result[part], result["estimate"][part]
            if measured > 2**20:  # below a MiB the process's own noise decides
                ratios[f"{result['case']} {part}"] = estimated / measured
    assert len(ratios) >= len(cases)
    outside = {case: round(ratio, 2) for case, ratio in ratios.items() if not 0.5 <= ratio <= 4}
    assert not outside, f"estimate / measured outside [0.5, 4]: {outside}"
