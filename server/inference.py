"""The Open Inference Protocol (KServe v2 / Triton gRPC) on the losswire server: a thin adapter.

``inference.GRPCInferenceService`` (``protos/inference/grpc_predict_v2.proto``) answers on the
same port as ``losswire.v1.LossService``, so Triton's own client (``tritonclient.grpc``) and any
KServe v2 client can evaluate a loss and its gradient. This module only translates: a ModelInfer
request becomes the ``TermRequest`` that LossService would build, the same ``Evaluator`` runs it,
the same codec decodes and encodes the tensors, and every failure leaves through ``status.to_status``.

The mapping:

- **Model** = a registered loss name (``FocalLoss``); its only version is ``"1"`` (``""`` picks it).
  ModelReady answers ``ready: false`` for an unknown name or version (what tritonclient's
  ``is_model_ready`` expects); ModelMetadata and ModelInfer answer NOT_FOUND.
- **Config**: the request parameter ``config``, a JSON object string
  (``{"gamma": 2.0, "reduction": "mean"}``, or the full mmdet dict including a ``sampler``). The
  model name is its ``type``; a ``type`` in the JSON that names another loss is INVALID_ARGUMENT.
  Without it the loss runs with its defaults.
- **Input tensors** by name: the loss's forward inputs, with the first two also called ``pred``
  and ``target`` (CrossEntropyLoss's ``cls_score`` / ``label``), as in ``losswire.v1.LossTerm``.
  Data from ``raw_input_contents`` (raw little-endian, row-major: what tritonclient sends), in
  the order of ``inputs``, or from each input's typed ``contents``. Datatypes: BOOL, UINT8, INT8,
  INT16, INT32, INT64, FP16, BF16, FP32, FP64; each input keeps the datatype it arrives with
  (class indices as INT64, boxes as FP32...). A tuple-valued input (QualityFocalLoss's
  ``(label, score)`` target) is sent as members ``target[0]``, ``target[1]``. ``avg_factor`` may
  be a one-element tensor.
- **Parameters**: besides ``config``, any forward input that is not a tensor, by its name:
  ``reduction_override`` (string), ``avg_factor`` (double or int), ``ignore_index`` (int); a
  structured one (AssociativeEmbeddingLoss's ``match``) as a JSON string. Triton's own request
  parameters (``sequence_*``, ``priority``, ``timeout``, ``triton_*``) are accepted and ignored;
  any other name is INVALID_ARGUMENT.
- **Outputs** in ``raw_output_contents``: ``loss`` (shape ``[]`` when reduced, else the loss's
  element-wise shape) and ``grad_<input>`` = d(sum(loss))/d(input): ``grad_pred``, and
  ``grad_target`` (``grad_target[1]`` for a tuple member) for float targets when the request
  names it in ``outputs``. Without ``outputs`` the response holds ``loss`` and ``grad_pred``;
  with ``outputs`` exactly the outputs named, in that order (only ``loss``: no backward at all).
- **Several loss parts** (AssociativeEmbeddingLoss's tuple, SeesawLoss's dict): ``loss_<part>``
  and ``grad_<input>_<part>`` per part, the part being the tuple index or the dict key
  (``loss_0``, ``grad_pred_1``; ``loss_loss_cls_classes``), each gradient that part's own.
- **Errors**: the status codes of LossService (INVALID_ARGUMENT for a bad datatype, shape, byte
  count, config or missing input; NOT_FOUND for an unknown model; RESOURCE_EXHAUSTED over
  ``--max-elements``), with a ``google.rpc.BadRequest`` field path: ``inputs[i].datatype``,
  ``raw_input_contents[i]``, ``parameters[name]``, ``outputs[i].name``, ``model_name``, or the
  engine's own (``target``, ``config.gamma``).
- Not exposed here (use ``losswire.v1``): sessions of stateful losses (each call starts fresh),
  sampler seeds, upstream gradients for ``reduction='none'`` (a separable loss's gradient for an
  upstream ``G`` is ``G * grad``; see the README).

ModelMetadata lists every tensor input with datatype FP32 and shape ``[-1]`` (``avg_factor``:
``[1]``): the protocol has no way to say "any rank" or "any float or integer type", so these are
hints; ``ListLosses`` has the full description (optional inputs, output kind, differentiable inputs).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import torch
from torch import Tensor

from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

from . import __version__
from .evaluate import PRED, TARGET, Evaluator, TermOutcome, TermRequest
from .losses import LossDescription, UnknownLossError
from .service import LossService
from .status import RequestError, to_status

log = logging.getLogger("losswire.server")

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
SERVER_NAME, PLATFORM, MODEL_VERSION = "losswire", "losswire", "1"
CONFIG = "config"
LOSS, GRAD = "loss", "grad_"

# OIP datatype name -> the codec's dtype (and back); BYTES and the wide unsigned types have no torch twin here
OIP_TO_DTYPE: dict[str, int] = {
    "BOOL": pb.BOOL,
    "UINT8": pb.UINT8,
    "INT8": pb.INT8,
    "INT16": pb.INT16,
    "INT32": pb.INT32,
    "INT64": pb.INT64,
    "FP16": pb.FLOAT16,
    "BF16": pb.BFLOAT16,
    "FP32": pb.FLOAT32,
    "FP64": pb.FLOAT64,
}
DTYPE_TO_OIP: dict[int, str] = {v: k for k, v in OIP_TO_DTYPE.items()}
# typed ``contents``: the field holding each datatype and its numpy type (FP16/BF16 travel raw only)
TYPED_CONTENTS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "bool"),
    "UINT8": ("uint_contents", "uint8"),
    "INT8": ("int_contents", "int8"),
    "INT16": ("int_contents", "int16"),
    "INT32": ("int_contents", "int32"),
    "INT64": ("int64_contents", "int64"),
    "FP32": ("fp32_contents", "float32"),
    "FP64": ("fp64_contents", "float64"),
}
TRITON_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"})
TENSOR_KINDS = frozenset({"tensor", "tensors", "tensor_or_tuple", "number"})  # may arrive as input tensors
PARAMETER_KINDS = frozenset({"number", "int", "str", "any"})  # may arrive as request parameters
MEMBER = re.compile(r"(?P<name>.+)\[(?P<index>\d+)\]")  # "target[1]": one member of a tuple input


def _not_found(message: str, field: str) -> RequestError:
    return RequestError(message, field=field, code=grpc.StatusCode.NOT_FOUND)


# -- the model's names ------------------------------------------------------------------------------


def _canonical_names(description: LossDescription) -> dict[str, str]:
    """Every accepted input name -> its key: ``pred``/``target`` for the first two, else the forward name."""
    names = {spec.name: spec.name for spec in description.inputs}
    for alias, spec in zip((PRED, TARGET), description.inputs, strict=False):
        names[spec.name] = names[alias] = alias
    return names


def _metadata_inputs(description: LossDescription) -> list[oip.ModelMetadataResponse.TensorMetadata]:
    canonical = _canonical_names(description)
    return [
        oip.ModelMetadataResponse.TensorMetadata(
            name=canonical[spec.name], datatype="FP32", shape=[1] if spec.kind == "number" else [-1]
        )
        for spec in description.inputs
        if spec.kind in TENSOR_KINDS
    ]


def _gradient_keys(description: LossDescription) -> list[str]:
    """The inputs this loss returns gradients for, by their OIP key (``pred``, ``target``...)."""
    canonical = _canonical_names(description)
    return [canonical[name] for name in description.differentiable]


# -- request -> TermRequest ------------------------------------------------------------------------------


def _parameter_value(parameter: oip.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _decode_config(model: str, parameters: Mapping[str, oip.InferParameter]) -> dict[str, Any]:
    """The ``config`` parameter (a JSON object string) as an mmdet config dict of type ``model``."""
    if CONFIG not in parameters:
        return {"type": model}
    text = _parameter_value(parameters[CONFIG])
    field = f"parameters[{CONFIG}]"
    if not isinstance(text, str):
        raise RequestError(f"{field} must be a JSON object string, got {type(text).__name__} {text!r}", field=field)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(f"{field} is not valid JSON: {error}", field=field) from None
    if not isinstance(config, dict):
        raise RequestError(f"{field} must be a JSON object, got {type(config).__name__}", field=field)
    if config.get("type", model) != model:
        raise RequestError(
            f"{field} has type {config['type']!r} but the model is {model!r}; drop 'type' or call model "
            f"{config['type']!r}",
            field="config.type",
        )
    return {**config, "type": model}


def _decode_parameters(description: LossDescription, parameters: Mapping[str, oip.InferParameter]) -> dict[str, Any]:
    """Forward inputs sent as request parameters, by name (JSON strings decoded for structured inputs)."""
    kinds = {spec.name: spec.kind for spec in description.inputs if spec.kind in PARAMETER_KINDS}
    values: dict[str, Any] = {}
    for name, parameter in parameters.items():
        if name == CONFIG or name in TRITON_PARAMETERS or name.startswith("triton_"):
            continue
        field = f"parameters[{name}]"
        if name not in kinds:
            accepted = ", ".join([CONFIG, *kinds])
            raise RequestError(
                f"{description.name} takes no parameter {name!r}; its parameters are: {accepted}", field=field
            )
        value = _parameter_value(parameter)
        if kinds[name] == "any" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise RequestError(f"{field} is not valid JSON: {error}", field=field) from None
        values[name] = value
    return values


def _raw_contents(request: oip.ModelInferRequest) -> list[bytes | None]:
    """Each input's raw bytes, or None where the input carries typed ``contents`` instead."""
    raw = list(request.raw_input_contents)  # read once: every read of a bytes field copies it
    if not raw:
        return [None] * len(request.inputs)
    if len(raw) != len(request.inputs):
        raise RequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input, "
            f"in the order of inputs",
            field="raw_input_contents",
        )
    for index, tensor in enumerate(request.inputs):
        if tensor.HasField("contents"):
            raise RequestError(
                f"inputs[{index}] ({tensor.name}) has contents while the request uses raw_input_contents; "
                f"send every input one way",
                field=f"inputs[{index}].contents",
            )
    return raw


