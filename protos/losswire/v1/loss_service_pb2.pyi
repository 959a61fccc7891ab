from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT32: DType
FLOAT64: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
UINT8: DType
BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "data_dtype", "shm")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    data_dtype: DType
    shm: SharedMemoryRef
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., data_dtype: _Optional[_Union[DType, str]] = ..., shm: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class TensorList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, items: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("tensor", "tensors", "number", "integer", "text", "flag", "json")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    tensors: TensorList
    number: float
    integer: int
    text: str
    flag: bool
    json: _struct_pb2.Value
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., tensors: _Optional[_Union[TensorList, _Mapping]] = ..., number: _Optional[float] = ..., integer: _Optional[int] = ..., text: _Optional[str] = ..., flag: _Optional[bool] = ..., json: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class LossTerm(_message.Message):
    __slots__ = ("name", "config", "pred", "target", "weight", "avg_factor", "reduction_override", "inputs", "gradients", "grad_output", "session", "replay_step", "seed", "sample_labels", "grad_outputs", "forward_id", "sample_groups")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    class GradOutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PRED_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    AVG_FACTOR_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REPLAY_STEP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LABELS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: _struct_pb2.Struct
    pred: Tensor
    target: Value
    weight: Tensor
    avg_factor: float
    reduction_override: str
    inputs: _containers.MessageMap[str, Value]
    gradients: _containers.RepeatedScalarFieldContainer[str]
    grad_output: Tensor
    session: str
    replay_step: int
    seed: int
    sample_labels: Tensor
    grad_outputs: _containers.MessageMap[str, Tensor]
    forward_id: str
    sample_groups: Tensor
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., pred: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Value, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., avg_factor: _Optional[float] = ..., reduction_override: _Optional[str] = ..., inputs: _Optional[_Mapping[str, Value]] = ..., gradients: _Optional[_Iterable[str]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., session: _Optional[str] = ..., replay_step: _Optional[int] = ..., seed: _Optional[int] = ..., sample_labels: _Optional[_Union[Tensor, _Mapping]] = ..., grad_outputs: _Optional[_Mapping[str, Tensor]] = ..., forward_id: _Optional[str] = ..., sample_groups: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("terms", "transfer_dtype", "output_shm", "early_gradients", "lanes")
    TERMS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHM_FIELD_NUMBER: _ClassVar[int]
    EARLY_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    terms: _containers.RepeatedCompositeFieldContainer[LossTerm]
    transfer_dtype: DType
    output_shm: SharedMemoryRef
    early_gradients: bool
    lanes: StreamLanes
    def __init__(self, terms: _Optional[_Iterable[_Union[LossTerm, _Mapping]]] = ..., transfer_dtype: _Optional[_Union[DType, str]] = ..., output_shm: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., early_gradients: _Optional[bool] = ..., lanes: _Optional[_Union[StreamLanes, _Mapping]] = ...) -> None: ...

class StreamLanes(_message.Message):
    __slots__ = ("call", "count", "stripe_bytes")
    CALL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    STRIPE_BYTES_FIELD_NUMBER: _ClassVar[int]
    call: bytes
    count: int
    stripe_bytes: int
    def __init__(self, call: _Optional[bytes] = ..., count: _Optional[int] = ..., stripe_bytes: _Optional[int] = ...) -> None: ...

class StreamLane(_message.Message):
    __slots__ = ("call", "lane")
    CALL_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    call: bytes
    lane: int
    def __init__(self, call: _Optional[bytes] = ..., lane: _Optional[int] = ...) -> None: ...

class EvaluateChunk(_message.Message):
    __slots__ = ("request", "response", "chunk", "lane")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    request: EvaluateRequest
    response: EvaluateResponse
    chunk: TensorChunk
    lane: StreamLane
    def __init__(self, request: _Optional[_Union[EvaluateRequest, _Mapping]] = ..., response: _Optional[_Union[EvaluateResponse, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., lane: _Optional[_Union[StreamLane, _Mapping]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("tensor", "offset", "data")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    offset: int
    data: bytes
    def __init__(self, tensor: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "compute_ms", "encode_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    compute_ms: float
    encode_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ...) -> None: ...

class TermResult(_message.Message):
    __slots__ = ("name", "loss", "gradients", "output", "separable", "sample_axis", "structure", "parts", "session_step", "sampled", "implementation", "constant")
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SEPARABLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_AXIS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    IMPLEMENTATION_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    loss: Tensor
    gradients: _containers.MessageMap[str, Tensor]
    output: str
    separable: bool
    sample_axis: int
    structure: str
    parts: _containers.RepeatedCompositeFieldContainer[LossPart]
    session_step: int
    sampled: SampleCounts
    implementation: str
    constant: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., loss: _Optional[_Union[Tensor, _Mapping]] = ..., gradients: _Optional[_Mapping[str, Tensor]] = ..., output: _Optional[str] = ..., separable: _Optional[bool] = ..., sample_axis: _Optional[int] = ..., structure: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[LossPart, _Mapping]]] = ..., session_step: _Optional[int] = ..., sampled: _Optional[_Union[SampleCounts, _Mapping]] = ..., implementation: _Optional[str] = ..., constant: _Optional[_Iterable[str]] = ...) -> None: ...

class LossPart(_message.Message):
    __slots__ = ("key", "loss", "gradients", "output", "constant")
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    key: str
    loss: Tensor
    gradients: _containers.MessageMap[str, Tensor]
    output: str
    constant: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., loss: _Optional[_Union[Tensor, _Mapping]] = ..., gradients: _Optional[_Mapping[str, Tensor]] = ..., output: _Optional[str] = ..., constant: _Optional[_Iterable[str]] = ...) -> None: ...

class SampleCounts(_message.Message):
    __slots__ = ("positives", "negatives")
    POSITIVES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    positives: int
    negatives: int
    def __init__(self, positives: _Optional[int] = ..., negatives: _Optional[int] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("results", "timings", "device", "server_version", "early")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    EARLY_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TermResult]
    timings: Timings
    device: str
    server_version: str
    early: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, results: _Optional[_Iterable[_Union[TermResult, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., device: _Optional[str] = ..., server_version: _Optional[str] = ..., early: _Optional[_Iterable[str]] = ...) -> None: ...

class SharedMemoryEndpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SharedMemoryEndpointResponse(_message.Message):
    __slots__ = ("address", "connection_key")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_KEY_FIELD_NUMBER: _ClassVar[int]
    address: str
    connection_key: int
    def __init__(self, address: _Optional[str] = ..., connection_key: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("byte_size", "claim")
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    byte_size: int
    claim: str
    def __init__(self, byte_size: _Optional[int] = ..., claim: _Optional[str] = ...) -> None: ...

class RegisterSharedMemoryResponse(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLossesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ParamInfo(_message.Message):
    __slots__ = ("name", "type", "default", "nullable", "choices", "minimum", "maximum", "exclusive_minimum", "exclusive_maximum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    NULLABLE_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_MINIMUM_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default: _struct_pb2.Value
    nullable: bool
    choices: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    minimum: float
    maximum: float
    exclusive_minimum: bool
    exclusive_maximum: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., nullable: _Optional[bool] = ..., choices: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ..., minimum: _Optional[float] = ..., maximum: _Optional[float] = ..., exclusive_minimum: _Optional[bool] = ..., exclusive_maximum: _Optional[bool] = ...) -> None: ...

class InputInfo(_message.Message):
    __slots__ = ("name", "kind", "optional", "default", "choices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    optional: bool
    default: _struct_pb2.Value
    choices: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., optional: _Optional[bool] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., choices: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ...) -> None: ...

class LossInfo(_message.Message):
    __slots__ = ("name", "summary", "params", "inputs", "output", "output_variants", "differentiable", "separable", "sample_axis", "stochastic", "stateful", "implementation", "extra_inputs", "value_inputs")
    class OutputVariantsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_VARIANTS_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    SEPARABLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_AXIS_FIELD_NUMBER: _ClassVar[int]
    STOCHASTIC_FIELD_NUMBER: _ClassVar[int]
    STATEFUL_FIELD_NUMBER: _ClassVar[int]
    IMPLEMENTATION_FIELD_NUMBER: _ClassVar[int]
    EXTRA_INPUTS_FIELD_NUMBER: _ClassVar[int]
    VALUE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    params: _containers.RepeatedCompositeFieldContainer[ParamInfo]
    inputs: _containers.RepeatedCompositeFieldContainer[InputInfo]
    output: str
    output_variants: _containers.ScalarMap[str, str]
    differentiable: _containers.RepeatedScalarFieldContainer[str]
    separable: bool
    sample_axis: int
    stochastic: bool
    stateful: bool
    implementation: str
    extra_inputs: bool
    value_inputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., params: _Optional[_Iterable[_Union[ParamInfo, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[InputInfo, _Mapping]]] = ..., output: _Optional[str] = ..., output_variants: _Optional[_Mapping[str, str]] = ..., differentiable: _Optional[_Iterable[str]] = ..., separable: _Optional[bool] = ..., sample_axis: _Optional[int] = ..., stochastic: _Optional[bool] = ..., stateful: _Optional[bool] = ..., implementation: _Optional[str] = ..., extra_inputs: _Optional[bool] = ..., value_inputs: _Optional[_Iterable[str]] = ...) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses", "server_version", "device")
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossInfo]
    server_version: str
    device: str
    def __init__(self, losses: _Optional[_Iterable[_Union[LossInfo, _Mapping]]] = ..., server_version: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session", "config", "steps", "idle_seconds", "expires_in_seconds", "state")
    class StateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    session: str
    config: _struct_pb2.Struct
    steps: int
    idle_seconds: float
    expires_in_seconds: float
    state: _containers.MessageMap[str, Tensor]
    def __init__(self, session: _Optional[str] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., steps: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., expires_in_seconds: _Optional[float] = ..., state: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: _struct_pb2.Struct
    def __init__(self, config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("loss", "config", "output", "stateful", "server_version")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STATEFUL_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    loss: LossInfo
    config: _struct_pb2.Struct
    output: str
    stateful: bool
    server_version: str
    def __init__(self, loss: _Optional[_Union[LossInfo, _Mapping]] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., output: _Optional[str] = ..., stateful: _Optional[bool] = ..., server_version: _Optional[str] = ...) -> None: ...
