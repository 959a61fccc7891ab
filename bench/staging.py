"""Host <-> CUDA copy speed: pageable memory against pinned, and the server's staging (``losswire.wire.staging``).

    python bench/staging.py            # 64 and 256 MiB; a table of GB/s
    python bench/staging.py 16 64 1024

Each figure is the median of ``repeats`` timed copies (after one untimed), each timed from its start to
``torch.cuda.synchronize()``. ``staged`` is what a CUDA server does with ``--pinned-staging-bytes``: the
received bytes copied on the host into a pinned buffer, then to the device (to the host: into a pinned
buffer, then copied out of it into memory that outlives the call). A GPU script calls :func:`measure`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from losswire.wire.staging import PinnedPool, Staging

MiB = 1 << 20
WAYS = ("pageable", "pinned", "staged")


def _median_seconds(copy: Callable[[], object], repeats: int) -> float:
    copy()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        copy()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _staged_to_host(staging: Staging, tensor: torch.Tensor, out: torch.Tensor) -> None:
    with staging.to_host(tensor) as (host, _):
        out.copy_(host)


def measure(sizes_mib: Sequence[int] = (64, 256), repeats: int = 9) -> list[dict]:
    """One row per size: ``{"mib", "h2d_<way>_gbps", "d2h_<way>_gbps"}`` for each way of :data:`WAYS`."""
    device = torch.device("cuda", torch.cuda.current_device())
    return [_row(mib, device, repeats) for mib in sizes_mib]


def _row(mib: int, device: torch.device, repeats: int) -> dict:
    nbytes = mib * MiB
    pageable = torch.ones(nbytes, dtype=torch.uint8)  # written once: no page faults in the timings
    back = torch.ones(nbytes, dtype=torch.uint8)
    pinned = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    on_device = torch.ones(nbytes, dtype=torch.uint8, device=device)
    staging = Staging(PinnedPool(2 * nbytes))
    ways = {
        "h2d_pageable": lambda: pageable.to(device),
        "h2d_pinned": lambda: pinned.to(device, non_blocking=True),
        "h2d_staged": lambda: staging.to_device(pageable, device),
        "d2h_pageable": lambda: back.copy_(on_device),
        "d2h_pinned": lambda: pinned.copy_(on_device, non_blocking=True),
        "d2h_staged": lambda: _staged_to_host(staging, on_device, back),
    }
    row: dict = {"mib": mib}
    for name, copy in ways.items():
        row[f"{name}_gbps"] = nbytes / _median_seconds(copy, repeats) / 1e9
    staging.pool.clear()
    return row


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("bench/staging.py measures copies between the host and a CUDA device; this host has none")
        return 1
    sizes = [int(arg) for arg in argv] or [64, 256]
    print(f"{torch.cuda.get_device_name()}: GB/s, median of 9 copies")
    print(f"{'MiB':>6} " + " ".join(f"{f'{way} {kind}':>16}" for way in ("h2d", "d2h") for kind in WAYS))
    for row in measure(sizes):
        figures = " ".join(f"{row[f'{way}_{kind}_gbps']:>16.1f}" for way in ("h2d", "d2h") for kind in WAYS)
        print(f"{row['mib']:>6} {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
