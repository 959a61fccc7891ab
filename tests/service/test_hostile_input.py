"""Hostile input gets a clear refusal, never INTERNAL or UNKNOWN, and never bloats the server.

Each case is a request a careless or hostile caller sent a losswire server (by hand, as any language
can): absurd declared sizes, megabytes of name, JSON built to break a parser, typed contents that expand
in memory. The answer names the field and the limit; the server serves the next call.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from typing import Any

import grpc
import pytest
import torch
from support.calls import evaluate_stream, field_of, plain_channel
from support.in_process import nothing_held
from support.oip import infer_request, outputs_of
from support.servers import ServerProcess, module_cmd, server_env

from losswire.client import RemoteLoss, RemoteLossError
from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.server.dataplane import Dataplane, NotQuick
from losswire.server.dataplane.calls import QUICK_MAX_TERMS
from losswire.server.dataplane.limits import MAX_TERM_ENTRIES
from losswire.server.errors import RequestError
from losswire.server.losses import build_loss
from losswire.server.rpc import inference, oip_convert
from losswire.server.rpc.compute import QUICK_MAX_MESSAGE_BYTES
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec
from losswire.wire.protocol import EVALUATE_STREAM_METHOD, MAX_JSON_BYTES

BAD = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() not in BAD, error.value.details()
    return error.value


def good_call_is_answered(target: str) -> None:
    with plain_channel(target) as channel:
        answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request("L1Loss", {"pred": torch.ones(3), "target": torch.zeros(3)}), timeout=30
        )
    assert outputs_of(answer)["loss"].item() == 1.0


def python_calls_in(work) -> tuple[BaseException | None, int]:
    """What ``work()`` raised, and how many Python function calls it made (this thread's)."""
    calls = 0

    def count(_frame, event, _arg) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        work()
    except Exception as error:  # the test reads it
        return error, calls
    finally:
        sys.setprofile(None)
    return None, calls


NESTED = [[index, str(index)] for index in range(40_000)]  # 950 KB: 120,000 values to convert


@pytest.mark.parametrize(
    "config, words",
    [
        ({"type": "FocalLoss", "junk": NESTED}, "FocalLoss has no parameter 'junk'"),
        ({"type": "FocalLoss", "alpha": NESTED}, "FocalLoss.alpha must be a float, got a JSON list"),
        ({"type": "CrossEntropyLoss", "class_weight": {str(i): i for i in range(40_000)}}, "got a JSON object"),
    ],
    ids=["unknown key", "list for a float", "object for a list"],
)
def test_a_big_config_that_cannot_be_right_is_refused_before_its_values_are_converted(config, words):
    """Converting a config's values is Python, ~5 us a value: 950 KB of nested values under a key the loss does
    not have, or under a float parameter, cost 0.35 s of a compute thread (and of the interpreter lock that
    every other call needs) before it was refused. A big config's keys and the kinds of their values are now
    checked first: the refusal makes a few hundred Python calls, not the 120,000 the values would take."""
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config(config, term.config)
    codec.encode_tensor(torch.randn(4, 80), term.pred)
    codec.encode_value(torch.randint(0, 80, (4,)), term.target)
    dataplane = Dataplane(torch.device("cpu"))
    error, calls = python_calls_in(lambda: dataplane.evaluate(request, lambda: False))
    assert error is not None and words in str(error), error
    assert calls < 2_000, calls


def focal_term(request: pb.EvaluateRequest) -> pb.LossTerm:
    term = request.terms.add()
    codec.encode_config({"type": "FocalLoss"}, term.config)
    codec.encode_tensor(torch.randn(4, 80), term.pred)
    codec.encode_value(torch.randint(0, 80, (4,)), term.target)
    return term


def many_entries(where: str) -> pb.EvaluateRequest:
    """A FocalLoss term with 25,000 entries in one of its maps or lists (a few hundred KB)."""
    request = pb.EvaluateRequest()
    term = focal_term(request)
    if where == "target.tensors":
        term.target.tensors.items.extend(pb.Tensor(dtype=pb.FLOAT32) for _ in range(25_000))
    elif where == "gradients":
        term.gradients.extend(["pred"] * 25_000)
    else:
        entries = getattr(term, where)
        for index in range(25_000):
            tensor = entries[f"k{index}"].tensor if where == "inputs" else entries[f"k{index}"]
            tensor.dtype = pb.FLOAT32
    return request


@pytest.mark.parametrize("where", ["target.tensors", "inputs", "grad_outputs", "gradients"])
def test_a_term_with_thousands_of_entries_is_refused_before_they_are_walked(where):
    """Each entry of a term's maps and lists costs Python to walk, check and decode (~10 us): 25,000 tiny
    tensors in a 600 KB request took 0.5 s of the event loop to refuse (a valid one with 150,000 "pred" in
    ``gradients`` was answered, after 0.27 s), and two callers sending them starved every other call. A term
    holds at most MAX_TERM_ENTRIES of each; counted, not read."""
    request = many_entries(where)
    dataplane = Dataplane(torch.device("cpu"))
    error, calls = python_calls_in(lambda: dataplane.evaluate(request, lambda: False, quick=True))
    assert isinstance(error, RequestError) and error.field == f"terms[0].{where}", error
    assert f"holds 25000 entries; a term takes at most {MAX_TERM_ENTRIES}" in str(error)
    assert calls < 2_000, calls


def test_many_small_terms_are_not_quick():
    """Each term costs a fixed ~0.6 ms of Python beyond its loss: 256 tiny terms held the event loop
    140-210 ms. A call of more than QUICK_MAX_TERMS terms goes to a compute thread."""
    request = pb.EvaluateRequest()
    for _ in range(QUICK_MAX_TERMS + 1):
        focal_term(request)
    with pytest.raises(NotQuick):
        Dataplane(torch.device("cpu")).evaluate(request, lambda: False, quick=True)


def test_an_unknown_loss_name_of_a_megabyte_is_refused_without_comparing_it():
    """The refusal suggests registered names close to an unknown one (difflib, quadratic in the name): a
    950 KB name took ~125 ms, and was quoted whole. A name over 128 characters is neither."""
    request = pb.EvaluateRequest()
    term = focal_term(request)
    codec.encode_config({"type": "L" * 950_000}, term.config)
    error, calls = python_calls_in(lambda: Dataplane(torch.device("cpu")).evaluate(request, lambda: False))
    assert error is not None and "950000 characters" in str(error) and len(str(error)) < 2_000, str(error)[:200]
    assert calls < 2_000, calls


@pytest.mark.parametrize("elements", [(1 << 33) // 4, 2**62])
def test_a_stream_header_declaring_an_absurd_size_is_refused_before_allocation(target, elements):
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config({"type": "L1Loss"}, term.config)
    for message in (term.pred, term.target.tensor):
        message.dtype, message.shape[:] = pb.FLOAT32, [elements]
    with plain_channel(target) as channel:
        method = channel.stream_stream(
            EVALUATE_STREAM_METHOD, request_serializer=chunks.serialize_chunk, response_deserializer=bytes
        )
        error = refused(lambda: list(method(iter([pb.EvaluateChunk(request=request)]), timeout=30)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-message-bytes" in error.details() and field_of(error) == "terms[0].pred.shape"
    good_call_is_answered(target)


@pytest.mark.parametrize("size", [1 << 20, 8 << 20])
def test_megabytes_of_name_come_back_as_a_short_message(target, size):
    """A loss type or session name of megabytes: the real refusal, quoted in a few hundred characters
    (not "metadata size exceeds hard limit"). A type name is at most a config's bound (MAX_JSON_BYTES), so
    it is half of that here; a config over the bound is refused for its size, before it is parsed."""
    for config, session, code, field in (
        ({"type": "x" * (MAX_JSON_BYTES // 2)}, "", grpc.StatusCode.NOT_FOUND, "terms[0].config.type"),
        ({"type": "L1Loss"}, "s" * size, grpc.StatusCode.INVALID_ARGUMENT, "terms[0].session"),
        ({"type": "x" * size}, "", grpc.StatusCode.RESOURCE_EXHAUSTED, "terms[0].config"),
    ):
        request = pb.EvaluateRequest()
        term = request.terms.add(session=session)
        codec.encode_config(config, term.config)
        codec.encode_tensor(torch.ones(3), term.pred)
        codec.encode_value(torch.zeros(3), term.target)
        with plain_channel(target) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            error = refused(lambda stub=stub, request=request: stub.Evaluate(request, timeout=30))
        assert error.code() == code, error.details()
        assert len(error.details()) < 1000 and field_of(error) == field
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "more characters" in error.details()
        else:
            assert f"at most {MAX_JSON_BYTES}" in error.details()
    good_call_is_answered(target)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, '{"a": ' * 100_000 + "1" + "}" * 100_000, '{"gamma": ' + "9" * 5000 + "}"],
    ids=["unclosed", "deep", "long-integer"],
)
def test_json_built_to_break_the_parser_is_invalid_argument(target, text):
    request = infer_request("FocalLoss", {"pred": torch.randn(4, 3), "target": torch.tensor([0, 1, 2, 3])})
    request.parameters["config"].string_param = text
    with plain_channel(target) as channel:
        error = refused(lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(error) == "parameters[config]"
    good_call_is_answered(target)


def _peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def typed_zeros_request(count: int) -> oip.ModelInferRequest:
    """An L1Loss call whose target is ``count`` int64 zeros in typed contents (1 byte each on the wire)
    and whose pred is one number: the target is converted, then refused for its shape."""
    request = oip.ModelInferRequest(model_name="L1Loss")
    request.inputs.add(name="pred", datatype="FP32", shape=[1]).contents.fp32_contents.append(0.0)
    target = request.inputs.add(name="target", datatype="INT64", shape=[count])
    target.contents.int64_contents.extend([0] * count)
    return request


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("max_message_bytes", "code"), [(None, "INVALID_ARGUMENT"), (64 << 20, "RESOURCE_EXHAUSTED")])
def test_typed_contents_are_bounded_like_raw_bytes(max_message_bytes, code):
    """20 M int64 zeros in ``int64_contents`` (19 MiB on the wire, 160 MB as values): converted into one
    array, not a list of Python numbers (the server's peak grew 921 MiB before, 48 bytes a value), and
    counted against --max-message-bytes by the bytes they declare, like raw contents: refused before
    they are converted when over it."""
    count = 20_000_000
    flags = [] if max_message_bytes is None else ["--max-message-bytes", str(max_message_bytes)]
    process = ServerProcess(module_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", *flags), server_env())
    try:
        process.wait_started()
        request = typed_zeros_request(count)
        before = _peak_rss_bytes(process.proc.pid)
        with grpc.insecure_channel(process.target, options=[("grpc.max_send_message_length", -1)]) as channel:
            error = refused(lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120))
        assert error.code().name == code, error.details()
        grown = _peak_rss_bytes(process.proc.pid) - before
        assert grown < 40 * count, f"the server's peak memory grew {grown / 2**20:.0f} MiB for {count} values"
        good_call_is_answered(process.target)
    finally:
        process.close()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"type": "GHMC", "bins": 250_000_000}, "config.bins"),
        ({"type": "EQLV2Loss", "num_classes": 100_000_000}, "config.num_classes"),
        ({"type": "SeesawLoss", "num_classes": 100_000_000}, "config.num_classes"),
    ],
)
def test_a_tiny_config_that_would_build_a_huge_module_is_refused_before_it_is_built(client, config, field):
    """Describe builds the module: its loss's estimate (GB of bins or per-class buffers for a 37-byte
    config) is checked against --max-module-bytes first."""
    with pytest.raises(RemoteLossError) as refused:
        client.describe(config)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details
    assert refused.value.field == field and "--max-module-bytes" in refused.value.details


@pytest.mark.parametrize(
    ("config", "pred", "target_", "field"),
    [
        (
            {"type": "SeesawLoss", "num_classes": 8000},
            torch.randn(1, 8002),
            torch.tensor([3]),
            "terms[0].config.num_classes",
        ),
        ({"type": "TripletLoss"}, torch.randn(8000, 1), torch.arange(8000) % 7, "terms[0].pred"),
    ],
    ids=["seesaw-classes-squared", "triplet-samples-squared"],
)
def test_a_small_call_whose_loss_is_quadratic_in_a_size_is_refused_naming_it(target, config, pred, target_, field):
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config(config, term.config)
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(target_, term.target)
    with plain_channel(target) as channel:
        error = refused(lambda: pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert field_of(error) == field and "--term-memory-ratio" in error.details()


def test_associative_embedding_costs_grow_linearly_with_objects_and_images(client):
    """The push term compares every pair of an image's embeddings. Computed from the sorted embeddings,
    15,000 corner pairs in one image (840 KB of JSON) cost megabytes, and are answered as the loss computes
    them in this process (the pairwise matrices were estimated at 7 GB and refused); 100,000 empty images
    cost no Python step each (refused before, by their estimate of 24 KiB and a loop step each)."""
    g = torch.Generator().manual_seed(5)
    maps = [torch.randn(1, 1, 64, 64, generator=g) for _ in range(2)]
    pairs = [[[a, b], [c, d]] for a, b, c, d in torch.randint(0, 64, (15_000, 4), generator=g).tolist()]
    config = dict(type="AssociativeEmbeddingLoss")
    remote = [m.clone().requires_grad_() for m in maps]
    local = [m.clone().requires_grad_() for m in maps]
    remote_pull, remote_push = RemoteLoss(config, client=client)(*remote, [pairs])
    local_pull, local_push = build_loss(config)(*local, [pairs])
    (remote_pull + remote_push).backward()
    (local_pull + local_push).backward()
    torch.testing.assert_close((remote_pull, remote_push), (local_pull, local_push))
    for leaf, reference in zip(remote, local, strict=True):
        torch.testing.assert_close(leaf.grad, reference.grad)
    empty = torch.zeros(100_000, 1, 0, 0)
    pull, push = RemoteLoss(config, client=client)(empty, empty, [[]] * 100_000)
    assert pull.item() == 0 and push.item() == 0


@pytest.mark.parametrize(
    ("config", "shape", "inputs"),
    [
        ({"type": "KnowledgeDistillationKLDivLoss", "reduction": "none"}, [10**8, 0], {}),
        ({"type": "MultiPosCrossEntropyLoss"}, [10**8, 0], {}),
    ],
    ids=["a-loss-per-row", "a-loss-per-row-then-mean"],
)
def test_inputs_without_bytes_whose_loss_has_a_row_per_sample_are_refused(target, config, shape, inputs):
    """pred and target of shape [N, 0] carry no bytes, but a loss per row has N elements: 100 bytes of
    request must not buy gigabytes and minutes of work. (Before, such calls were estimated at nothing:
    [3e8, 0] took 54 s and 11 GB.)"""
    request = pb.EvaluateRequest()
    term = request.terms.add()
    codec.encode_config(config, term.config)
    empty = torch.zeros(shape)
    codec.encode_tensor(empty, term.pred)
    codec.encode_value(empty.clone(), term.target)
    for name, value in inputs.items():
        codec.encode_value(value, term.inputs[name])
    with plain_channel(target) as channel:
        error = refused(lambda: pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert field_of(error) == "terms[0].pred" and "--term-memory-ratio" in error.details()
    good_call_is_answered(target)


@pytest.mark.parametrize("value", [2**63, 1e19, 1e308, math.inf, math.nan])
def test_absurd_numbers_in_a_config_are_invalid_argument_naming_them(client, value):
    with pytest.raises(RemoteLossError) as refused:
        client.describe({"type": "SeesawLoss", "num_classes": value})
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details
    assert refused.value.field == "config.num_classes"


# -- the Open Inference Protocol: values Python or protobuf cannot hold, and answers built to be huge ---------


def focal_request() -> oip.ModelInferRequest:
    return infer_request("FocalLoss", {"pred": torch.randn(4, 3), "target": torch.tensor([0, 1, 2, 3])})


def model_infer_refused(target: str, request: oip.ModelInferRequest) -> grpc.RpcError:
    with plain_channel(target) as channel:
        return refused(lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30))


@pytest.mark.parametrize("digits", [4301, 7], ids=["beyond-int-parsing", "seven-digits"])
def test_a_tuple_member_index_of_many_digits_is_invalid_argument(target, digits):
    """``target[<4301 digits>]``: int() refuses that many digits (ValueError, answered INTERNAL before); an
    index no request could reach is refused by its length, before any conversion."""
    request = focal_request()
    request.inputs[1].name = "target[" + "1" * digits + "]"
    error = model_infer_refused(target, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == "inputs[1].name"
    assert "inputs[1].name" in error.details() and f"got {digits} digits" in error.details()
    good_call_is_answered(target)


@pytest.mark.parametrize(
    ("model", "name", "value"),
    [("FocalLoss", "avg_factor", 2**63), ("CrossEntropyLoss", "ignore_index", 2**64 - 1)],
    ids=["avg_factor", "ignore_index"],
)
def test_a_uint64_parameter_beyond_int64_is_invalid_argument(target, model, name, value):
    """A ``uint64_param`` of 2**63 or more does not fit the int64 it travels in to the engine ("Value out of
    range" from protobuf, answered INTERNAL before)."""
    request = infer_request(model, {"pred": torch.randn(4, 3), "target": torch.tensor([0, 1, 2, 0])})
    request.parameters[name].uint64_param = value
    error = model_infer_refused(target, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == f"parameters[{name}]"
    assert f"parameters[{name}]" in error.details() and str(value) in error.details() and "int64" in error.details()
    good_call_is_answered(target)


def nested_list(depth: int) -> str:
    """A JSON list ``depth`` levels deep: ``[[...[]...]]``."""
    return "[" * depth + "]" * depth


def association_request(match: str) -> oip.ModelInferRequest:
    inputs = {"pred": torch.randn(1, 1, 4, 4), "target": torch.randn(1, 1, 4, 4)}
    return infer_request("AssociativeEmbeddingLoss", inputs, match=match)


@pytest.mark.parametrize("depth", [600, 900, codec.MAX_JSON_DEPTH + 1])
@pytest.mark.parametrize("parameter", ["config", "match"])
def test_json_parameters_nested_too_deep_are_invalid_argument(target, parameter, depth):
    """JSON that json.loads parses but that nests deeper than ``codec.MAX_JSON_DEPTH``: refused naming the
    parameter, not a RecursionError in the codec (INTERNAL before)."""
    if parameter == "config":
        request = focal_request()
        request.parameters["config"].string_param = '{"gamma": ' + nested_list(depth - 1) + "}"
    else:
        request = association_request(nested_list(depth))
    error = model_infer_refused(target, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == f"parameters[{parameter}]"
    assert f"nests {depth} levels deep" in error.details() and f"at most {codec.MAX_JSON_DEPTH}" in error.details()
    good_call_is_answered(target)


def test_a_json_parameter_holding_an_integer_beyond_a_double_is_invalid_argument(target):
    """``match`` holding a 400-digit integer: json.loads keeps it an int, which protobuf's JSON Value (a double)
    cannot hold (OverflowError in the codec, INTERNAL before)."""
    error = model_infer_refused(target, association_request("[" + "9" * 400 + "]"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == "parameters[match]" and "parameters[match]" in error.details()
    good_call_is_answered(target)


def test_a_config_nested_as_deep_as_allowed_reaches_the_loss(target):
    """At the bound, the config is the loss's to judge (gamma must be a float), not refused for its depth."""
    request = focal_request()
    request.parameters["config"].string_param = '{"gamma": ' + nested_list(codec.MAX_JSON_DEPTH - 1) + "}"
    error = model_infer_refused(target, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == "config.gamma"


def test_the_codec_refuses_what_protobuf_cannot_hold_with_a_codec_error():
    """The codec's own guard, for every caller: an int beyond int64 and JSON deeper than MAX_JSON_DEPTH are
    CodecErrors (INVALID_ARGUMENT), not ValueError / RecursionError (INTERNAL)."""
    assert codec.encode_value(2**63 - 1).integer == 2**63 - 1
    assert codec.encode_value(-(2**63)).integer == -(2**63)
    for value in (2**63, -(2**63) - 1, 10**5000):
        with pytest.raises(codec.CodecError, match="int64"):
            codec.encode_value(value)
    deep: list = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(codec.CodecError, match="deeper than"):
        codec.encode_value({"match": deep})
    with pytest.raises(codec.CodecError, match="deeper than"):
        codec.encode_config({"type": "FocalLoss", "gamma": deep})


def test_an_output_named_many_times_is_invalid_argument(target):
    """``loss`` x 3000 in outputs: each copy got its own copy of the loss in the answer (a 0.3 MB request
    made a 300 MB answer, built on the event loop). Refused, naming the first repeat; the server serves on."""
    request = infer_request("L1Loss", {"pred": torch.zeros(1000), "target": torch.zeros(1000)}, {"reduction": "none"})
    for _ in range(3000):
        request.outputs.add(name="loss")
    error = model_infer_refused(target, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == "outputs[1].name"
    assert "outputs[1].name" in error.details() and "'loss' again" in error.details()
    good_call_is_answered(target)


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_a_big_model_infer_is_converted_off_the_event_loop(target, monkeypatch):
    """A ModelInfer over QUICK_MAX_MESSAGE_BYTES (here for its 1.2 MB of raw contents) is converted (its
    contents read into tensors) on a compute thread, as a big Evaluate is decoded: on the event loop, a big
    conversion stalled every other call (ServerLive waited 3 s for a 15 MB config). A small one is
    converted on the loop (no thread hop).

    The in-process server's ``Conversion`` is spied on: where it ran is recorded, not timed (a latency bound
    would be flaky on a loaded machine)."""
    ran_on_loop: list[bool] = []
    real = inference.Conversion

    def spy(*args: Any) -> oip_convert.Conversion:
        ran_on_loop.append(on_event_loop())
        return real(*args)

    monkeypatch.setattr(inference, "Conversion", spy)
    classes = 150_000
    request = infer_request("CrossEntropyLoss", {"pred": torch.zeros(2, classes), "target": torch.tensor([0, 1])})
    assert request.ByteSize() > QUICK_MAX_MESSAGE_BYTES
    with plain_channel(target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        answer = outputs_of(stub.ModelInfer(request, timeout=60))
        small = infer_request("L1Loss", {"pred": torch.ones(3), "target": torch.zeros(3)})
        assert outputs_of(stub.ModelInfer(small, timeout=30))["loss"].item() == 1.0
    assert answer["loss"].item() == pytest.approx(math.log(classes), rel=1e-4)  # uniform logits
    assert ran_on_loop == [False, True]


@pytest.mark.parametrize("door", ["Evaluate", "Describe", "ModelInfer"])
def test_a_config_over_the_json_bound_is_refused_before_it_is_parsed(target, door):
    """A config of 4 MiB (a 500 000-entry class_weight list; parsed, ~50 times its bytes): RESOURCE_EXHAUSTED
    naming the config and the bound, through every door, and the server serves on."""
    config = {"type": "CrossEntropyLoss", "class_weight": [0.5] * 500_000}
    with plain_channel(target) as channel:
        if door == "ModelInfer":
            request = focal_request()
            request.model_name = "CrossEntropyLoss"
            request.parameters["config"].string_param = json.dumps(config)
            call, field = (
                lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30),
                "parameters[config]",
            )
        elif door == "Describe":
            described = pb.DescribeRequest(config=codec.encode_config(config))
            call, field = lambda: pb_grpc.LossServiceStub(channel).Describe(described, timeout=30), "config"
        else:
            evaluated = pb.EvaluateRequest()
            term = evaluated.terms.add(config=codec.encode_config(config))
            codec.encode_tensor(torch.ones(2, 3), term.pred)
            codec.encode_value(torch.tensor([0, 1]), term.target)
            call, field = lambda: pb_grpc.LossServiceStub(channel).Evaluate(evaluated, timeout=30), "terms[0].config"
        error = refused(call)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert field_of(error) == field and f"at most {MAX_JSON_BYTES}" in error.details()
    good_call_is_answered(target)


@pytest.mark.parametrize("door", ["Evaluate", "EvaluateStream"])
def test_a_map_key_spelling_another_tensor_s_path_is_invalid_argument(server, target, door):
    """``inputs["k].tensors.items[0"]`` names its tensor ``terms[0].inputs[k].tensors.items[0]``: the path of
    ``inputs["k"]``'s first item. Streamed, the big one's bytes went to the small one's declaration (a FLOAT64
    [1] given 4 MiB of UINT8, widened outside the memory budget). Refused naming the path, nothing held."""
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config({"type": "L1Loss"}))
    codec.encode_tensor(torch.zeros(4), term.pred)
    codec.encode_value(torch.zeros(4), term.target)
    term.inputs["k"].tensors.items.add(dtype=pb.FLOAT64, shape=[1], data=b"\0" * 8)
    big = term.inputs["k].tensors.items[0"].tensor
    path = "terms[0].inputs[k].tensors.items[0]"
    big.dtype, big.shape[:] = pb.UINT8, [4 << 20]
    with plain_channel(target) as channel:
        if door == "Evaluate":
            big.data = bytes(4 << 20)
            error = refused(lambda: pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=30))
        else:
            data = bytes(4 << 20)
            messages = [pb.EvaluateChunk(request=request), chunks.chunk_wire_bytes(path, 0, data)]
            error = refused(lambda: list(evaluate_stream(channel)(iter(messages), timeout=30)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == path and "two tensors of the request have the field path" in error.details()
    assert nothing_held(server)
    good_call_is_answered(target)
