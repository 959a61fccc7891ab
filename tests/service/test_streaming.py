"""EvaluateStream: big tensors in chunks, against unary Evaluate and the engine, on a real server.

The client switches to the stream above ``LossClient.stream_threshold``; these tests lower it (the
default, 8 MiB, is exercised once) so that CI moves a few MiB, not hundreds, and turn shared memory
off (on loopback it would carry these calls). Malformed streams are sent by hand over a plain
channel. Back-pressure is checked by ordering (a stream held open by an event), never by timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from support.calls import dice_recompute_gradients, evaluate_stream, plain_channel

from losswire.client import LossClient, RemoteLoss, RemoteLossError, evaluate_terms
from losswire.client.transports import STREAM_THRESHOLD_BYTES
from losswire.server.app import LosswireServer
from losswire.server.config import ServerConfig
from losswire.server.losses import LOSSES
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec

SMALL_THRESHOLD = 256 << 10


@pytest.fixture(scope="module")
def streaming(target) -> LossClient:
    client = LossClient(target, timeout=60, stream_threshold=SMALL_THRESHOLD, shared_memory="off")
    yield client
    client.close()


@pytest.fixture(scope="module")
def unary(target) -> LossClient:
    client = LossClient(target, timeout=60, stream_threshold=None, shared_memory="off")
    yield client
    client.close()


def _engine(cfg: dict, pred: torch.Tensor, target: torch.Tensor, grads: tuple[str, ...] = ("pred",)):
    """The loss and gradients as the engine computes them in process."""
    inputs = {"pred": pred.detach().clone().requires_grad_("pred" in grads)}
    inputs["target"] = target.detach().clone().requires_grad_("target" in grads)
    loss = LOSSES.build(LOSSES.normalise(dict(cfg)))(inputs["pred"], inputs["target"])
    loss.sum().backward()
    return loss.detach(), {k: inputs[k].grad for k in grads}


def _remote(cfg: dict, client: LossClient, pred: torch.Tensor, target: torch.Tensor, grads=("pred",), **options):
    inputs = {"pred": pred.detach().clone().requires_grad_("pred" in grads)}
    inputs["target"] = target.detach().clone().requires_grad_("target" in grads)
    loss = RemoteLoss(cfg, client=client, **options)(inputs["pred"], inputs["target"])
    loss.sum().backward()
    return loss.detach(), {k: inputs[k].grad for k in grads}


def _focal_inputs(n: int, classes: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=generator), torch.randint(0, classes + 1, (n,), generator=generator)


def _boxes(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=generator) * 100
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=generator) * 50], dim=1)


def _streamed_request(client: LossClient, request: pb.EvaluateRequest) -> dict[str, torch.Tensor]:
    """The tensors of the answer that came in chunks (non-empty: the call went by the stream)."""
    return client.evaluate_tensors(request)[1]


# -- results: stream == unary == engine ------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_focal_loss_stream_equals_unary_and_engine(streaming, unary, reduction):
    pred, labels = _focal_inputs(8192)  # 2.6 MiB of pred
    cfg = dict(type="FocalLoss", gamma=2.0, alpha=0.25, reduction=reduction)
    expected_loss, expected_grads = _engine(cfg, pred, labels)
    for client in (streaming, unary):
        loss, grads = _remote(cfg, client, pred, labels)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads["pred"], expected_grads["pred"], rtol=1e-5, atol=1e-9)
    stream_loss, stream_grads = _remote(cfg, streaming, pred, labels)
    unary_loss, unary_grads = _remote(cfg, unary, pred, labels)
    assert torch.equal(stream_loss, unary_loss) and torch.equal(stream_grads["pred"], unary_grads["pred"])


def test_default_threshold_streams_a_request_above_it(target, unary):
    # the default threshold (shared memory off: on loopback it would carry this call instead)
    client = LossClient(target, timeout=60, shared_memory="off")
    pred, labels = _focal_inputs(STREAM_THRESHOLD_BYTES // (80 * 4) + 1024, seed=1)  # just above 8 MiB
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config(dict(type="FocalLoss")), gradients=["pred"])
    codec.encode_tensor(pred, term.pred)
    codec.encode_value(labels, term.target)
    sent = request.SerializeToString()
    response, streamed = client.evaluate_tensors(request)
    assert set(streamed) == {"results[0].gradients[pred]"}  # it went by the stream, and came back so
    assert request.SerializeToString() == sent  # the caller's request is left as it was
    gradient = codec.decode_tensor(
        response.results[0].gradients["pred"], "results[0].gradients[pred]", streamed=streamed
    )
    reference = unary.evaluate(request)
    assert torch.equal(gradient, codec.decode_tensor(reference.results[0].gradients["pred"], "reference"))
    # evaluate() on the streaming client gives the complete message, equal to the unary one
    complete = client.evaluate(request)
    assert complete.results[0].gradients["pred"].data == reference.results[0].gradients["pred"].data
    assert complete.results[0].loss == reference.results[0].loss
    client.close()


def test_giou_loss_gradients_of_pred_and_target(streaming, unary):
    pred, boxes = _boxes(32768, 1), _boxes(32768, 2)  # 512 KiB each
    cfg = dict(type="GIoULoss", loss_weight=2.0, reduction="none")
    expected_loss, expected_grads = _engine(cfg, pred, boxes, ("pred", "target"))
    loss, grads = _remote(cfg, streaming, pred, boxes, ("pred", "target"))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for key in ("pred", "target"):
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-5, atol=1e-6)
    unary_loss, unary_grads = _remote(cfg, unary, pred, boxes, ("pred", "target"))
    assert torch.equal(loss, unary_loss)
    assert all(torch.equal(grads[k], unary_grads[k]) for k in ("pred", "target"))


def test_multi_term_request_streams_every_big_tensor(streaming, unary):
    pred, labels = _focal_inputs(4096, seed=3)
    boxes_pred, boxes_target = _boxes(20000, 4), _boxes(20000, 5)
    answers = []
    for client in (streaming, unary):
        focal = RemoteLoss(dict(type="FocalLoss"), client=client)
        giou = RemoteLoss(dict(type="GIoULoss"), client=client)
        p, b = pred.clone().requires_grad_(), boxes_pred.clone().requires_grad_()
        losses = evaluate_terms(
            {"loss_cls": (focal, (p, labels), {"avg_factor": 17.0}), "loss_bbox": (giou, (b, boxes_target), {})}
        )
        sum(losses.values()).backward()
        answers.append((losses["loss_cls"].detach(), losses["loss_bbox"].detach(), p.grad, b.grad))
    for streamed, plain in zip(*answers, strict=True):
        assert torch.equal(streamed, plain)


def test_non_separable_loss_resends_after_a_stream(streaming, unary):
    """DiceLoss under reduction 'none' is recomputed with the upstream gradient: the resend needs the
    request's tensors, which the stream kept out of the message."""
    grads = dice_recompute_gradients((streaming, unary), seed=6)
    assert torch.equal(grads[0], grads[1])


