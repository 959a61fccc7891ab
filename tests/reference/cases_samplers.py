"""mmdet reference for the sampling step: which indices RandomSampler / PseudoSampler keep.

Labels follow mmdet's convention (``0 <= label < background`` positive, ``background`` negative,
-1 ignored) and become an ``AssignResult`` (gt_inds 1 / 0 / -1) for mmdet's own samplers, called
with ``add_gt_as_proposals=False`` after ``torch.manual_seed(seed)``. Each record holds the sampler
config, labels, background, seed and mmdet's sorted positive and negative indices; the test
(``tests/service/test_sampling.py``) asks losswire's sampler for the same. Run through
``make_mmdet_fixtures.py samplers``.
"""

from __future__ import annotations

import torch
from mmdet.models.task_modules.assigners import AssignResult
from mmdet.models.task_modules.samplers import PseudoSampler, RandomSampler
from mmdet_harness import CASES, gen, randint
from mmengine.structures import InstanceData

FIXTURE = "samplers.pt"  # not loss cases: kept out of the mmdet_*.pt files the parity tests replay


def labels_for(key: str, n: int, background: int, positive_rate: float, ignored: int) -> torch.Tensor:
    g = gen(key)
    labels = torch.full((n,), background, dtype=torch.int64)
    positive = torch.rand(n, generator=g) < positive_rate
    labels[positive] = randint(g, 0, background, int(positive.sum()))
    if ignored:
        labels[torch.randperm(n, generator=g)[:ignored]] = -1
    return labels


def mmdet_sample(
    cfg: dict, labels: torch.Tensor, background: int, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    gt_inds = torch.where(labels == background, 0, torch.where(labels < 0, -1, 1))
    assign = AssignResult(num_gts=1, gt_inds=gt_inds, max_overlaps=torch.zeros(len(labels)), labels=labels)
    params = {k: v for k, v in cfg.items() if k != "type"}
    sampler = RandomSampler(**params, add_gt_as_proposals=False) if cfg["type"] == "RandomSampler" else PseudoSampler()
    pred = InstanceData(priors=torch.zeros(len(labels), 4))
    gt = InstanceData(bboxes=torch.zeros(1, 4), labels=torch.zeros(1, dtype=torch.long))
    if seed is not None:  # None: the caller seeded once before a loop over images
        torch.manual_seed(seed)
    result = sampler.sample(assign, pred, gt)
    return result.pos_inds.sort().values, result.neg_inds.sort().values


def cases() -> None:
    grid = [
        # (n, background, positive rate, ignored, sampler config)
        (300, 5, 0.2, 20, {"type": "RandomSampler", "num": 64, "pos_fraction": 0.25}),
        (300, 5, 0.4, 0, {"type": "RandomSampler", "num": 64, "pos_fraction": 0.25}),  # positives capped
        (300, 5, 0.02, 0, {"type": "RandomSampler", "num": 64, "pos_fraction": 0.5}),  # few positives
        (200, 1, 0.3, 10, {"type": "RandomSampler", "num": 256, "pos_fraction": 0.5}),  # fewer than num
        (400, 80, 0.1, 0, {"type": "RandomSampler", "num": 128, "pos_fraction": 0.25, "neg_pos_ub": 3}),
        (400, 80, 0.0, 0, {"type": "RandomSampler", "num": 128, "pos_fraction": 0.25, "neg_pos_ub": 3}),
        (400, 80, 0.1, 5, {"type": "RandomSampler", "num": 128, "pos_fraction": 0.25, "neg_pos_ub": 0}),
        (120, 3, 0.3, 15, {"type": "PseudoSampler"}),
    ]
    for i, (n, background, rate, ignored, cfg) in enumerate(grid):
        labels = labels_for(f"samplers/{i}", n, background, rate, ignored)
        for seed in (0, 7, 2**40 + 3):
            pos, neg = mmdet_sample(cfg, labels, background, seed)
            CASES.append(
                {
                    "id": f"{cfg['type']}/grid-{i}/seed-{seed}",
                    "groups": None,
                    "sampler": cfg,
                    "labels": labels,
                    "background": background,
                    "seed": seed,
                    "positives": pos,
                    "negatives": neg,
                }
            )
    per_image_cases()


def per_image_cases() -> None:
    """A batch of three images sampled image by image, as a head does: one ``torch.manual_seed`` before
    the loop, then each image's sampler call in image order (each with its own ``num`` budget)."""
    cfg = {"type": "RandomSampler", "num": 32, "pos_fraction": 0.25}
    sizes, background = (90, 60, 120), 3
    images = [labels_for(f"samplers/image-{i}", n, background, 0.3, 4) for i, n in enumerate(sizes)]
    labels = torch.cat(images)
    groups = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)])
    for seed in (1, 99):
        torch.manual_seed(seed)
        positives, negatives, offset = [], [], 0
        for image in images:
            pos, neg = mmdet_sample(cfg, image, background, seed=None)
            positives.append(pos + offset)
            negatives.append(neg + offset)
            offset += len(image)
        CASES.append(
            {
                "id": f"RandomSampler/per-image/seed-{seed}",
                "groups": groups,
                "sampler": cfg,
                "labels": labels,
                "background": background,
                "seed": seed,
                "positives": torch.cat(positives).sort().values,
                "negatives": torch.cat(negatives).sort().values,
            }
        )
