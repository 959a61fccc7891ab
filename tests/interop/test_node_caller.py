"""A caller that is not Python: ``examples/node/evaluate.js`` (grpc-js + proto-loader) against a real server.

The expected losses and gradients come from the engine in this process (``examples/node/make_cases.py``:
``build_loss`` + autograd). Node builds float32/int64 tensors from typed arrays, calls ``Evaluate`` and
checks the answers itself (exit status 0 only if all agree); it also prints what it got, which is
checked here again. A case with a wrong expected value proves Node's check can fail, and an unknown loss
type proves gRPC statuses with their BadRequest detail reach a Node caller.

Needs node and ``npm ci --prefix examples/node``: without them the tests fail under ``CI=true`` and
are skipped otherwise.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest
import torch
from support.examples import import_example
from support.paths import EXAMPLES

pytestmark = pytest.mark.slow  # server subprocesses

NODE_EXAMPLE = EXAMPLES / "node"
EVALUATE_JS = NODE_EXAMPLE / "evaluate.js"
INSTALL_HINT = "run `npm ci --prefix examples/node`"
NODE_TIMEOUT = 120.0  # a hang guard, not a timing assertion


class NodeRun(NamedTuple):
    returncode: int
    verdicts: dict[str, str]  # case name -> "PASS ..." / "FAIL ..." line
    results: dict[str, dict[str, Any]]  # case name -> the RESULT json: what the server returned
    summary: str
    output: str


def require(condition: bool, reason: str) -> None:
    """A missing tool fails the run in CI (where it must be installed) and skips elsewhere."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    require(found is not None, "node is not installed")
    assert found is not None
    require((NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir(), f"no node_modules: {INSTALL_HINT}")
    return found


@pytest.fixture(scope="module")
def make_cases() -> ModuleType:
    yield from import_example(NODE_EXAMPLE / "make_cases.py", "losswire_example_node_make_cases")


def run_node(node: str, target: str, cases: dict[str, Any], directory: Path) -> NodeRun:
    """Writes the case file, runs evaluate.js on it and splits its output into verdicts and results."""
    case_file = directory / "cases.json"
    case_file.write_text(json.dumps(cases))
    completed = subprocess.run(
        [node, str(EVALUATE_JS), "--target", target, "--cases", str(case_file), "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    lines = completed.stdout.splitlines()
    results = {}
    for line in lines:
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
            results[result["case"]] = result
    verdicts = {line.split()[1].rstrip(":"): line for line in lines if line.startswith(("PASS ", "FAIL "))}
    summary = next((line for line in lines if line.startswith("SUMMARY ")), "")
    return NodeRun(completed.returncode, verdicts, results, summary, completed.stdout + completed.stderr)


@pytest.fixture(scope="module")
def engine_cases(make_cases: ModuleType) -> dict[str, Any]:
    return make_cases.build_cases(seed=0)


@pytest.fixture(scope="module")
def node_run(node: str, target: str, engine_cases: dict[str, Any], tmp_path_factory) -> NodeRun:
    return run_node(node, target, engine_cases, tmp_path_factory.mktemp("node"))


def value_cases(cases: dict[str, Any]) -> list[dict[str, Any]]:
    return [case for case in cases["cases"] if "expect" in case]


def test_node_checks_pass_for_every_case(node_run: NodeRun, engine_cases: dict[str, Any]):
    names = [case["name"] for case in engine_cases["cases"]]
    assert node_run.returncode == 0, node_run.output
    assert set(node_run.verdicts) == set(names), node_run.output
    for name in names:
        assert node_run.verdicts[name].startswith(f"PASS {name}:"), node_run.verdicts[name]
    assert node_run.summary == f"SUMMARY passed={len(names)} failed=0", node_run.output


def test_covers_focal_and_giou_scalar_and_elementwise(engine_cases: dict[str, Any]):
    """The cases the issue asks for: FocalLoss mean + avg_factor, FocalLoss 'none' + weight, GIoULoss both."""
    by_name = {case["name"]: case for case in value_cases(engine_cases)}
    focal_mean, focal_none = by_name["focal_mean_avg_factor"], by_name["focal_none_weight"]
    assert focal_mean["config"]["type"] == "FocalLoss" and "avg_factor" in focal_mean
    assert focal_mean["expect"]["loss"]["shape"] == []
    assert focal_none["reduction_override"] == "none" and "weight" in focal_none
    assert focal_none["expect"]["loss"]["shape"] == focal_none["pred"]["shape"]
    assert by_name["giou_mean"]["expect"]["loss"]["shape"] == []
    assert by_name["giou_none"]["expect"]["loss"]["shape"] == [by_name["giou_none"]["pred"]["shape"][0]]


def test_values_node_received_equal_the_engine(node_run: NodeRun, engine_cases: dict[str, Any]):
    """Checked here too, from Node's printout: Node's own comparison is not the only judge."""
    for case in value_cases(engine_cases):
        got = node_run.results[case["name"]]
        pairs = [(got["loss"], case["expect"]["loss"], "loss")]
        pairs += [
            (got["gradients"][key], case["expect"]["gradients"][key], f"gradient {key}") for key in case["gradients"]
        ]
        for received, expected, what in pairs:
            context = f"{case['name']} {what}"
            assert received["shape"] == expected["shape"], context
            torch.testing.assert_close(
                torch.tensor(received["values"], dtype=torch.float64),
                torch.tensor(expected["values"], dtype=torch.float64),
                rtol=case["rtol"],
                atol=case["atol"],
                msg=lambda m, c=context: f"{c}: {m}",
            )


def test_unknown_loss_type_reaches_node_as_not_found_naming_the_field(node_run: NodeRun):
    error = node_run.results["unknown_loss_type"]["error"]
    assert error["code"] == "NOT_FOUND", error
    assert error["fields"] == ["terms[0].config.type"], error
    assert "FocalLos" in error["message"] and "FocalLoss" in error["message"], error  # the typo and the suggestion


def test_node_fails_on_a_wrong_expectation(node: str, target: str, engine_cases: dict[str, Any], tmp_path: Path):
    """Each kind of check can fail: a gradient off by 0.1 %, a loss element off by 1e-4, the wrong error field."""
    cases = copy.deepcopy(engine_cases)
    by_name = {case["name"]: case for case in cases["cases"]}
    by_name["focal_mean_avg_factor"]["expect"]["gradients"]["pred"]["values"][3] *= 1.001
    by_name["giou_none"]["expect"]["loss"]["values"][2] += 1e-4
    by_name["unknown_loss_type"]["expect_error"]["field"] = "terms[0].pred"
    run = run_node(node, target, cases, tmp_path)

    assert run.returncode == 1, run.output
    assert run.verdicts["focal_mean_avg_factor"].startswith("FAIL focal_mean_avg_factor: gradient pred[3] ="), (
        run.output
    )
    assert run.verdicts["giou_none"].startswith("FAIL giou_none: loss[2] ="), run.output
    assert run.verdicts["unknown_loss_type"].startswith("FAIL unknown_loss_type:"), run.output
    assert run.verdicts["focal_none_weight"].startswith("PASS "), run.output
    assert run.summary == "SUMMARY passed=2 failed=3", run.output