# -- transfer_dtype --------------------------------------------------------------------------------


@pytest.mark.parametrize("transfer", ["float16", "bfloat16"])
def test_transfer_dtype_halves_the_bytes_and_stays_close(streaming, transfer):
    pred, labels = _focal_inputs(8192, seed=7)
    cfg = dict(type="FocalLoss", reduction="sum")  # sum: gradients far from float16's underflow
    expected_loss, expected_grads = _engine(cfg, pred, labels)
    loss, grads = _remote(cfg, streaming, pred, labels, transfer_dtype=transfer)
    assert loss.dtype == grads["pred"].dtype == torch.float32
    tolerance = 1e-2 if transfer == "bfloat16" else 2e-3
    torch.testing.assert_close(loss, expected_loss, rtol=tolerance, atol=0)  # the scalar comes back exact
    torch.testing.assert_close(grads["pred"], expected_grads["pred"], rtol=tolerance, atol=tolerance * 1e-2)
    # on the wire: the request's pred and the answer's gradient in the narrow dtype, the scalar not
    wire = pb.DType.Value(transfer.upper())
    request = pb.EvaluateRequest(transfer_dtype=wire)
    term = request.terms.add(config=codec.encode_config(cfg), gradients=["pred"])
    codec.encode_tensor(pred, term.pred, transfer_dtype=wire)
    codec.encode_value(labels, term.target, transfer_dtype=wire)
    assert term.pred.data_dtype == wire and len(term.pred.data) == pred.numel() * 2
    assert term.target.tensor.data_dtype == pb.DTYPE_UNSPECIFIED  # labels travel as they are
    response, streamed = streaming.evaluate_tensors(request)
    assert response.results[0].gradients["pred"].data_dtype == wire
    assert streamed["results[0].gradients[pred]"].dtype == codec.DTYPE_TO_TORCH[wire]
    assert response.results[0].loss.data_dtype == pb.DTYPE_UNSPECIFIED


