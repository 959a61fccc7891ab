"""A request's terms, decoded into the engine's ``TermRequest``s on the compute device.

The tensors' bytes come from where they travelled: inline in the message, or, by field path, from
``arrived`` (assembled from a stream's chunks, viewed in a caller's shared memory, or handed over by
the Open Inference Protocol's converter). Every inconsistency is a ``CodecError`` or a
``RequestError`` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

from ..errors import RequestError
from ..evaluation import TermRequest

Arrived = Mapping[str, torch.Tensor]

# a session keeps the forward_id of each forward it can still replay (retries are recognised by it), outside
# its --max-session-bytes; a UUID (36 characters) is what it is for
MAX_FORWARD_ID_CHARS = 128


def check_transfer_dtype(request: pb.EvaluateRequest) -> int:
    """The request's ``transfer_dtype`` (0: none), refused unless it is FLOAT16 or BFLOAT16."""
    transfer = request.transfer_dtype
    if transfer not in (pb.DTYPE_UNSPECIFIED, *codec.TRANSFER_DTYPES.values()):
        got = pb.DType.Name(transfer) if transfer in pb.DType.values() else str(transfer)
        raise RequestError(f"transfer_dtype must be unset, FLOAT16 or BFLOAT16, got {got}", field="transfer_dtype")
    return transfer


def term_names(terms: Iterable[pb.LossTerm]) -> list[str]:
    """The terms' names: at least one term; in a multi-term request every term named, and uniquely."""
    names = [t.name for t in terms]
    if not names:
        raise RequestError("the request has no terms; send at least one LossTerm", field="terms")
    if len(names) > 1:
        seen: dict[str, int] = {}
        for index, name in enumerate(names):
            if not name:
                raise RequestError(
                    f"terms[{index}].name is empty; name every term of a multi-term request",
                    field=f"terms[{index}].name",
                )
            if name in seen:
                raise RequestError(
                    f"terms[{index}].name {name!r} repeats terms[{seen[name]}]", field=f"terms[{index}].name"
                )
            seen[name] = index
    return names


def check_forward_id(forward_id: str, field: str) -> None:
    """A RequestError for a ``forward_id`` longer than ``MAX_FORWARD_ID_CHARS``."""
    if len(forward_id) > MAX_FORWARD_ID_CHARS:
        raise RequestError(
            f"{field} must be at most {MAX_FORWARD_ID_CHARS} characters (a UUID per forward), got "
            f"{len(forward_id)} characters",
            field=field,
        )


def decode_term(
    message: pb.LossTerm,
    field: str,
    device: torch.device,
    max_elements: int | None,
    arrived: Arrived | None = None,
    allocate: codec.Allocate | None = None,
    stage: codec.Stage | None = None,
) -> TermRequest:
    """One ``LossTerm`` (at ``field``, e.g. ``terms[0]``) -> a ``TermRequest`` with tensors on ``device``
    (those that travelled narrowed widened into ``allocate``'s memory; sent there by ``stage``)."""
    config = codec.decode_config(message.config)
    if not config:
        raise RequestError(f'{field}.config is empty; send {{"type": "<loss name>", ...}}', field=f"{field}.config")
    if not message.HasField("pred"):
        raise RequestError(f"{field}.pred is missing; every term needs its prediction tensor", field=f"{field}.pred")
    check_forward_id(message.forward_id, f"{field}.forward_id")
    for name in ("sample_labels", "sample_groups"):  # else the term would be answered unsampled, silently
        if message.HasField(name) and "sampler" not in config:
            raise RequestError(
                f"{field}.{name} is read only with config.sampler, and this term's config has none: add the "
                f"sampler, or leave {name} out",
                field=f"{field}.{name}",
            )

    def tensor(value: pb.Tensor, path: str) -> torch.Tensor:
        return codec.decode_tensor(value, path, device, max_elements, arrived, allocate, stage)

    def value(value: pb.Value, path: str) -> Any:
        return codec.decode_value(value, path, device, max_elements, arrived, allocate, stage)

    def optional(name: str, decode: Callable[[Any, str], Any] | None = None) -> Any:
        """The decoded field, or None when the caller did not send it."""
        if not message.HasField(name):
            return None
        sent = getattr(message, name)
        return sent if decode is None else decode(sent, f"{field}.{name}")

    return TermRequest(
        name=message.name,
        config=config,
        pred=tensor(message.pred, f"{field}.pred"),
        target=optional("target", value),
        weight=optional("weight", tensor),
        avg_factor=optional("avg_factor"),
        reduction_override=optional("reduction_override"),
        inputs={k: value(v, f"{field}.inputs[{k}]") for k, v in message.inputs.items()},
        gradients=list(message.gradients) or ["pred"],
        grad_output=optional("grad_output", tensor),
        grad_outputs={k: tensor(v, f"{field}.grad_outputs[{k}]") for k, v in message.grad_outputs.items()},
        session=message.session,
        replay_step=optional("replay_step"),
        forward_id=message.forward_id,
        seed=optional("seed"),
        sample_labels=optional("sample_labels", tensor),
        sample_groups=optional("sample_groups", tensor),
    )
