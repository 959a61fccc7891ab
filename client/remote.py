"""``RemoteLoss``: an nn.Module whose forward and backward are evaluated by a losswire server.

    loss_fn = RemoteLoss(dict(type='FocalLoss', gamma=2.0), target='localhost:50051')
    loss = loss_fn(pred, labels, avg_factor=num_pos)
    loss.backward()                      # pred.grad arrives from the server

The forward takes exactly the arguments of the MMDetection module for ``cfg['type']`` (the
server's description of that loss defines the signature) and returns what it returns: a tensor,
a tuple (AssociativeEmbeddingLoss) or a dict (SeesawLoss). One round trip returns the loss and
its gradient; ``backward`` applies the upstream gradient locally when the loss is separable
(every built-in loss is) and otherwise sends it back for an exact recompute.

Stateful losses keep their state on the server in a named session shared by every worker:

    seesaw = RemoteLoss(dict(type='SeesawLoss', num_classes=1203), session='exp42/roi_head')
    seesaw.session_state()['cum_samples']     # read it; seesaw.reset_session() drops it
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import torch
from torch import Tensor, nn

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec

from .channel import DEFAULT_TARGET, LossClient, Target
from .errors import RemoteLossError

SAMPLE_LABELS, SAMPLE_GROUPS = "sample_labels", "sample_groups"


def _signature(info: pb.LossInfo, sampled: bool) -> inspect.Signature:
    parameters = [
        inspect.Parameter(
            item.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=codec.python_value(item.default) if item.optional else inspect.Parameter.empty,
        )
        for item in info.inputs
    ]
    if sampled:  # a sampler also takes the labels to sample by (default: the target) and image indices
        for name in (SAMPLE_LABELS, SAMPLE_GROUPS):
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(parameters)


class RemoteLoss(nn.Module):
    """A loss evaluated by a losswire server, used like the local MMDetection module.

    Args:
        cfg: the mmdet config dict, e.g. ``dict(type='GIoULoss', loss_weight=2.0)``.
        target: the server address (``host:port``); a gRPC name such as ``dns:///losswire:50051``, or
            several servers (``["gpu1:50051", "gpu2:50051"]`` or ``"gpu1:50051,gpu2:50051"``): calls are
            balanced round_robin over the replicas and a session's calls go to one replica (see
            ``losswire.client.channel``).
        timeout: deadline of each call in seconds (None: the client's default).
        client: an existing ``LossClient`` to share (default: one shared client per target).
        validate: check the config with the server now, so mistakes surface at construction.
        session: keep the loss's state (SeesawLoss, EQLV2Loss, GHM with momentum) on the server
            under this name, shared with every module naming it; None: state lives for one call.
        seed: the seed of ``cfg['sampler']`` and of stochastic losses (L2Loss's random mining) for
            every call; None draws one per call from torch's global generator, so
            ``torch.manual_seed`` makes a run reproducible.
        transfer_dtype: ``'float16'`` or ``'bfloat16'`` (None: the client's, by default none): float32
            and float64 tensors travel at that precision, both ways (inputs, loss, gradients), at half
            the bytes of float32. Lossy: the server casts the inputs back to their own dtype and
            computes in it, so the loss is that of the rounded inputs; gradients (and an element-wise
            loss) are rounded again on the way back, then cast to pred's dtype. Tensors under 4096
            elements (a scalar loss, avg_factor-sized things) keep full precision. float16 keeps ~3 significant
            digits and flushes magnitudes below 6e-8 to zero (gradients of a mean over millions of
            elements are that small: prefer bfloat16, or reduction 'sum'); bfloat16 keeps float32's
            range but only ~2-3 significant digits (box coordinates of 1000 px round to 4 px). Integer
            and bool tensors (labels) are sent as they are.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        target: Target = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        client: LossClient | None = None,
        validate: bool = True,
        session: str | None = None,
        seed: int | None = None,
        transfer_dtype: str | None = None,
    ) -> None:
        super().__init__()
        codec.transfer_dtype_of(transfer_dtype)  # a ValueError now for a bad name
        self.transfer_dtype = transfer_dtype
        self.cfg = dict(cfg)
        self.client = client or LossClient.shared(target)
        self.timeout = timeout
        self.session = session
        self.seed = seed
        # the session step of this module's latest forward: the order the server applied it in
        self.last_session_step = 0
        # the server's decode / compute / encode milliseconds of this module's latest forward
        self.last_timings: pb.Timings | None = None
        self._info: pb.LossInfo | None = None
        self._forward_signature: inspect.Signature | None = None
        self._call_shape: _CallShape | None = None
        self._config_cache: tuple[Any, bytes] | None = None  # (cfg as encoded, its Struct's bytes)
        if validate:
            self.info  # noqa: B018 - the Describe call validates the config

    def __getstate__(self) -> dict[str, Any]:
        # Channels do not pickle or deep-copy (mmengine deep-copies configs and modules): keep the
        # target and reconnect through the shared client on the other side. Credentials given in code
        # travel along (a pickle then holds the token); the environment's are read again over there.
        state = self.__dict__.copy()
        credentials = None if self.client.credentials_from_env else self.client.credentials
        state["client"] = (self.client.target, credentials)
        state["_info"] = None if self._info is None else self._info.SerializeToString()
        state["_forward_signature"] = None  # rebuilt from _info on first use
        state["_call_shape"] = state["_config_cache"] = state["last_timings"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        (target, credentials), info = state["client"], state["_info"]
        state = {**state, "client": LossClient.shared(target, credentials), "_info": None}
        state.setdefault("_call_shape", None)
        state.setdefault("_config_cache", None)
        self.__dict__.update(state)
        if info is not None:
            self._info = pb.LossInfo.FromString(info)

    @property
    def info(self) -> pb.LossInfo:
        """The server's description of this loss (fetched once, with config validation)."""
        if self._info is None:
            self._info = self.client.describe(self.cfg, self.timeout).loss
        return self._info

    @property
    def input_names(self) -> list[str]:
        return [item.name for item in self.info.inputs]

    def extra_repr(self) -> str:
        session = f", session={self.session!r}" if self.session else ""
        return f"cfg={self.cfg!r}, target={self.client.target!r}{session}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        term = self.bind(*args, **kwargs)
        return evaluate_terms({"": term}, client=self.client, timeout=self.timeout)[""]

    def bind(self, *args: Any, **kwargs: Any) -> BoundTerm:
        """Bind forward arguments as mmdet's module would (a TypeError for a wrong call)."""
        shape = self._shape()
        if len(args) <= len(shape.names) and (not kwargs or shape.takes(kwargs, len(args))):
            # the common call (positional, then known names not given twice): what Signature.bind
            # returns, without its per-call cost (~50 us); anything else goes to bind for its TypeError
            arguments = dict(zip(shape.names, args, strict=False))
            arguments.update(kwargs)
            if all(name in arguments for name in shape.required):
                return BoundTerm(self, arguments)
        return BoundTerm(self, dict(shape.signature.bind(*args, **kwargs).arguments))

    def _shape(self) -> _CallShape:
        """What the forward takes, from the server's description: built once, not on every forward
        (again if ``cfg`` gains or loses a sampler, which adds the sampling arguments)."""
        sampled = "sampler" in self.cfg
        shape = self._call_shape
        if shape is None or shape.sampled != sampled:
            self._forward_signature = _signature(self.info, sampled)
            shape = self._call_shape = _CallShape(self.info, self._forward_signature, sampled)
        return shape

    def encoded_config(self) -> bytes:
        """``cfg`` as a serialized ``google.protobuf.Struct``: encoded again only when ``cfg`` changed
        (compared with a copy of what was encoded, so editing ``module.cfg`` in place is seen)."""
        cached = self._config_cache
        if cached is not None and _same_config(cached[0], self.cfg):
            return cached[1]
        encoded = codec.encode_config(self.cfg).SerializeToString()
        self._config_cache = (copy.deepcopy(self.cfg), encoded)
        return encoded

    # -- server-held state ---------------------------------------------------------------------

    def session_state(self) -> dict[str, Tensor]:
        """The session's state tensors by name (e.g. ``cum_samples``), as the server holds them now."""
        return _decode_state(self.client.get_session(self._session_name(), self.timeout))

    def reset_session(self) -> dict[str, Tensor]:
        """Drop the session's state (the next forward starts afresh); returns the state it had."""
        return _decode_state(self.client.reset_session(self._session_name(), self.timeout))

    def _session_name(self) -> str:
        if not self.session:
            raise ValueError("this RemoteLoss has no session: pass session='name' to keep state on the server")
        return self.session


def _same_config(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (``True == 1`` but they encode differently); a
    tensor is never the same (it may have changed in place)."""
    if type(a) is not type(b) or isinstance(a, Tensor):
        return False
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(_same_config(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_config(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class _CallShape:
    """A loss's forward arguments as the client needs them on every call, read once from its LossInfo."""

    __slots__ = ("differentiable", "keywords", "names", "required", "sampled", "signature")

    def __init__(self, info: pb.LossInfo, signature: inspect.Signature, sampled: bool) -> None:
        self.names = tuple(item.name for item in info.inputs)
        self.required = tuple(item.name for item in info.inputs if not item.optional)
        self.keywords = frozenset(signature.parameters)
        self.differentiable = frozenset(info.differentiable)
        self.signature, self.sampled = signature, sampled

    def takes(self, kwargs: Mapping[str, Any], positional: int) -> bool:
        """Whether ``kwargs`` are all known names not already given by the first ``positional`` arguments."""
        given = self.names[:positional]
        return all(key in self.keywords and key not in given for key in kwargs)


def _decode_state(info: pb.SessionInfo) -> dict[str, Tensor]:
    return {k: codec.decode_tensor(v, f"state[{k}]") for k, v in info.state.items()}


@dataclasses.dataclass
class BoundTerm:
    """A RemoteLoss with the arguments of one call."""

    loss: RemoteLoss
    arguments: dict[str, Any]


@dataclasses.dataclass
class _Leaf:
    term: int  # index of the term
    key: str  # gradient key in the response: "pred", "target", "target[1]"
    tensor: Tensor


def _leaf_tensors(name: str, value: Any) -> list[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        return [(name, value)] if value.requires_grad else []
    if isinstance(value, (tuple, list)):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, Tensor) and v.requires_grad]
    return []


@dataclasses.dataclass
class _Output:
    term: int  # index of the term
    key: str  # the part's key ("" for a single-tensor loss)


class _Plan:
    """One Evaluate round trip for several terms, and what backward needs afterwards."""

    def __init__(self, terms: Sequence[tuple[str, BoundTerm]], client: LossClient, timeout: float | None):
        self.client, self.timeout = client, timeout
        self.names = [name for name, _ in terms]
        self.terms = list(terms)
        self.request = pb.EvaluateRequest()
        self.leaves: list[_Leaf] = []
        self.devices: list[torch.device] = []
        # big tensors are not copied into the request: if it is big enough to stream, their chunks
        # are cut straight from their memory
        holds_back = client.stream_threshold is not None or client.shared_memory_threshold is not None
        self.sink = chunks.StreamSink() if holds_back else None
        self.streamed: dict[str, Tensor] = {}
        self.lent: dict[str, tuple[Tensor, int]] = {}  # gradients handed to autograd as they are (see _lend)
        transfers = [codec.transfer_dtype_of(bound.loss.transfer_dtype or client.transfer_dtype) for _, bound in terms]
        if transfers and all(t == transfers[0] for t in transfers):
            self.request.transfer_dtype = transfers[0]  # the answer travels narrowed too
        grad_enabled = torch.is_grad_enabled()
        for index, (name, bound) in enumerate(terms):
            message = self.request.terms.add(name=name)
            self.devices.append(self._encode_term(bound, message, index, grad_enabled, transfers[index]))

    def _encode_term(
        self, bound: BoundTerm, message: pb.LossTerm, index: int, grad_enabled: bool, transfer: int
    ) -> torch.device:
        module, info, arguments = bound.loss, bound.loss.info, bound.arguments
        options = {"transfer_dtype": transfer, "sink": self.sink}
        shape = module._shape()
        names = shape.names
        message.config.MergeFromString(module.encoded_config())  # the Struct, encoded once per cfg
        pred = arguments.get(names[0])
        if not isinstance(pred, Tensor):
            raise TypeError(f"{info.name}: {names[0]} must be a tensor, got {type(pred).__name__}")
        codec.encode_tensor(pred, message.pred, **options)
        for position, name in enumerate(names):
            value = arguments.get(name)
            if value is None or position == 0:
                continue
            if position == 1:
                codec.encode_value(tuple(value) if _is_tensor_list(value) else value, message.target, **options)
            elif name == "weight":
                codec.encode_tensor(value, message.weight, **options)
            elif name == "avg_factor":
                message.avg_factor = float(value)
            elif name == "reduction_override":
                message.reduction_override = value
            else:
                codec.encode_value(value, message.inputs[name], **options)
        self._encode_extras(module, arguments, message)
        requested = []
        if grad_enabled:
            for position, alias in ((0, "pred"), (1, "target")):
                if position >= len(names) or names[position] not in shape.differentiable:
                    continue
                leaves = _leaf_tensors(alias, arguments.get(names[position]))
                self.leaves.extend(_Leaf(index, key, tensor) for key, tensor in leaves)
                if leaves:
                    requested.append(alias)
        message.gradients.extend(requested or ["none"])
        return pred.device

    @staticmethod
    def _encode_extras(module: RemoteLoss, arguments: Mapping[str, Any], message: pb.LossTerm) -> None:
        """Session, sampler seed and labels: what the term needs beyond mmdet's forward arguments."""
        if module.session:
            message.session = module.session
            message.forward_id = uuid.uuid4().hex  # a retried call is recognised, not applied twice
        if "sampler" in module.cfg or module.info.stochastic:
            seed = module.seed
            if seed is None:  # from the caller's global generator: torch.manual_seed reproduces a run
                seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
            message.seed = seed
            if arguments.get(SAMPLE_LABELS) is not None:
                codec.encode_tensor(arguments[SAMPLE_LABELS], message.sample_labels)
            if arguments.get(SAMPLE_GROUPS) is not None:
                codec.encode_tensor(arguments[SAMPLE_GROUPS], message.sample_groups)

    def run(self) -> list[Tensor]:
        """Evaluate; returns every output tensor, term by term and part by part (see ``outputs``)."""
        response, self.streamed = self.client.evaluate_tensors(self.request, self.timeout, sink=self.sink)
        self.results = list(response.results)
        self.timings = response.timings
        self.outputs: list[_Output] = []
        self.structures: list[str] = []
        tensors = []
        for index, result in enumerate(self.results):
            self.structures.append(result.structure or "tensor")
            if self.structures[-1] == "tensor":
                items = [("", result.loss, f"results[{index}].loss")]
            else:
                items = [
                    (part.key, part.loss, f"results[{index}].parts[{j}].loss") for j, part in enumerate(result.parts)
                ]
            for key, message, path in items:
                self.outputs.append(_Output(index, key))
                loss = codec.decode_tensor(message, path, streamed=self.streamed)
                tensors.append(loss.to(self.devices[index]))
        for (_, bound), result in zip(self.terms, self.results, strict=True):
            bound.loss.last_timings = self.timings
            if result.session_step:
                bound.loss.last_session_step = result.session_step
        if all(r.separable for r in self.results):
            self.request = self.sink = None  # backward needs no resend: free the encoded inputs
        elif self.sink is not None:
            self.sink.inline()  # a resend copies the request's terms: they need their data
        return tensors

    def regroup(self, tensors: Sequence[Tensor]) -> list[Any]:
        """The flat outputs back into one value per term: a tensor, a tuple or a dict."""
        grouped: list[list[tuple[str, Tensor]]] = [[] for _ in self.results]
        for output, tensor in zip(self.outputs, tensors, strict=True):
            grouped[output.term].append((output.key, tensor))
        values = []
        for structure, items in zip(self.structures, grouped, strict=True):
            if structure == "tuple":
                values.append(tuple(t for _, t in items))
            elif structure == "dict":
                values.append(dict(items))
            else:
                values.append(items[0][1])
        return values

    def _gradient(
        self, gradients: Mapping[str, pb.Tensor], leaf: _Leaf, where: str, path: str, streamed: Mapping[str, Tensor]
    ) -> tuple[Tensor, str | None]:
        """The gradient the server sent for ``leaf``, and its field path when its memory is this
        plan's alone and writable (it came in chunks or through shared memory), else None (a view
        of the response's immutable bytes)."""
        if leaf.key not in gradients:
            raise RemoteLossError(
                grpc.StatusCode.INTERNAL, f"the server returned no gradient for {leaf.key!r} of {where}"
            )
        field = f"{path}.gradients[{leaf.key}]"
        tensor = codec.decode_tensor(gradients[leaf.key], field, streamed=streamed)
        owned = field in streamed or tensor.device != leaf.tensor.device
        return tensor.to(leaf.tensor.device), field if owned else None

    def _lend(self, local: Tensor, field: str | None, upstream: Tensor, leaf: Tensor) -> Tensor | None:
        """``local`` itself as the leaf's gradient when the upstream gradient is exactly 1 (the usual
        ``loss.backward()``) and its memory is ours: no pass over a gradient of hundreds of MiB, no
        fresh pages. Autograd may keep it as ``.grad`` and add to it in place, so it is lent once;
        a later backward through the same forward (retain_graph=True) multiplies a copy, and refuses
        if the lent tensor was changed meanwhile (its values are gone)."""
        if field is None or local.dtype != leaf.dtype:
            return None
        lent = self.lent.get(field)
        if lent is not None:
            if lent[0]._version != lent[1]:
                raise RuntimeError(
                    f"losswire: a second backward through one RemoteLoss forward (retain_graph=True) needs "
                    f"{field}, which the first backward handed to autograd without a copy and which was changed "
                    "since (accumulated into .grad); use LossClient(stream_threshold=None, shared_memory='off') "
                    "for repeated backward passes"
                )
            return None
        if upstream.dim() != 0 or upstream.device.type != "cpu" or upstream.item() != 1.0:
            return None
        self.lent[field] = (local, local._version)
        # a tensor object of its own (same memory, same version counter): autograd keeps a gradient
        # as .grad without copying it only when nothing else references that object
        return local.detach()

    def _part_gradients(self, output: _Output) -> tuple[Mapping[str, pb.Tensor], str]:
        """The gradients of one output and their path in the response (for streamed tensors)."""
        result = self.results[output.term]
        if self.structures[output.term] == "tensor":
            return result.gradients, f"results[{output.term}]"
        j, part = next((j, p) for j, p in enumerate(result.parts) if p.key == output.key)
        return part.gradients, f"results[{output.term}].parts[{j}]"

    def vjp(self, grad_outputs: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Gradients of every leaf for the upstream gradients of every output tensor."""
        resent = self._resend(grad_outputs)
        grads: list[Tensor | None] = [None] * len(self.leaves)
        for i, leaf in enumerate(self.leaves):
            if leaf.term in resent:
                result = resent[leaf.term]
                grads[i] = self._gradient(result.gradients, leaf, f"term {result.name!r}", "", {})[0]
                continue
            result = self.results[leaf.term]
            for output, upstream in zip(self.outputs, grad_outputs, strict=True):
                if output.term != leaf.term or upstream is None:
                    continue
                gradients, path = self._part_gradients(output)
                where = f"term {result.name!r} part {output.key!r}"
                local, field = self._gradient(gradients, leaf, where, path, self.streamed)
                contribution = self._lend(local, field, upstream, leaf.tensor)
                if contribution is None:
                    upstream = upstream.to(local.dtype)
                    # a per-sample loss reduced one axis or several ([N, H, W] masks -> [N]): size-1 axes
                    # at sample_axis until the ranks match, so the upstream gradient broadcasts per sample
                    while upstream.dim() and upstream.dim() < local.dim():
                        upstream = upstream.unsqueeze(result.sample_axis)
                    contribution = (upstream * local).to(leaf.tensor.dtype)
                grads[i] = contribution if grads[i] is None else grads[i] + contribution
        return grads

    def _resend(self, grad_outputs: Sequence[Tensor | None]) -> dict[int, pb.TermResult]:
        """Non-separable terms: evaluate again with the upstream gradients (an exact VJP). A session
        term replays the state its forward saw (``replay_step``), so the state is not updated twice."""
        todo = [
            i
            for i, result in enumerate(self.results)
            if not result.separable
            and any(leaf.term == i for leaf in self.leaves)
            and any(g is not None for o, g in zip(self.outputs, grad_outputs, strict=True) if o.term == i)
        ]
        if not todo:
            return {}
        request = pb.EvaluateRequest()
        for i in todo:
            term = request.terms.add()
            term.CopyFrom(self.request.terms[i])
            term.ClearField("forward_id")
            if self.results[i].session_step:
                term.replay_step = self.results[i].session_step
            for output, upstream in zip(self.outputs, grad_outputs, strict=True):
                if output.term != i or upstream is None:
                    continue
                target = term.grad_output if self.structures[i] == "tensor" else term.grad_outputs[output.key]
                codec.encode_tensor(upstream, target)
        response = self.client.evaluate(request, self.timeout)
        return dict(zip(todo, response.results, strict=True))


def _is_tensor_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Tensor) for v in value)


class _RemoteEvaluate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: _Plan, *leaf_tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.plan = plan
        return tuple(plan.run())

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *ctx.plan.vjp(grad_outputs))


def evaluate_terms(
    terms: Mapping[str, BoundTerm | tuple[RemoteLoss, Sequence[Any], Mapping[str, Any]]],
    *,
    client: LossClient | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Evaluate several named loss terms in one round trip; returns {name: differentiable loss}.

    A round trip whose tensors reach the client's ``stream_threshold`` goes by EvaluateStream, big
    tensors in chunks, without copying them into the request first. Each term's tensors travel at
    its module's ``transfer_dtype`` (else the client's); the answer too when every term agrees.

    losses = evaluate_terms({
        "loss_cls": (loss_cls, (cls_score, labels), {"avg_factor": num_pos}),
        "loss_bbox": (loss_bbox, (bbox_pred, bbox_targets, bbox_weights), {}),
    })
    sum(losses.values()).backward()

    A term whose loss returns a tuple or a dict gives a tuple or dict of tensors.
    """
    bound_terms = []
    for name, term in terms.items():
        if not isinstance(term, BoundTerm):
            module, args, kwargs = term
            term = module.bind(*args, **dict(kwargs))
        bound_terms.append((name, term))
    clients = {id(t.loss.client): t.loss.client for _, t in bound_terms}
    if client is None:
        if len(clients) != 1:
            raise ValueError("evaluate_terms: every RemoteLoss of one call must share one client (target)")
        client = next(iter(clients.values()))
    plan = _Plan(bound_terms, client, timeout)
    tensors = _RemoteEvaluate.apply(plan, *(leaf.tensor for leaf in plan.leaves))
    return dict(zip(plan.names, plan.regroup(tensors), strict=True))


def build_loss(cfg: Mapping[str, Any], target: Target = DEFAULT_TARGET, **kwargs: Any) -> RemoteLoss:
    """Mirror of mmdet's ``build_loss``: a RemoteLoss for ``cfg`` served by ``target``."""
    return RemoteLoss(cfg, target, **kwargs)