def test_transfer_dtype_is_checked():
    with pytest.raises(ValueError, match="transfer_dtype"):
        codec.transfer_dtype_of("int8")
    message = codec.encode_tensor(torch.arange(4096.0))
    message.data_dtype = pb.INT8
    with pytest.raises(codec.CodecError) as caught:
        codec.decode_tensor(message, "terms[0].pred")
    assert caught.value.field == "terms[0].pred.data_dtype"


# -- malformed streams -----------------------------------------------------------------------------


def _header(n: int = 1024) -> tuple[pb.EvaluateRequest, bytes]:
    """A FocalLoss request whose pred (n x 80 float32) is declared but not inline, and pred's bytes."""
    pred, labels = _focal_inputs(n, seed=8)
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config(dict(type="FocalLoss")))
    term.pred.dtype, term.pred.shape[:] = pb.FLOAT32, list(pred.shape)
    codec.encode_value(labels, term.target)
    return request, pred.numpy().tobytes()


def _send(target: str, messages: list[pb.EvaluateChunk | bytes]) -> list[pb.EvaluateChunk]:
    with plain_channel(target) as channel:
        method = evaluate_stream(channel)
        try:
            return list(method(iter(messages), timeout=30))
        except grpc.RpcError as error:
            raise RemoteLossError.from_rpc_error(error) from None


def _chunk(path: str, offset: int, data: bytes) -> pb.EvaluateChunk:
    return pb.EvaluateChunk(chunk=pb.TensorChunk(tensor=path, offset=offset, data=data))


def test_a_hand_made_stream_is_answered(target):
    request, data = _header()
    half = len(data) // 2
    answer = _send(
        target,
        [
            pb.EvaluateChunk(request=request),
            _chunk("terms[0].pred", 0, data[:half]),
            chunks.chunk_wire_bytes("terms[0].pred", half, data[half:]),  # the hand-built wire form
        ],
    )
    assert answer[0].WhichOneof("kind") == "response"
    assembler = chunks.StreamAssembler(answer[0].response)
    for message in answer[1:]:
        assembler.add(message.chunk)
    streamed = assembler.finish()
    assert "results[0].gradients[pred]" in streamed  # 320 KiB: streamed back


def test_empty_chunks_in_order_are_accepted_wherever_they_fall(target):
    """A chunk without bytes is held to the rule of every chunk, its offset the bytes received so far, and
    carries nothing: accepted before the first bytes, between two chunks, and at the end of a tensor that
    is complete already. The answer is the one without them."""
    request, data = _header()
    half, pred = len(data) // 2, "terms[0].pred"
    first = pb.EvaluateChunk(request=request)
    plain = _send(target, [first, _chunk(pred, 0, data[:half]), _chunk(pred, half, data[half:])])
    with_empty = _send(
        target,
        [
            first,
            _chunk(pred, 0, b""),
            _chunk(pred, 0, data[:half]),
            _chunk(pred, half, b""),
            chunks.chunk_wire_bytes(pred, half, b""),  # the hand-built wire form too
            _chunk(pred, half, data[half:]),
            _chunk(pred, len(data), b""),  # pred is complete: in order still
            chunks.chunk_wire_bytes(pred, len(data), b""),
        ],
    )
    assert [m.SerializeToString() for m in with_empty[1:]] == [m.SerializeToString() for m in plain[1:]]
    assert with_empty[0].response.results[0].loss == plain[0].response.results[0].loss


