"""Where things are, for tests and benchmarks."""

import os
from collections.abc import Mapping
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
PLUGINS = TESTS / "plugins"  # test-only loss plugins (PYTHONPATH for server subprocesses)
OIP_SCRIPTS = TESTS / "oip"  # scripts run with Triton's client in its own environment
FIXTURES = TESTS / "reference" / "fixtures"  # recorded MMDetection numbers
EXAMPLES = ROOT / "examples"


def with_tests_on_path(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with tests/ on PYTHONPATH, for a test module run
    as a script in a subprocess (it imports ``support`` as the test run does)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    return env
