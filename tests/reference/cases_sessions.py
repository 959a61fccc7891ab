"""mmdet reference for a shared SeesawLoss session: two workers, three batches each, every order.

Two clients each send three batches to one server-held session; the server serialises them in
some order. For each of the C(6, 3) = 20 possible orders this records one mmdet SeesawLoss module
fed the six batches in that order: every step's losses, gradients and ``cum_samples``. The test
(``tests/service/test_sessions.py``) looks up the order the server actually chose and compares.
Run through ``make_mmdet_fixtures.py sessions``.
"""

# ruff: noqa: N806  (N/C sizes)
from __future__ import annotations

import functools
import itertools

import torch
from mmdet_harness import gen, randint, randn, run_sequence

CFG = {"type": "SeesawLoss", "num_classes": 5, "p": 0.8, "q": 2.0, "loss_weight": 1.0, "return_dict": True}
BATCHES_PER_WORKER = 3


@functools.cache  # one tensor per batch, shared by every order (stored once in the fixture)
def batch(worker: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of ``worker`` ("A" or "B"): cls_score [8, num_classes + 2], labels [8] (5 = background)."""
    N, C = 8, CFG["num_classes"]
    g = gen(f"sessions/{worker}{index}")
    score = (randn(g, N, C + 2) * 1.5).to(torch.float32)
    labels = randint(g, 0, C + 1, N)
    return score, labels


def orders() -> list[str]:
    """Every interleaving of A's and B's batches, e.g. "AABABB" (each worker's batches stay in order)."""
    slots = range(2 * BATCHES_PER_WORKER)
    found = []
    for a_slots in itertools.combinations(slots, BATCHES_PER_WORKER):
        found.append("".join("A" if i in a_slots else "B" for i in slots))
    return found


def cases() -> None:
    for order in orders():
        seen = {"A": 0, "B": 0}
        calls = []
        for worker in order:
            score, labels = batch(worker, seen[worker])
            seen[worker] += 1
            calls.append(([score, labels], {}, [[0]]))
        run_sequence(f"SeesawLoss/sessions/order-{order}", CFG, calls, "float32", state=("cum_samples",))
