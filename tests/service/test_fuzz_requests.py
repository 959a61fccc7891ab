"""Bad input, generated: property-based requests and raw bytes against a real server, and its limits.

Every fuzzed answer is OK (and then equals the engine's own answer on the inputs as sent) or a clear
status that is neither INTERNAL nor UNKNOWN; after each run the server still answers a good request
correctly and its metrics counted no INTERNAL/UNKNOWN call. The generators are in tests/support/fuzzing.py.

CI runs a bounded, derandomized number of examples; ``LOSSWIRE_FUZZ_EXAMPLES=5000`` raises it for a
by-hand run (``bench/fuzz.py`` runs thousands and prints a table).
"""

from __future__ import annotations

import math
import os

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fuzzing import (
    EVALUATE,
    REDUCTIONS,
    SEEDS,
    SharedSegment,
    assert_serves_correctly,
    call,
    call_infer,
    call_shared,
    call_stream,
    check_error,
    engine_parts,
    evaluate_requests,
    field_of,
    infer_requests,
    raw_requests,
    stream_faults,
    tag,
    varint,
)

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.losses import LOSSES
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import chunks, codec
from losswire.wire import shared_memory as wire_memory
from losswire.wire.protocol import EVALUATE_STREAM_METHOD

EXAMPLES = int(os.environ.get("LOSSWIRE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    derandomize=not EXAMPLES,  # CI: the same examples on every run
    database=None,
    deadline=None,
    max_examples=EXAMPLES or 150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
LIMITS = dict(max_elements=100_000, max_request_elements=200_000, max_terms=4, max_dims=6, max_sessions=4)
EXHAUSTED, INVALID = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT
PUSHBACK = ("grpc-retry-pushback-ms", "-1")


@pytest.fixture(scope="module")
def fuzzed():
    """A server of its own (its metrics count only this file's calls) with small limits the fuzz reaches."""
    instance = LosswireServer(
        ServerConfig(
            host="127.0.0.1",
            port=0,
            device="cpu",
            max_workers=2,
            max_message_bytes=4 << 20,
            overlap_transfer=True,  # fuzzed streams that ask for early gradients take the overlapped path
            lane_join_seconds=0.3,  # a fuzzed call's missing lane, or a stranger lane, is given up soon
            health_port=0,  # the plaintext health port, whose calls no intake reads
            **LIMITS,
        )
    )
    instance.start()
    yield instance
    instance.stop(grace=1)


@pytest.fixture(scope="module")
def channel(fuzzed):
    with grpc.insecure_channel(f"127.0.0.1:{fuzzed.port}") as chan:
        yield chan


@pytest.fixture(scope="module")
def evaluate(channel):
    """Evaluate with bytes in and bytes out: any bytes can be sent, parsable or not."""
    return channel.unary_unary(EVALUATE)


def count(server: LosswireServer, code: str, method: str = "Evaluate") -> float:
    return server.metrics.registry.get_sample_value("losswire_requests_total", {"method": method, "code": code}) or 0


def assert_unharmed(server: LosswireServer, evaluate) -> None:
    assert_serves_correctly(evaluate)
    assert count(server, "INTERNAL") == 0 and count(server, "UNKNOWN") == 0


# -- generated requests -----------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzzed_requests_get_clear_answers(fuzzed, evaluate):
    seen: dict[str, int] = {}

    @FUZZ
    @given(request=evaluate_requests())
    def one(request: pb.EvaluateRequest) -> None:
        code = call(evaluate, request)
        seen[code.name] = seen.get(code.name, 0) + 1

    one()
    print(f"fuzzed requests by answer: {seen}")  # shown with pytest -s
    assert_unharmed(fuzzed, evaluate)
    # the property was checked on OK answers and on refusals of more than one kind (which kinds a
    # derandomized run happens to draw shifts with the rest of the session; each kind has its own test)
    assert "OK" in seen and len(set(seen) - {"OK"}) >= 2, seen


def test_raw_bytes_get_clear_answers(fuzzed, evaluate):
    seen: dict[str, int] = {}

    @FUZZ
    @given(data=raw_requests())
    def one(data: bytes) -> None:
        code = call(evaluate, data)
        seen[code.name] = seen.get(code.name, 0) + 1

    one()
    print(f"raw requests by answer: {seen}")
    assert_unharmed(fuzzed, evaluate)
    assert seen.get("INVALID_ARGUMENT", 0) > 0, seen


@pytest.mark.slow
@pytest.mark.parametrize("door", ["EvaluateStream", "shared memory", "ModelInfer"])
def test_fuzzed_requests_through_every_other_door_get_clear_answers(fuzzed, channel, evaluate, door):
    """The same fuzzed requests streamed in chunks (with faults in the stream), with their tensors in shared
    memory (a reference now and then off by some bytes), and fuzzed ModelInfer calls: every answer is OK
    (and equals the engine where it can be recomputed) or a clear status naming its field."""
    if door == "shared memory" and not wire_memory.supported():
        pytest.skip("needs POSIX shared memory")
    seen: dict[str, int] = {}
    stub = pb_grpc.LossServiceStub(channel)
    segment = SharedSegment(stub) if door == "shared memory" else None
    stream = channel.stream_stream(
        EVALUATE_STREAM_METHOD, request_serializer=chunks.serialize_chunk, response_deserializer=chunks.parse_chunk
    )
    infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer

    @FUZZ
    @given(request=evaluate_requests(), fault=stream_faults(), misplace=st.sampled_from([0, 0, 0, 1, 4, 1 << 30]))
    def one_evaluate(request: pb.EvaluateRequest, fault: str, misplace: int) -> None:
        if door == "EvaluateStream":
            code = call_stream(stream, request, fault)
        else:
            code = call_shared(stub.Evaluate, segment, request, misplace)
        seen[code.name] = seen.get(code.name, 0) + 1

    @FUZZ
    @given(request=infer_requests())
    def one_infer(request) -> None:
        code = call_infer(infer, request)
        seen[code.name] = seen.get(code.name, 0) + 1

    try:
        one_infer() if door == "ModelInfer" else one_evaluate()
    finally:
        if segment is not None:
            segment.close()
    print(f"{door}: fuzzed requests by answer: {seen}")
    assert_unharmed(fuzzed, evaluate)
    assert "OK" in seen and len(set(seen) - {"OK"}) >= 1, seen


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\x0a\xff\xff\xff\xff\x0f", tag(1, 7), tag(1, 0) + b"\xff" * 11, tag(1, 2) + varint(2**63)],
    ids=["junk", "length past the end", "wire type 7", "over-long varint", "2**63 length"],
)
def test_unparsable_bytes_are_invalid_argument(fuzzed, evaluate, data):
    before = count(fuzzed, "INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as info:
        evaluate(data, timeout=10)
    assert info.value.code() == INVALID, info.value.details()
    assert f"not a valid losswire.v1.EvaluateRequest: its {len(data)} bytes" in info.value.details()
    assert count(fuzzed, "INVALID_ARGUMENT") == before + 1  # counted, as every refused call is
    assert_unharmed(fuzzed, evaluate)


def _unary_methods(server: LosswireServer) -> list[tuple[str, str]]:
    """(method path, request type) of every unary method the server registers (reflection: streaming)."""
    from grpc_health.v1 import health_pb2

    from losswire.inference import grpc_predict_v2_pb2 as oip

    methods = []
    for descriptor in (pb.DESCRIPTOR, oip.DESCRIPTOR, health_pb2.DESCRIPTOR):
        for service in descriptor.services_by_name.values():
            for method in service.methods:
                if not method.client_streaming and not method.server_streaming:
                    methods.append((f"/{service.full_name}/{method.name}", method.input_type.full_name))
    return methods


def test_every_unary_method_refuses_unparsable_bytes(fuzzed, channel):
    for path, request_type in _unary_methods(fuzzed):
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(path)(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
        assert info.value.code() == INVALID, (path, info.value.details())
        assert f"not a valid {request_type}" in info.value.details()


UNPARSABLE = b"\x0a\xff\xff\xff\xff\x0f"  # a length past the end


def test_streaming_methods_refuse_unparsable_bytes(fuzzed, channel):
    """A request stream's message that does not parse (server reflection's) and a Watch request are
    INVALID_ARGUMENT naming the message type, as a unary request is (they were gRPC's UNKNOWN, with a
    traceback in the log per call)."""
    calls = [
        channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
        channel.unary_stream("/grpc.health.v1.Health/Watch"),
    ]
    expected = ["grpc.reflection.v1alpha.ServerReflectionRequest", "grpc.health.v1.HealthCheckRequest"]
    for method, request_type in zip(calls, expected, strict=True):
        request = iter([UNPARSABLE]) if request_type.startswith("grpc.reflection") else UNPARSABLE
        with pytest.raises(grpc.RpcError) as info:
            list(method(request, timeout=10))
        assert info.value.code() == INVALID, (request_type, info.value.details())
        assert f"not a valid {request_type}" in info.value.details()


def test_a_reflection_request_is_small(fuzzed, channel):
    """Reflection answers each request with a copy of it, and answers left unread stay in memory that no
    budget counts (a stream sending 10 MB names held ~200 MB): a request over 64 KiB ends the stream
    with RESOURCE_EXHAUSTED; a real one (a symbol's name) is answered."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from losswire.server.app import REFLECTION_REQUEST_BYTES

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    real = reflection_pb2.ServerReflectionRequest(file_containing_symbol="losswire.v1.LossService")
    answers = list(stub.ServerReflectionInfo(iter([real]), timeout=10))
    assert answers[0].HasField("file_descriptor_response")
    huge = reflection_pb2.ServerReflectionRequest(file_containing_symbol="x" * (REFLECTION_REQUEST_BYTES + 1))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ServerReflectionInfo(iter([real, huge]), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert f"at most {REFLECTION_REQUEST_BYTES} bytes" in info.value.details()


def test_the_health_port_refuses_unparsable_bytes(fuzzed):
    """The plaintext health port has no intake: its own interceptor answers INVALID_ARGUMENT (it answered
    UNKNOWN, and logged a traceback per call, to callers who need no token there)."""
    with grpc.insecure_channel(f"127.0.0.1:{fuzzed.health_port}") as health:
        for call in (
            health.unary_unary("/grpc.health.v1.Health/Check"),
            health.unary_stream("/grpc.health.v1.Health/Watch"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                answer = call(UNPARSABLE, timeout=10)
                list(answer) if not isinstance(answer, bytes) else None
            assert info.value.code() == INVALID, info.value.details()
            assert "not a valid grpc.health.v1.HealthCheckRequest" in info.value.details()


# -- every reduction x avg_factor x reduction_override --------------------------------------------------


def _one_seed_per_loss() -> list[pb.LossTerm]:
    first: dict[str, pb.LossTerm] = {}
    for data in SEEDS:
        term = pb.LossTerm.FromString(data)
        first.setdefault(codec.decode_config(term.config)["type"], term)
    return [first[name] for name in sorted(first)]


def _with_reductions(term: pb.LossTerm, reduction, avg_factor, override) -> pb.LossTerm:
    term = pb.LossTerm.FromString(term.SerializeToString())
    config = codec.decode_config(term.config)
    config.pop("reduction", None)
    if reduction is not None:
        config["reduction"] = reduction
    term.ClearField("config")
    codec.encode_config(config, term.config)
    for field, value in (("avg_factor", avg_factor), ("reduction_override", override)):
        term.ClearField(field)
        if value is not None:
            setattr(term, field, value)
    return term


def _refused(evaluate, request: pb.EvaluateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        evaluate(request.SerializeToString(), timeout=30)
    return info.value


def _contract_refuses(term: pb.LossTerm) -> str | None:
    """The field the contract refuses this term for, where it is stricter than the loss module.

    The module ignores its override (EQLV2Loss); mmdet's modules take "" as "no override", and so does
    the contract. The contract refuses an input the loss's description does not list (unless its forward
    takes ``**kwargs``, as GHMC's does: it accepts and ignores an avg_factor) and an override outside
    none/mean/sum. Checked in the server's order:
    the config, then the inputs weight, avg_factor, reduction_override.
    """
    description = LOSSES.describe(codec.decode_config(term.config)["type"])
    names = [i.name for i in description.inputs]
    if "reduction" in codec.decode_config(term.config) and "reduction" not in [p.name for p in description.params]:
        return None  # the module cannot be built either: the engine raises too
    if term.HasField("avg_factor") and "avg_factor" not in names and not description.extra_inputs:
        return "terms[0].avg_factor"
    override = term.reduction_override or None  # "" is no override
    if override is not None and ("reduction_override" not in names or override not in REDUCTIONS[1:4]):
        return "terms[0].reduction_override"
    return None


@pytest.mark.slow
def test_every_reduction_and_avg_factor_agrees_with_the_engine(fuzzed, evaluate):
    """Every config.reduction x avg_factor x reduction_override, on one recorded case of every loss.

    Where the engine (the loss module called in process, as mmdet calls it) answers, the server
    answers the same loss and gradient (NaN where the engine gives NaN); where the engine raises, the
    server refuses with INVALID_ARGUMENT; where the contract is stricter than the module, the server
    refuses naming that field.
    """
    overrides = [*REDUCTIONS[:4], "avg", ""]
    avg_factors = [None, 0.0, -2.5, 4.0, math.nan, math.inf]  # each class once; the fuzz draws them all
    combos = [(r, a, o) for r in REDUCTIONS[:4] for a in avg_factors for o in overrides]
    for seed in _one_seed_per_loss():
        for reduction, avg_factor, override in combos:
            term = _with_reductions(seed, reduction, avg_factor, override)
            request, where = pb.EvaluateRequest(terms=[term]), (term.config, avg_factor, override)
            field = _contract_refuses(term)
            if field is not None:
                error = _refused(evaluate, request)
                assert check_error(error) == INVALID and field_of(error) == field, (where, error.details())
                continue
            try:
                engine_parts(term)
            except Exception:  # the engine raises: the server refuses, clearly
                assert check_error(_refused(evaluate, request)) == INVALID, where
                continue
            assert call(evaluate, request) == grpc.StatusCode.OK, where  # call() compares with the engine
    assert_unharmed(fuzzed, evaluate)


# -- limits: checked on the declared shapes, before anything is decoded ----------------------------------


def _term(shape: list[int], data: bytes = b"", name: str = "") -> pb.LossTerm:
    term = pb.LossTerm(name=name, pred=pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=data))
    codec.encode_config({"type": "L1Loss"}, term.config)
    term.target.tensor.CopyFrom(term.pred)
    return term


def _refusal(evaluate, request: pb.EvaluateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        evaluate(request.SerializeToString(), timeout=10)
    check_error(info.value)
    return info.value


def test_request_element_limit_is_checked_before_decoding(fuzzed, evaluate):
    # three tensors each under the per-tensor limit, over the request's; no data at all: a decode would
    # answer INVALID_ARGUMENT for the byte lengths, so RESOURCE_EXHAUSTED proves nothing was decoded
    request = pb.EvaluateRequest(terms=[_term([90_000], name="a"), _term([30_000], name="b")])
    error = _refusal(evaluate, request)
    assert error.code() == EXHAUSTED, error.details()
    assert "240000 elements in total" in error.details() and "at most 200000 per request" in error.details()
    assert field_of(error) == "terms[0].pred.shape"
    assert PUSHBACK in error.trailing_metadata()


def test_tensor_element_limit_names_the_tensor(fuzzed, evaluate):
    error = _refusal(evaluate, pb.EvaluateRequest(terms=[_term([10**6, 10**6])]))
    assert error.code() == EXHAUSTED
    assert "1000000000000 elements" in error.details() and "at most 100000 per tensor" in error.details()
    assert field_of(error) == "terms[0].pred.shape"
    assert PUSHBACK in error.trailing_metadata()


def test_term_limit(fuzzed, evaluate):
    terms = [_term([2], torch.ones(2).numpy().tobytes(), name=f"t{i}") for i in range(5)]
    error = _refusal(evaluate, pb.EvaluateRequest(terms=terms))
    assert error.code() == EXHAUSTED
    assert "5 terms" in error.details() and "at most 4 per request" in error.details()
    assert field_of(error) == "terms" and PUSHBACK in error.trailing_metadata()
    ok = pb.EvaluateRequest(terms=terms[:4])
    assert call(evaluate, ok) == grpc.StatusCode.OK


def test_the_client_sends_a_request_over_a_limit_once(fuzzed):
    """The client retries RESOURCE_EXHAUSTED (an overloaded server), but the pushback of -1 on a size
    refusal stops it: the server sees the request once, and the caller gets the refusal at once."""
    before = count(fuzzed, "RESOURCE_EXHAUSTED")
    client = LossClient(f"127.0.0.1:{fuzzed.port}", timeout=30)
    with pytest.raises(RemoteLossError) as info:
        RemoteLoss({"type": "L1Loss"}, client=client)(torch.zeros(LIMITS["max_elements"] + 1), torch.zeros(1))
    client.close()
    assert info.value.code == EXHAUSTED and "at most 100000 per tensor" in str(info.value)
    assert count(fuzzed, "RESOURCE_EXHAUSTED") == before + 1


def test_dimension_limit_is_invalid_argument(fuzzed, evaluate):
    request = pb.EvaluateRequest(terms=[_term([1] * 7, b"\0" * 4)])
    request.terms[0].target.tensor.shape[:] = [1]
    error = _refusal(evaluate, request)
    assert error.code() == INVALID
    assert "terms[0].pred.shape has 7 dimensions, at most 6 are allowed" in error.details()
    assert field_of(error) == "terms[0].pred.shape"
    assert PUSHBACK not in error.trailing_metadata()  # a malformed request, not a limit


@pytest.mark.parametrize(
    "shape", [[0, 2**62, 2**62], [2**40, 0, 2**40]], ids=["strides past int64", "empty, strides past int64"]
)
def test_shape_whose_strides_overflow_is_invalid_argument(fuzzed, evaluate, shape):
    error = _refusal(evaluate, pb.EvaluateRequest(terms=[_term(shape)]))
    assert error.code() == INVALID
    assert "the product of its non-zero sizes must be at most 2**63 - 1" in error.details()
    assert field_of(error) == "terms[0].pred.shape"


def test_nonfinite_config_numbers_are_read_and_refused_by_the_parameters_range(fuzzed, evaluate):
    """A binary Struct carries NaN and Inf (JSON cannot): read as sent, not refused as unreadable, then
    refused by the parameter's declared range (a float must be finite), naming it."""
    pred, target = torch.randn(3, 4), torch.randn(3, 4)
    for weight in (math.nan, math.inf):
        request = pb.EvaluateRequest(terms=[pb.LossTerm()])
        term = request.terms[0]
        codec.encode_config({"type": "L1Loss", "loss_weight": weight}, term.config)
        codec.encode_tensor(pred, term.pred)
        codec.encode_value(target, term.target)
        error = _refusal(evaluate, request)
        assert error.code() == INVALID and field_of(error) == "terms[0].config.loss_weight", error.details()
        assert "finite" in error.details(), error.details()


def test_config_key_and_input_named_empty_are_named_fields(fuzzed, evaluate):
    """Found by the fuzz: a key "" was refused without a field to point at."""
    pred = torch.ones(2, 3)
    request = pb.EvaluateRequest(terms=[pb.LossTerm()])
    codec.encode_config({"type": "L1Loss", "": 1}, request.terms[0].config)
    codec.encode_tensor(pred, request.terms[0].pred)
    codec.encode_value(pred, request.terms[0].target)
    error = _refusal(evaluate, request)
    assert error.code() == INVALID and field_of(error) == 'terms[0].config[""]', error.details()
    request.terms[0].ClearField("config")
    codec.encode_config({"type": "L1Loss"}, request.terms[0].config)
    codec.encode_value(pred, request.terms[0].inputs[""])
    error = _refusal(evaluate, request)
    assert error.code() == INVALID and field_of(error) == 'terms[0].inputs[""]', error.details()


# -- sessions ----------------------------------------------------------------------------------------


def _drop_sessions(server: LosswireServer) -> None:
    for session in server.sessions.sessions():
        server.sessions.reset(session.name)


def test_session_limit_is_refused_with_the_pushback(fuzzed, evaluate):
    """The first new session past --max-sessions is RESOURCE_EXHAUSTED, marked as not to be retried."""
    _drop_sessions(fuzzed)  # the fuzz may have left some
    pred, labels = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    answers, refused = [], None
    for index in range(LIMITS["max_sessions"] + 1):
        request = pb.EvaluateRequest(terms=[pb.LossTerm(session=f"limit-{index}")])
        term = request.terms[0]
        codec.encode_config({"type": "SeesawLoss", "num_classes": 2}, term.config)
        codec.encode_tensor(pred, term.pred)
        codec.encode_value(labels, term.target)
        try:
            evaluate(request.SerializeToString(), timeout=10)
            answers.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            answers.append(check_error(error))
            refused = error
    _drop_sessions(fuzzed)
    assert answers == [grpc.StatusCode.OK] * LIMITS["max_sessions"] + [EXHAUSTED]
    assert refused is not None and PUSHBACK in refused.trailing_metadata()