def _typed_bytes(tensor: oip.ModelInferRequest.InferInputTensor, index: int) -> bytes:
    """Typed ``contents`` -> the raw little-endian bytes the codec decodes."""
    if tensor.datatype not in TYPED_CONTENTS:
        raise RequestError(
            f"input {tensor.name!r} (inputs[{index}]) is {tensor.datatype}, which travels in raw_input_contents only",
            field=f"inputs[{index}].contents",
        )
    field, dtype = TYPED_CONTENTS[tensor.datatype]
    values = np.asarray(getattr(tensor.contents, field))
    array = values.astype(np.dtype(dtype).newbyteorder("<"))
    if array.dtype.kind in "iu" and not np.array_equal(array, values):  # int_contents 300 for INT8 would wrap
        raise RequestError(
            f"input {tensor.name!r} (inputs[{index}]): contents.{field} holds values that do not fit {tensor.datatype}",
            field=f"inputs[{index}].contents.{field}",
        )
    return array.tobytes()


def _decode_tensor(
    tensor: oip.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    index: int,
    device: torch.device,
    max_elements: int | None,
) -> Tensor:
    """One OIP input -> a torch tensor, decoded by the codec (shape and element-limit checks included)."""
    where = f"input {tensor.name!r} (inputs[{index}])"
    if tensor.datatype not in OIP_TO_DTYPE:
        raise RequestError(
            f"{where}: datatype {tensor.datatype!r} is not supported; use one of {', '.join(OIP_TO_DTYPE)}",
            field=f"inputs[{index}].datatype",
        )
    dtype = OIP_TO_DTYPE[tensor.datatype]
    shape = list(tensor.shape)
    source = f"raw_input_contents[{index}]" if raw is not None else f"inputs[{index}].contents"
    data = raw if raw is not None else _typed_bytes(tensor, index)
    itemsize = torch.empty((), dtype=codec.DTYPE_TO_TORCH[dtype]).element_size()
    if all(d >= 0 for d in shape) and len(data) != math.prod(shape) * itemsize:  # negative sizes: the codec's
        raise RequestError(
            f"{where}: {source} holds {len(data)} bytes; {tensor.datatype} {shape} needs "
            f"{math.prod(shape)} x {itemsize} = {math.prod(shape) * itemsize}",
            field=source,
        )
    message = pb.Tensor(dtype=dtype, shape=shape, data=data)
    return codec.decode_tensor(message, f"inputs[{index}]", device, max_elements)


