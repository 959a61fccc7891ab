"""The Open Inference Protocol (KServe v2 / Triton gRPC) converted to and from losswire's contract.

``inference.GRPCInferenceService`` (``protos/inference/grpc_predict_v2.proto``) answers on the same port
as ``losswire.v1.LossService``, so Triton's own client (``tritonclient.grpc``) and any KServe v2 client
can evaluate a loss and its gradient. A ModelInfer request becomes the one-term ``EvaluateRequest``
LossService would get, its tensors' bytes handed over by field path without a copy; the dataplane
then applies every limit and runs it as it runs any call; the ``TermResult`` becomes the outputs.
Errors name the protocol's own fields: the dataplane's paths are renamed (``OipWhere``).

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
  ``grad_target`` (``grad_target[1]`` for a tuple member) for float targets, or ``grad_weight`` (any
  float input tensor, as LossService's ``gradients``) when the request names it in ``outputs``.
  Without ``outputs`` the response holds ``loss`` and ``grad_pred``; with ``outputs`` exactly the
  outputs named, in that order (only ``loss``: no backward at all).
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
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec, protocol

from ..errors import LimitExceededError, NotFoundError, RequestError
from ..evaluation import PRED, TARGET
from ..losses import LossDescription, Registry, UnknownLossError
from .status import Where

MODEL_VERSION = "1"
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
FLOAT_DATATYPES = frozenset({"FP16", "BF16", "FP32", "FP64"})
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
# digits of a member index, at most: no tuple has a million members, and int() refuses over 4300 digits
MAX_MEMBER_DIGITS = 6
TERM = "terms[0]"


def model(registry: Registry, name: str, version: str, name_field: str, version_field: str) -> LossDescription:
    """The description of model ``name``; NOT_FOUND for an unknown loss or version."""
    try:
        description = registry.describe(name)
    except UnknownLossError as error:
        raise NotFoundError(str(error), name_field) from None
    if version not in ("", MODEL_VERSION):
        raise NotFoundError(f"model {name!r} has version {MODEL_VERSION!r} only, not {version!r}", version_field)
    return description


# -- the model's names ------------------------------------------------------------------------------


def canonical_names(description: LossDescription) -> dict[str, str]:
    """Every accepted input name -> its key: ``pred``/``target`` for the first two, else the forward name."""
    names = {spec.name: spec.name for spec in description.inputs}
    for alias, spec in zip((PRED, TARGET), description.inputs, strict=False):
        names[spec.name] = names[alias] = alias
    return names


def metadata_inputs(description: LossDescription) -> list[oip.ModelMetadataResponse.TensorMetadata]:
    canonical = canonical_names(description)
    return [
        oip.ModelMetadataResponse.TensorMetadata(
            name=canonical[spec.name], datatype="FP32", shape=[1] if spec.kind == "number" else [-1]
        )
        for spec in description.inputs
        if spec.kind in TENSOR_KINDS
    ]


def gradient_keys(description: LossDescription, declared: bool = False) -> list[str]:
    """The inputs a call may ask this loss's gradients of, by their OIP key (``pred``, ``target``...), as
    LossService's (``LossDescription.gradient_inputs``); ``declared``: those it declares differentiable
    only (ModelMetadata's outputs)."""
    canonical = canonical_names(description)
    return [canonical[name] for name in (description.differentiable if declared else description.gradient_inputs)]


# -- ModelInferRequest -> EvaluateRequest ----------------------------------------------------------------


class OipWhere(Where):
    """Errors of one ModelInfer call in the protocol's words: the model names the place, and the
    dataplane's field paths (``terms[0].pred.shape``) become the request's (``inputs[0].shape``)."""

    def __init__(self, model_name: str) -> None:
        self.prefix = f"model {model_name[:100]!r}"
        # dataplane path -> the request's, longest first when renaming; the term's config is the request's
        self.paths: dict[str, str] = {f"{TERM}.config.": "config."}

    def term(self, index: int, name: str) -> tuple[str, str]:
        return self.prefix, ""  # one term; engine fields stay as the engine names them ("target")

    def rename(self, text: str) -> str:
        for path in sorted(self.paths, key=len, reverse=True):
            text = text.replace(path, self.paths[path])
        return text


class Conversion:
    """A ModelInferRequest as a one-term EvaluateRequest: the request, the tensors' bytes by field path
    (``arrived()``, made once the dataplane's limits have passed), and the outputs asked for."""

    def __init__(self, request: oip.ModelInferRequest, description: LossDescription, where: OipWhere) -> None:
        self.description, self.where = description, where
        self.outputs = _requested_outputs(request)
        self.request = pb.EvaluateRequest()
        self.term = self.request.terms.add()
        self._pending: dict[str, Callable[[], torch.Tensor]] = {}
        self.typed_values = 0  # values in typed ``contents``, converted when handed over
        codec.encode_config(_config(description.name, request.parameters), self.term.config)
        floats = self._inputs(request)
        self._parameters(request.parameters)
        self.term.gradients.extend(self._gradients(floats))

    def arrived(self) -> dict[str, torch.Tensor]:
        """Every input tensor by its field path, viewed over the request's bytes (typed contents converted)."""
        return {path: make() for path, make in self._pending.items()}

    def _inputs(self, request: oip.ModelInferRequest) -> set[str]:
        """Place every input tensor in the term; returns the keys of those holding floats."""
        canonical = canonical_names(self.description)
        kinds = {canonical[spec.name]: spec.kind for spec in self.description.inputs}
        seen: dict[str, int] = {}
        members: dict[str, dict[int, tuple[int, oip.ModelInferRequest.InferInputTensor, bytes | None]]] = {}
        floats: set[str] = set()
        for index, (tensor, raw) in enumerate(zip(request.inputs, _raw_contents(request), strict=True)):
            name, position = _member(tensor.name, index)
            key = canonical.get(name)
            if key is None or kinds[key] not in TENSOR_KINDS:
                accepted = [n for n, k in canonical.items() if kinds[k] in TENSOR_KINDS]
                raise RequestError(
                    f"{self.description.name} has no input tensor {_quoted(tensor.name)} (inputs[{index}]); its "
                    f"inputs are: {', '.join(accepted)}",
                    field=f"inputs[{index}].name",
                )
            if key in seen or (position is None and key in members) or position in members.get(key, {}):
                raise RequestError(f"input {key!r} is given twice (inputs[{index}])", field=f"inputs[{index}].name")
            if tensor.datatype in FLOAT_DATATYPES:
                floats.add(key if position is None else f"{key}[{position}]")
            if position is not None:
                members.setdefault(key, {})[position] = (index, tensor, raw)
                continue
            seen[key] = index
            if kinds[key] == "number":
                self.term.inputs[key].number = _one_number(tensor, raw, key, index)
            else:
                self._tensor(self._slot(key), _path(key), tensor, raw, index)
        for key, parts in members.items():
            if sorted(parts) != list(range(len(parts))):
                missing = min(set(range(len(parts))) - set(parts))
                raise RequestError(
                    f"input {key!r} has members {sorted(parts)}: they are numbered from 0 without a gap, and "
                    f"{key}[{missing}] is missing",
                    field=key,
                )
            value = self.term.target if key == TARGET else self.term.inputs[key]
            value.tensors.SetInParent()
            for position in range(len(parts)):
                index, tensor, raw = parts[position]
                path = f"{_path(key)}.tensors.items[{position}]"
                self._tensor(value.tensors.items.add(), path, tensor, raw, index)
        if PRED not in seen:
            name = self.description.inputs[0].name
            raise RequestError(f"{self.description.name} needs input tensor 'pred' ({name})", PRED)
        return floats

    def _slot(self, key: str) -> pb.Tensor:
        if key == PRED:
            return self.term.pred
        if key == TARGET:
            return self.term.target.tensor
        return self.term.inputs[key].tensor

    def _tensor(
        self, slot: pb.Tensor, path: str, tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None, index: int
    ) -> None:
        """Declare one input in ``slot`` (dtype and shape: all the limits read) and queue its bytes."""
        where = f"input {_quoted(tensor.name)} (inputs[{index}])"
        if tensor.datatype not in OIP_TO_DTYPE:
            raise RequestError(
                f"{where}: datatype {_quoted(tensor.datatype)} is not supported; use one of {', '.join(OIP_TO_DTYPE)}",
                field=f"inputs[{index}].datatype",
            )
        slot.dtype = OIP_TO_DTYPE[tensor.datatype]
        slot.shape[:] = list(tensor.shape)
        self.where.paths[path] = f"inputs[{index}]"
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            return  # the dataplane's shape check names it
        numel = math.prod(shape)
        dtype = codec.DTYPE_TO_TORCH[slot.dtype]
        # bytes that do not fill the declared shape are refused when they are handed over (``arrived``), once the
        # dataplane's limits on that shape have passed: a shape over a limit is refused as such, as by every door
        if raw is None:
            count = _typed_count(tensor, index)
            if count != numel:
                self._pending[path] = _refused(
                    RequestError(
                        f"{where}: inputs[{index}].contents holds {count * dtype.itemsize} bytes; {tensor.datatype} "
                        f"{shape} needs {numel} x {dtype.itemsize} = {numel * dtype.itemsize}",
                        field=f"inputs[{index}].contents",
                    )
                )
                return
            self.typed_values += count
            self._pending[path] = lambda: _typed_tensor(tensor, index, dtype, shape)
        else:
            if len(raw) != numel * dtype.itemsize:
                self._pending[path] = _refused(
                    RequestError(
                        f"{where}: raw_input_contents[{index}] holds {len(raw)} bytes; {tensor.datatype} {shape} "
                        f"needs {numel} x {dtype.itemsize} = {numel * dtype.itemsize}",
                        field=f"raw_input_contents[{index}]",
                    )
                )
                return
            self._pending[path] = lambda: _raw_tensor(raw, dtype, shape)

    def _parameters(self, parameters: Mapping[str, oip.InferParameter]) -> None:
        """Forward inputs sent as request parameters, by name (JSON strings decoded for structured inputs)."""
        kinds = {spec.name: spec.kind for spec in self.description.inputs if spec.kind in PARAMETER_KINDS}
        for name, parameter in parameters.items():
            if name == CONFIG or name in TRITON_PARAMETERS or name.startswith("triton_"):
                continue
            field = f"parameters[{_quoted(name, bare=True)}]"
            if name not in kinds:
                accepted = ", ".join([CONFIG, *kinds])
                raise RequestError(
                    f"{self.description.name} takes no parameter {_quoted(name)}; its parameters are: {accepted}",
                    field=field,
                )
            if name in self.term.inputs:
                raise RequestError(f"input {name!r} is sent both as a tensor and as a parameter", field)
            value = _within_int64(_parameter_value(parameter), field)
            if kinds[name] == "any" and isinstance(value, str):
                value = _json(value, field)
            try:
                codec.encode_value(value, self.term.inputs[name])
            except codec.CodecError as error:  # JSON the codec cannot carry (a number beyond a double...)
                raise RequestError(f"{field}: {error}", field=field) from None

    def _gradients(self, floats: set[str]) -> list[str]:
        """The gradients to compute: ``pred`` by default, else those the requested outputs name.

        Only inputs that hold floats have one: ``grad_target`` for class indices is then an unknown
        output (``outputs[i].name``), not an engine error."""
        if not self.outputs:
            return [PRED]
        keys = [
            key
            for key in gradient_keys(self.description)
            if any(f == key or f.startswith(f"{key}[") for f in floats)
            and any(n == GRAD + key or n.startswith((f"{GRAD}{key}[", f"{GRAD}{key}_")) for n in self.outputs)
        ]
        return keys or ["none"]


# -- EvaluateResponse -> ModelInferResponse ---------------------------------------------------------------


def infer_response(
    request: oip.ModelInferRequest, conversion: Conversion, response: pb.EvaluateResponse
) -> oip.ModelInferResponse:
    """The evaluated term's outputs by their protocol names, those asked for in the order asked."""
    (result,) = response.results
    answer = oip.ModelInferResponse(model_name=conversion.description.name, model_version=MODEL_VERSION, id=request.id)
    for name, tensor in _select(_named_outputs(result), conversion.outputs, conversion.description):
        data = tensor.data  # read once: every read of a bytes field copies it
        answer.outputs.add(name=name, datatype=DTYPE_TO_OIP[tensor.dtype], shape=list(tensor.shape))
        answer.raw_output_contents.append(data)
    return answer


def _named_outputs(result: pb.TermResult) -> dict[str, pb.Tensor]:
    """Every output of an evaluated term by its OIP name (see the module docstring)."""
    if result.structure in ("", "tensor"):
        return {LOSS: result.loss, **{GRAD + key: grad for key, grad in result.gradients.items()}}
    named: dict[str, pb.Tensor] = {}
    for part in result.parts:
        named[f"{LOSS}_{part.key}"] = part.loss
        named.update({f"{GRAD}{key}_{part.key}": grad for key, grad in part.gradients.items()})
    return named


def _select(
    named: dict[str, pb.Tensor], outputs: Sequence[str], description: LossDescription
) -> list[tuple[str, pb.Tensor]]:
    if not outputs:
        return list(named.items())
    for index, name in enumerate(outputs):
        if name not in named:
            losses = ", ".join(n for n in named if not n.startswith(GRAD))
            raise RequestError(
                f"outputs[{index}] names {_quoted(name)}, which {description.name} does not return for this request; "
                f"its outputs are: {losses}, plus grad_<input> for a float input among "
                f"{', '.join(gradient_keys(description))}",
                field=f"outputs[{index}].name",
            )
    return [(name, named[name]) for name in outputs]


# -- pieces -------------------------------------------------------------------------------------------------


def _quoted(text: str, limit: int = 100, bare: bool = False) -> str:
    """A caller's string, quoted at most ``limit`` characters."""
    cut = text if len(text) <= limit else f"{text[:limit]}..."
    return cut if bare else repr(cut)


def _requested_outputs(request: oip.ModelInferRequest) -> list[str]:
    """The outputs named, each once: every name gets its own copy of its tensor in the answer, so ``loss``
    named 3000 times made a 0.3 MB request a 300 MB answer."""
    first: dict[str, int] = {}
    for index, output in enumerate(request.outputs):
        if output.name in first:
            raise RequestError(
                f"outputs[{index}].name names {_quoted(output.name)} again (first at outputs[{first[output.name]}]); "
                "name each output once",
                field=f"outputs[{index}].name",
            )
        first[output.name] = index
    return list(first)


def _member(name: str, index: int) -> tuple[str, int | None]:
    """Input ``inputs[index]``'s name as (input, member index): ``target[1]`` -> ``("target", 1)``,
    ``pred`` -> ``("pred", None)``."""
    member = MEMBER.fullmatch(name)
    if member is None:
        return name, None
    digits = member["index"]
    if len(digits) > MAX_MEMBER_DIGITS:  # before int(): it refuses over 4300 digits with a ValueError
        raise RequestError(
            f"inputs[{index}].name {_quoted(name)}: a member index must be a small non-negative integer of at most "
            f"{MAX_MEMBER_DIGITS} digits ({member['name'][:100]}[0], {member['name'][:100]}[1]...), "
            f"got {len(digits)} digits",
            field=f"inputs[{index}].name",
        )
    return member["name"], int(digits)


def _path(key: str) -> str:
    """The dataplane's field path of the input with key ``key``."""
    return f"{TERM}.{key}" if key in (PRED, TARGET) else f"{TERM}.inputs[{key}]"


def _parameter_value(parameter: oip.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _within_int64(value: Any, field: str) -> Any:
    """``value``, unless an integer beyond int64, which the engine's integers travel in (a ``uint64_param``
    of 2**63 or more)."""
    if isinstance(value, int) and not codec.INT64_MIN <= value <= codec.INT64_MAX:
        raise RequestError(
            f"{field} must be an integer within int64 (-2**63 .. 2**63 - 1), got {value}",
            field=field,
        )
    return value


def _json(text: str, field: str) -> Any:
    """The JSON string parameter ``field``, parsed; refused when invalid or nested deeper than
    ``codec.MAX_JSON_DEPTH`` (which json.loads parses but the codec cannot carry)."""
    if len(text) > protocol.MAX_JSON_BYTES:
        raise LimitExceededError(
            f"{field} is a JSON string of {len(text)} characters; a config or JSON input may be at most "
            f"{protocol.MAX_JSON_BYTES} (a real one is a few hundred)",
            field=field,
        )
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as error:
        raise RequestError(f"{field} is not valid JSON: {str(error)[:200]}", field=field) from None
    depth = _json_depth(value)
    if depth > codec.MAX_JSON_DEPTH:
        raise RequestError(
            f"{field} is JSON that nests {depth} levels deep; lists and objects may nest at most "
            f"{codec.MAX_JSON_DEPTH} levels",
            field=field,
        )
    return value


def _json_depth(value: Any) -> int:
    """How many levels of lists and objects nest in a parsed JSON value (a scalar: 0), level by level:
    recursing would meet Python's recursion limit first."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list))
        ]
    return depth


def _config(model_name: str, parameters: Mapping[str, oip.InferParameter]) -> dict[str, Any]:
    """The ``config`` parameter (a JSON object string) as an mmdet config dict of type ``model_name``."""
    if CONFIG not in parameters:
        return {"type": model_name}
    text = _parameter_value(parameters[CONFIG])
    field = f"parameters[{CONFIG}]"
    if not isinstance(text, str):
        raise RequestError(f"{field} must be a JSON object string, got {type(text).__name__} {text!r}", field=field)
    config = _json(text, field)
    if not isinstance(config, dict):
        raise RequestError(f"{field} must be a JSON object, got {type(config).__name__}", field=field)
    if config.get("type", model_name) != model_name:
        raise RequestError(
            f"{field} has type {_quoted(str(config['type']))} but the model is {model_name!r}; drop 'type' or call "
            f"model {_quoted(str(config['type']))}",
            field="config.type",
        )
    return {**config, "type": model_name}


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
                f"inputs[{index}] ({_quoted(tensor.name, bare=True)}) has contents while the request uses "
                "raw_input_contents; send every input one way",
                field=f"inputs[{index}].contents",
            )
    return raw


def _typed_count(tensor: oip.ModelInferRequest.InferInputTensor, index: int) -> int:
    """How many values the typed ``contents`` holds (no conversion yet)."""
    if tensor.datatype not in TYPED_CONTENTS:
        raise RequestError(
            f"input {_quoted(tensor.name)} (inputs[{index}]) is {tensor.datatype}, which travels in "
            "raw_input_contents only",
            field=f"inputs[{index}].contents",
        )
    field, _ = TYPED_CONTENTS[tensor.datatype]
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:  # values in another type's field would be silently ignored
        raise RequestError(
            f"input {_quoted(tensor.name)} (inputs[{index}]) is {tensor.datatype}, whose values go in "
            f"contents.{field}; got values in contents.{', contents.'.join(others)}",
            field=f"inputs[{index}].contents.{others[0]}",
        )
    return len(getattr(tensor.contents, field))


# Typed ``contents`` are copied into one array by protobuf's own code (``__array__`` of upb's repeated fields:
# 256,000 fp32_contents in ~0.3-1 ms, where converting value by value took 12-16 ms with the interpreter lock
# held). Still, a call whose inputs hold more than this is not tried on the event loop (a quick call's stall
# there is about a millisecond), and its values are converted once, on a compute thread. Tried there first, a
# FocalLoss call of 256,000 values held the loop 12-16 ms (and was converted again on a thread), and a flood of
# them made other callers' quick calls 3-4 times slower than a flood of the same tensors sent raw.
QUICK_MAX_TYPED_VALUES = 1 << 14

# the numpy type each typed ``contents`` field holds its values in (its protobuf scalar type)
CONTENTS_TYPES = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}


def _typed_tensor(
    tensor: oip.ModelInferRequest.InferInputTensor, index: int, dtype: torch.dtype, shape: list[int]
) -> torch.Tensor:
    """Typed ``contents`` -> a tensor of the declared datatype and shape, copied into one array of the field's
    type (no list of Python numbers: 20 M int64 zeros take 160 MB, not 40x that)."""
    field, numpy_type = TYPED_CONTENTS[tensor.datatype]
    values = getattr(tensor.contents, field)
    if hasattr(values, "__array__"):  # upb's repeated field: one copy, its own array
        array = np.array(values, dtype=CONTENTS_TYPES[field])
    else:  # another protobuf implementation: value by value, still without a list
        array = np.fromiter(values, dtype=CONTENTS_TYPES[field], count=len(values))
    target = np.dtype(numpy_type)
    if target.kind in "iu" and array.size and target.itemsize < array.dtype.itemsize:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:  # int_contents 300 for INT8 would wrap
            raise RequestError(
                f"input {_quoted(tensor.name)} (inputs[{index}]): contents.{field} holds values that do not fit "
                f"{tensor.datatype}",
                field=f"inputs[{index}].contents.{field}",
            )
    return torch.from_numpy(array.astype(target.newbyteorder("<"), copy=False)).reshape(shape)


def _refused(error: RequestError) -> Callable[[], torch.Tensor]:
    """The hand-over of an input whose bytes do not fill its declared shape: ``error``, raised when handed over."""

    def refuse() -> torch.Tensor:
        raise error

    return refuse


def _raw_tensor(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """Raw little-endian bytes as a tensor, without a copy (read-only: never written in place)."""
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)


def _one_number(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None, key: str, index: int) -> float:
    """A one-element input tensor (``avg_factor``) as its number."""
    shape = list(tensor.shape)
    if math.prod(shape) != 1 or any(d < 0 for d in shape):
        raise RequestError(
            f"input {key!r} (inputs[{index}]) must hold one number, got shape {shape}", field=f"inputs[{index}].shape"
        )
    if tensor.datatype not in OIP_TO_DTYPE:
        raise RequestError(
            f"input {key!r} (inputs[{index}]): datatype {_quoted(tensor.datatype)} is not supported; use one of "
            f"{', '.join(OIP_TO_DTYPE)}",
            field=f"inputs[{index}].datatype",
        )
    dtype = codec.DTYPE_TO_TORCH[OIP_TO_DTYPE[tensor.datatype]]
    if raw is None:
        if _typed_count(tensor, index) != 1:
            raise RequestError(f"input {key!r} (inputs[{index}]) must hold one number", f"inputs[{index}].contents")
        return float(_typed_tensor(tensor, index, dtype, [1])[0])
    if len(raw) != dtype.itemsize:
        raise RequestError(
            f"input {key!r} (inputs[{index}]): raw_input_contents[{index}] holds {len(raw)} bytes; "
            f"{tensor.datatype} [1] needs {dtype.itemsize}",
            field=f"raw_input_contents[{index}]",
        )
    return float(_raw_tensor(raw, dtype, [1])[0])
