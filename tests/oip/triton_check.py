"""Checks a losswire server through Triton's own client, ``tritonclient.grpc``, against expected values.

Runs in its own virtualenv (tritonclient needs protobuf < 7, losswire >= 7.35), with only
tritonclient and numpy: it never imports losswire. tests/service/test_inference_protocol.py computes the
expected values with the loss engine, writes them to a case file and runs:

    .venv-oip/bin/python tests/oip/triton_check.py --url 127.0.0.1:PORT --cases cases.json

The case file (JSON)::

    {"cases": [{"id": "...", "model": "FocalLoss", "config": {...}, "parameters": {...},
                "inputs": [{"name": "pred", "datatype": "FP32", "shape": [8, 5], "data": [...flat]}],
                "outputs": ["loss", "grad_pred"] or null (the server's default),
                "expected": {"loss": {"datatype": "FP32", "shape": [], "data": [...flat]}, ...},
                "rtol": 1e-5, "atol": 1e-6}],
     "errors": [{"id": "...", "model": "...", ..., "status": "StatusCode.NOT_FOUND", "message": "..."}],
     "not_ready": ["NoSuchLoss"]}

Prints one line per check and exits 1 when any check fails (2 when the server cannot be reached).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def array(spec: dict[str, Any]) -> np.ndarray:
    return np.array(spec["data"], dtype=triton_to_np_dtype(spec["datatype"])).reshape(spec["shape"])


def infer(client: triton.InferenceServerClient, case: dict[str, Any]) -> triton.InferResult:
    """One ``infer()`` call the way a Triton user writes it: InferInput + set_data_from_numpy + parameters."""
    inputs = []
    for spec in case["inputs"]:
        tensor = triton.InferInput(spec["name"], spec["shape"], spec["datatype"])
        tensor.set_data_from_numpy(array(spec))
        inputs.append(tensor)
    outputs = None
    if case.get("outputs") is not None:
        outputs = [triton.InferRequestedOutput(name) for name in case["outputs"]]
    parameters = {"config": json.dumps(case.get("config", {})), **case.get("parameters", {})}
    return client.infer(case["model"], inputs, outputs=outputs, parameters=parameters, client_timeout=60)


def compare(result: triton.InferResult, case: dict[str, Any]) -> list[str]:
    """The mismatches between a response and the case's expected outputs (empty: all match)."""
    problems = []
    returned = [output.name for output in result.get_response().outputs]
    if sorted(returned) != sorted(case["expected"]):
        problems.append(f"outputs {returned}, expected {sorted(case['expected'])}")
    for name, spec in case["expected"].items():
        got, want = result.as_numpy(name), array(spec)
        if got is None:
            problems.append(f"{name}: missing")
        elif got.dtype != want.dtype or got.shape != want.shape:
            problems.append(f"{name}: {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")
        elif not np.allclose(got, want, rtol=case.get("rtol", 1e-5), atol=case.get("atol", 1e-6)):
            worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            problems.append(f"{name}: values differ (max abs difference {worst:.3g})")
    return problems


def check_model(client: triton.InferenceServerClient, case: dict[str, Any]) -> list[str]:
    problems = []
    if not client.is_model_ready(case["model"]):
        problems.append(f"is_model_ready({case['model']!r}) is False")
    metadata = client.get_model_metadata(case["model"])
    inputs = {tensor.name for tensor in metadata.inputs}
    outputs = {tensor.name for tensor in metadata.outputs}
    if metadata.name != case["model"] or "loss" not in outputs:
        problems.append(f"get_model_metadata: name {metadata.name!r}, outputs {sorted(outputs)}")
    unlisted = {spec["name"] for spec in case["inputs"]} - inputs
    if unlisted:
        problems.append(f"get_model_metadata lists inputs {sorted(inputs)}, not {sorted(unlisted)}")
    return problems


def check_error(client: triton.InferenceServerClient, case: dict[str, Any]) -> list[str]:
    try:
        infer(client, case)
    except InferenceServerException as error:
        problems = []
        if error.status() != case["status"]:
            problems.append(f"status {error.status()}, expected {case['status']}")
        if case["message"] not in (error.message() or ""):
            problems.append(f"message {error.message()!r} lacks {case['message']!r}")
        return problems
    return [f"infer() succeeded, expected {case['status']}"]


def report(label: str, problems: list[str]) -> bool:
    print(f"{'ok  ' if not problems else 'FAIL'} {label}" + "".join(f"\n     {p}" for p in problems))
    return not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="HOST:PORT of the losswire server")
    parser.add_argument("--cases", required=True, help="the case file (JSON) written by the pytest side")
    args = parser.parse_args(argv)
    with open(args.cases) as file:
        cases = json.load(file)
    client = triton.InferenceServerClient(url=args.url)
    try:
        live, ready = client.is_server_live(), client.is_server_ready()
    except InferenceServerException as error:
        print(f"FAIL cannot reach {args.url}: {error}")
        return 2
    passed = report("is_server_live / is_server_ready", [] if live and ready else [f"live={live} ready={ready}"])
    name = client.get_server_metadata().name
    passed &= report("get_server_metadata", [] if name == "losswire" else [f"name {name!r}"])
    for model in cases.get("not_ready", []):
        passed &= report(f"is_model_ready({model!r}) is False", ["True"] if client.is_model_ready(model) else [])
    for case in cases.get("cases", []):
        passed &= report(f"{case['id']}: ready + metadata", check_model(client, case))
        passed &= report(f"{case['id']}: infer", compare(infer(client, case), case))
    for case in cases.get("errors", []):
        passed &= report(f"{case['id']}: error", check_error(client, case))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