def _decode_inputs(
    request: oip.ModelInferRequest, description: LossDescription, device: torch.device, max_elements: int | None
) -> dict[str, Any]:
    """The input tensors by key (``pred``, ``target``, ``weight``...); ``name[i]`` members become tuples."""
    canonical = _canonical_names(description)
    kinds = {canonical[spec.name]: spec.kind for spec in description.inputs}
    values: dict[str, Any] = {}
    members: dict[str, dict[int, Tensor]] = {}
    for index, (tensor, raw) in enumerate(zip(request.inputs, _raw_contents(request), strict=True)):
        member = MEMBER.fullmatch(tensor.name)
        name, position = (member["name"], int(member["index"])) if member else (tensor.name, None)
        key = canonical.get(name)
        if key is None or kinds[key] not in TENSOR_KINDS:
            accepted = [n for n, k in canonical.items() if kinds[k] in TENSOR_KINDS]
            raise RequestError(
                f"{description.name} has no input tensor {tensor.name!r} (inputs[{index}]); its inputs are: "
                f"{', '.join(accepted)}",
                field=f"inputs[{index}].name",
            )
        if key in values or (position is None and key in members) or position in members.get(key, {}):
            raise RequestError(f"input {key!r} is given twice (inputs[{index}])", field=f"inputs[{index}].name")
        decoded = _decode_tensor(tensor, raw, index, device, max_elements)
        if position is not None:
            members.setdefault(key, {})[position] = decoded
        elif kinds[key] == "number":
            values[key] = _one_number(decoded, key, index)
        else:
            values[key] = decoded
    for key, parts in members.items():
        if sorted(parts) != list(range(len(parts))):
            raise RequestError(
                f"input {key!r} has members {sorted(parts)}; send {key}[0] ... {key}[{len(parts) - 1}]",
                field=key,
            )
        values[key] = tuple(parts[i] for i in range(len(parts)))
    return values


