"""Generate reference fixtures (numbers) for losswire's core losses from real MMDetection 3.3.

MMDetection is a *test-time yardstick only*: this script runs in a separate virtualenv that is not part
of losswire, computes mmdet's forward outputs and gradients for a grid of small, deterministic inputs, and
stores them as plain data in ``tests/reference/fixtures/mmdet_<family>.pt``.  losswire's own test suite reads
that file with ``torch.load(path, weights_only=True)`` and never needs mmdet installed.

Reference environment (outside the repo, CPU only)::

    python3 -m venv /work/ref-venv
    /work/ref-venv/bin/pip install torch==2.13.0          # the local CPU wheel; never another version
    /work/ref-venv/bin/pip install --no-deps mmdet==3.3.0 mmengine==0.10.7 mmcv-lite==2.1.0 \\
        addict pyyaml rich termcolor yapf packaging opencv-python-headless pillow six pycocotools \\
        shapely scipy matplotlib numpy \\
        platformdirs pyparsing cycler python-dateutil kiwisolver fonttools

(``--no-deps`` matters: mmdet's declared dependencies pull in the GUI opencv build and more; the last line
is the pure-python/small deps that yapf and matplotlib need at import time.)

Regenerate from the repo root (all families, or the ones named)::

    /work/ref-venv/bin/python tests/reference/make_mmdet_fixtures.py [core iou ...]

Each family is a module ``tests/reference/cases_<family>.py`` with a ``cases()`` function that calls the
harness (``mmdet_harness.py``: the import shim, ``run_case``, ``run_sequence``, input makers); its cases
are written to ``tests/reference/fixtures/mmdet_<family>.pt``.

Fixture format: ``{"mmdet_version", "torch_version", "cases": [case, ...]}``; each case is a dict with
``id``, ``cfg`` (passed to ``MODELS.build``), ``args`` (positional forward args: tensors, lists of tensors
for tuple targets -- convert a list to a tuple before calling --, None, numbers, strings), ``kwargs``,
``grad_paths`` (index paths into ``args`` of the inputs that require grad), ``output`` (detached; a
tensor, a list for tuple outputs, a dict for dict outputs), ``grad_output`` (upstream gradient, same
structure), ``grads`` (of the sum over all output parts, in ``grad_paths`` order; None where mmdet did not
use the input), ``error`` (None, or ``"ExceptionType: message"`` when mmdet raised; then output/grads are
None), ``dtype`` (dtype of the floating inputs) and ``ours`` (None, or a documented deliberate difference:
``"refuse"``). Stateful cases (``run_sequence``) carry ``steps`` instead: one record per call on one
module, each with its own args/kwargs/output/grads and the module's ``state`` after the call.

The import shim that lets mmdet's losses load without mmcv's compiled ops is described in
``mmdet_harness.py``.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmdet_harness

FAMILIES = ("core", "iou", "cls", "misc", "stateful", "sessions", "samplers")


def main(argv: list[str]) -> None:
    for family in argv or FAMILIES:
        module = importlib.import_module(f"cases_{family}")
        mmdet_harness.reset()
        torch.manual_seed(0)
        module.cases()
        # loss families replay as loss cases; others (samplers) name their own file
        mmdet_harness.save(family, getattr(module, "FIXTURE", None))


if __name__ == "__main__":
    main(sys.argv[1:])