def _malformed_cases() -> dict[str, tuple[list, str]]:
    request, data = _header()
    first = pb.EvaluateChunk(request=request)
    return {
        "ends_early": ([first, _chunk("terms[0].pred", 0, data[:1000])], "terms[0].pred.data"),
        "no_chunks": ([first], "terms[0].pred.data"),
        "overlap": (
            [first, _chunk("terms[0].pred", 0, data[:1000]), _chunk("terms[0].pred", 500, data[500:])],
            "terms[0].pred.data",
        ),
        "gap": ([first, _chunk("terms[0].pred", 8, data[8:])], "terms[0].pred.data"),
        "past_the_end": ([first, _chunk("terms[0].pred", 0, data + b"1234")], "terms[0].pred.data"),
        "twice": (
            [first, _chunk("terms[0].pred", 0, data), _chunk("terms[0].pred", 0, data[:4])],
            "chunk.tensor",
        ),
        "empty_out_of_order": (
            [first, _chunk("terms[0].pred", 0, data[:1000]), _chunk("terms[0].pred", 500, b"")],
            "terms[0].pred.data",
        ),
        "empty_at_the_start_of_a_complete_tensor": (
            [first, _chunk("terms[0].pred", 0, data), _chunk("terms[0].pred", 0, b"")],
            "chunk.tensor",
        ),
        "empty_past_the_end": ([first, _chunk("terms[0].pred", len(data) + 4, b"")], "terms[0].pred.data"),
        "unknown_tensor": ([first, _chunk("terms[0].weight", 0, data[:4])], "chunk.tensor"),
        "inline_tensor_chunked": ([first, _chunk("terms[0].target", 0, b"\0" * 8)], "chunk.tensor"),
        "chunk_first": ([_chunk("terms[0].pred", 0, data)], "request"),
        "empty_stream": ([], "request"),
        "second_request": ([first, first], "chunk"),
        "unparsable_first": ([b"\x1a\x05\x0a\x10abc"], "request"),  # INVALID_ARGUMENT, not grpcio's INTERNAL
        "unparsable_chunk": ([first, b"\x1a\x03\x0a\x01\xff"], "chunk"),  # a tensor name of bad UTF-8
        "bad_inline_size": (
            [pb.EvaluateChunk(request=_with_short_target(request)), _chunk("terms[0].pred", 0, data)],
            "terms[0].target.data",
        ),
    }


def _with_short_target(request: pb.EvaluateRequest) -> pb.EvaluateRequest:
    changed = pb.EvaluateRequest()
    changed.CopyFrom(request)
    changed.terms[0].target.tensor.data = b"\0" * 9  # not a whole number of int64
    return changed


@pytest.mark.parametrize("case", sorted(_malformed_cases()))
def test_malformed_stream_is_invalid_argument_naming_the_field(target, case):
    messages, field = _malformed_cases()[case]
    with pytest.raises(RemoteLossError) as caught:
        _send(target, messages)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert caught.value.field == field, caught.value


# -- limits and back-pressure ----------------------------------------------------------------------


@pytest.fixture
def small_server() -> Iterator[LosswireServer]:
    """Two workers, one streamed call at a time, at most 200 000 elements per tensor."""
    instance = LosswireServer(
        ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=2, max_stream_calls=1, max_elements=200_000)
    )
    instance.start()
    yield instance
    instance.stop(grace=1)


def test_declared_size_over_the_limit_is_refused_before_any_chunk(small_server):
    request, _ = _header()
    request.terms[0].pred.shape[:] = [1_000_000, 80]  # 320 MB declared, never sent
    with pytest.raises(RemoteLossError) as caught:
        _send(f"127.0.0.1:{small_server.port}", [pb.EvaluateChunk(request=request)])
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.field == "terms[0].pred.shape"


def test_small_calls_are_answered_while_a_big_stream_is_in_flight(small_server):
    target = f"127.0.0.1:{small_server.port}"
    slots = small_server.dataplane.slots
    request, data = _header(2048)
    release = threading.Event()

    def held_open() -> Iterator[pb.EvaluateChunk | bytes]:
        yield pb.EvaluateChunk(request=request)
        yield chunks.chunk_wire_bytes("terms[0].pred", 0, data[:4096])
        release.wait(60)  # the big call stays in flight (admitted, receiving) until the test says
        yield chunks.chunk_wire_bytes("terms[0].pred", 4096, data[4096:])

    answers: list = []
    with plain_channel(target) as channel:
        method = evaluate_stream(channel)
        big = threading.Thread(target=lambda: answers.extend(method(held_open(), timeout=60)))
        big.start()
        try:
            waited = 0.0
            while slots.in_use < 1 and waited < 30:  # admitted: a condition, not a timing
                time.sleep(0.01)
                waited += 0.01
            assert slots.in_use == 1
            # a small unary call gets the other worker and its answer
            small = LossClient(target, timeout=30, stream_threshold=None)
            pred, labels = _focal_inputs(16, seed=9)
            loss = RemoteLoss(dict(type="FocalLoss"), client=small)(pred, labels)
            torch.testing.assert_close(loss, _engine(dict(type="FocalLoss"), pred, labels)[0])
            small.close()
            # a second big call is refused at once, retryable (no "do not retry" pushback), not queued
            with pytest.raises(grpc.RpcError) as caught:
                list(method(iter([pb.EvaluateChunk(request=request)]), timeout=30))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("grpc-retry-pushback-ms", "-1") not in tuple(caught.value.trailing_metadata() or ())
            assert slots.in_use == 1
        finally:
            release.set()
            big.join(60)
    assert answers and answers[0].WhichOneof("kind") == "response"  # the big call completed
    assert slots.in_use == 0