def _merge(tensors: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """Inputs sent as tensors and as parameters; one name sent both ways is refused, not silently resolved."""
    both = sorted(tensors.keys() & parameters.keys())
    if both:
        raise RequestError(f"input {both[0]!r} is sent both as a tensor and as a parameter", f"parameters[{both[0]}]")
    return {**tensors, **parameters}


def _one_number(tensor: Tensor, key: str, index: int) -> float:
    if tensor.numel() != 1:
        raise RequestError(
            f"input {key!r} (inputs[{index}]) must hold one number, got shape {list(tensor.shape)}",
            field=f"inputs[{index}].shape",
        )
    return float(tensor.reshape(-1)[0])


def _has_float(value: Any) -> bool:
    members = value if isinstance(value, tuple) else (value,)
    return any(isinstance(m, Tensor) and m.is_floating_point() for m in members)


def _requested_gradients(description: LossDescription, outputs: Sequence[str], values: Mapping[str, Any]) -> list[str]:
    """The gradients to compute: ``pred`` by default, else those the requested outputs name.

    Only inputs that hold floats have one: ``grad_target`` for class indices is then an unknown
    output (``outputs[i].name``), not an engine error.
    """
    if not outputs:
        return [PRED]
    keys = [
        key
        for key in _gradient_keys(description)
        if _has_float(values.get(key))
        and any(name == GRAD + key or name.startswith((f"{GRAD}{key}[", f"{GRAD}{key}_")) for name in outputs)
    ]
    return keys or ["none"]


# -- TermOutcome -> response ---------------------------------------------------------------------------


def _named_outputs(outcome: TermOutcome) -> dict[str, Tensor]:
    """Every output of an evaluated term by its OIP name (see the module docstring)."""
    if outcome.structure == "tensor":
        part = outcome.parts[0]
        return {LOSS: part.loss, **{GRAD + key: grad for key, grad in part.gradients.items()}}
    named: dict[str, Tensor] = {}
    for part in outcome.parts:
        named[f"{LOSS}_{part.key}"] = part.loss
        named.update({f"{GRAD}{key}_{part.key}": grad for key, grad in part.gradients.items()})
    return named


def _select(named: dict[str, Tensor], outputs: Sequence[str], description: LossDescription) -> list[tuple[str, Tensor]]:
    if not outputs:
        return list(named.items())
    for index, name in enumerate(outputs):
        if name not in named:
            losses = ", ".join(n for n in named if not n.startswith(GRAD))
            raise RequestError(
                f"outputs[{index}] names {name!r}, which {description.name} does not return for this request; "
                f"its outputs are: {losses}, plus grad_<input> for a float input among "
                f"{', '.join(_gradient_keys(description))}",
                field=f"outputs[{index}].name",
            )
    return [(name, named[name]) for name in outputs]


def _encode(selected: list[tuple[str, Tensor]], response: oip.ModelInferResponse) -> None:
    for name, tensor in selected:
        message = codec.encode_tensor(tensor)
        response.outputs.add(name=name, datatype=DTYPE_TO_OIP[message.dtype], shape=list(message.shape))
        response.raw_output_contents.append(message.data)


# -- the servicer ---------------------------------------------------------------------------------------


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the Evaluator that LossService uses."""

    def __init__(
        self,
        evaluator: Evaluator,
        device: torch.device,
        max_elements: int | None = None,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.evaluator = evaluator
        self.ready = ready
        self.registry = evaluator.registry
        self.device = device
        self.max_elements = max_elements

    def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.ServicerContext) -> oip.ServerLiveResponse:  # noqa: N802
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.ServicerContext) -> oip.ServerReadyResponse:  # noqa: N802
        return oip.ServerReadyResponse(ready=self.ready())

    def ServerMetadata(  # noqa: N802
        self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.ServicerContext) -> oip.ModelReadyResponse:  # noqa: N802
        return oip.ModelReadyResponse(ready=request.name in self.registry and request.version in ("", MODEL_VERSION))

    def ModelMetadata(  # noqa: N802
        self, request: oip.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ModelMetadataResponse:
        try:
            description = self._model(request.name, request.version, "name", "version")
        except Exception as error:
            _abort(context, error, "ModelMetadata")
        outputs = [LOSS, *(GRAD + key for key in _gradient_keys(description))]
        return oip.ModelMetadataResponse(
            name=description.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=_metadata_inputs(description),
            outputs=[oip.ModelMetadataResponse.TensorMetadata(name=n, datatype="FP32", shape=[-1]) for n in outputs],
        )

    def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.ServicerContext) -> oip.ModelInferResponse:  # noqa: N802
        started = time.perf_counter()
        where = f"model {request.model_name!r}"
        try:
            description = self._model(request.model_name, request.model_version, "model_name", "model_version")
            outputs = [o.name for o in request.outputs]
            values = _decode_inputs(request, description, self.device, self.max_elements)
            if PRED not in values:
                raise RequestError(
                    f"{description.name} needs input tensor 'pred' ({description.inputs[0].name})", "pred"
                )
            gradients = _requested_gradients(description, outputs, values)
            pred, target = values.pop(PRED), values.pop(TARGET, None)
            term = TermRequest(
                name="",
                config=_decode_config(description.name, request.parameters),
                pred=pred,
                target=target,
                inputs=_merge(values, _decode_parameters(description, request.parameters)),
                gradients=gradients,
            )
            outcome = self.evaluator.evaluate(term)
            response = oip.ModelInferResponse(model_name=description.name, model_version=MODEL_VERSION, id=request.id)
            _encode(_select(_named_outputs(outcome), outputs, description), response)
        except Exception as error:
            _abort(context, error, where)
        log.debug("ModelInfer %s: %.2f ms", description.name, (time.perf_counter() - started) * 1e3)
        return response

    def _model(self, name: str, version: str, name_field: str, version_field: str) -> LossDescription:
        """The description of model ``name``; NOT_FOUND for an unknown loss or version."""
        try:
            description = self.registry.describe(name)
        except UnknownLossError as error:
            raise _not_found(str(error), name_field) from None
        if version not in ("", MODEL_VERSION):
            raise _not_found(f"model {name!r} has version {MODEL_VERSION!r} only, not {version!r}", version_field)
        return description


def _abort(context: grpc.ServicerContext, error: Exception, where: str) -> None:
    status = to_status(error, where)
    if status.code == grpc.StatusCode.INTERNAL:
        log.exception("internal error in %s", where)
    else:
        log.debug("refused: %s", status.details)
    context.abort_with_status(status)


def add_inference_service(
    server: grpc.Server, loss_service: LossService, ready: Callable[[], bool] = lambda: True
) -> str:
    """Serve the Open Inference Protocol on ``server`` with ``loss_service``'s evaluator, device and limits.

    ``ready`` answers ServerReady (false once the server drains). Returns the full service name, for reflection.
    """
    service = InferenceService(loss_service.evaluator, loss_service.device, loss_service.max_elements, ready)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    return SERVICE_NAME
