"""``RemoteLoss``: an nn.Module whose forward and backward are evaluated by a losswire server.

    loss_fn = RemoteLoss(dict(type='FocalLoss', gamma=2.0), target='localhost:50051')
    loss = loss_fn(pred, labels, avg_factor=num_pos)
    loss.backward()                      # pred.grad arrives from the server

The forward takes exactly the arguments of the MMDetection module for ``cfg['type']`` (the
server's description of that loss defines the signature). One round trip returns the loss and
its gradient; ``backward`` applies the upstream gradient locally when the loss is separable
(every built-in loss is) and otherwise sends it back for an exact recompute.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import torch
from torch import Tensor, nn

from losswire.v1 import loss_service_pb2 as pb

from . import codec
from .channel import DEFAULT_TARGET, LossClient
from .errors import RemoteLossError

_NAMED_FIELDS = ("weight", "avg_factor", "reduction_override")


def _signature(info: pb.LossInfo) -> inspect.Signature:
    parameters = [
        inspect.Parameter(
            item.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=codec.python_value(item.default) if item.optional else inspect.Parameter.empty,
        )
        for item in info.inputs
    ]
    return inspect.Signature(parameters)


class RemoteLoss(nn.Module):
    """A loss evaluated by a losswire server, used like the local MMDetection module.

    Args:
        cfg: the mmdet config dict, e.g. ``dict(type='GIoULoss', loss_weight=2.0)``.
        target: the server address (``host:port``, or a gRPC name such as ``dns:///losswire:50051``).
        timeout: deadline of each call in seconds (None: the client's default).
        client: an existing ``LossClient`` to share (default: one shared client per target).
        validate: check the config with the server now, so mistakes surface at construction.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        client: LossClient | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.client = client or LossClient.shared(target)
        self.timeout = timeout
        self._info: pb.LossInfo | None = None
        self._forward_signature: inspect.Signature | None = None
        if validate:
            self.info  # noqa: B018 - the Describe call validates the config

    def __getstate__(self) -> dict[str, Any]:
        # Channels do not pickle or deep-copy (mmengine deep-copies configs and modules): keep the
        # target and reconnect through the shared client on the other side.
        state = self.__dict__.copy()
        state["client"] = self.client.target
        state["_info"] = None if self._info is None else self._info.SerializeToString()
        state["_forward_signature"] = None  # rebuilt from _info on first use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        target, info = state["client"], state["_info"]
        state = {**state, "client": LossClient.shared(target), "_info": None}
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
        return f"cfg={self.cfg!r}, target={self.client.target!r}"

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        term = self.bind(*args, **kwargs)
        return evaluate_terms({"": term}, client=self.client, timeout=self.timeout)[""]

    def bind(self, *args: Any, **kwargs: Any) -> BoundTerm:
        """Bind forward arguments as mmdet's module would (a TypeError for a wrong call)."""
        if self._forward_signature is None:  # built once, not on every forward
            self._forward_signature = _signature(self.info)
        bound = self._forward_signature.bind(*args, **kwargs)
        return BoundTerm(self, dict(bound.arguments))


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


class _Plan:
    """One Evaluate round trip for several terms, and what backward needs afterwards."""

    def __init__(self, terms: Sequence[tuple[str, BoundTerm]], client: LossClient, timeout: float | None):
        self.client, self.timeout = client, timeout
        self.names = [name for name, _ in terms]
        self.request = pb.EvaluateRequest()
        self.leaves: list[_Leaf] = []
        self.devices: list[torch.device] = []
        grad_enabled = torch.is_grad_enabled()
        for index, (name, bound) in enumerate(terms):
            message = self.request.terms.add(name=name)
            self.devices.append(self._encode_term(bound, message, index, grad_enabled))

    def _encode_term(self, bound: BoundTerm, message: pb.LossTerm, index: int, grad_enabled: bool) -> torch.device:
        info, arguments = bound.loss.info, bound.arguments
        names = [item.name for item in info.inputs]
        codec.encode_config(bound.loss.cfg, message.config)
        pred = arguments.get(names[0])
        if not isinstance(pred, Tensor):
            raise TypeError(f"{info.name}: {names[0]} must be a tensor, got {type(pred).__name__}")
        codec.encode_tensor(pred, message.pred)
        requested = []
        for position, name in enumerate(names):
            value = arguments.get(name)
            if value is None or position == 0:
                continue
            if position == 1:
                codec.encode_value(tuple(value) if isinstance(value, list) else value, message.target)
            elif name == "weight":
                codec.encode_tensor(value, message.weight)
            elif name == "avg_factor":
                message.avg_factor = float(value)
            elif name == "reduction_override":
                message.reduction_override = value
            else:
                codec.encode_value(value, message.inputs[name])
        if grad_enabled:
            for position, alias in ((0, "pred"), (1, "target")):
                if position >= len(names) or names[position] not in info.differentiable:
                    continue
                leaves = _leaf_tensors(alias, arguments.get(names[position]))
                self.leaves.extend(_Leaf(index, key, tensor) for key, tensor in leaves)
                if leaves:
                    requested.append(alias)
        message.gradients.extend(requested or ["none"])
        return pred.device

    def run(self) -> list[Tensor]:
        response = self.client.evaluate(self.request, self.timeout)
        self.results = list(response.results)
        self.timings = response.timings
        losses = [
            codec.decode_tensor(result.loss, f"results[{i}].loss").to(self.devices[i])
            for i, result in enumerate(self.results)
        ]
        self.loss_shapes = [loss.shape for loss in losses]
        if all(r.separable for r in self.results):
            self.request = None  # backward needs no resend: free the encoded inputs
        return losses

    def _gradient(self, result: pb.TermResult, leaf: _Leaf, field: str) -> Tensor:
        if leaf.key not in result.gradients:
            raise RemoteLossError(
                grpc.StatusCode.INTERNAL, f"the server returned no gradient for {leaf.key!r} of term {result.name!r}"
            )
        return codec.decode_tensor(result.gradients[leaf.key], field).to(leaf.tensor.device)

    def vjp(self, grad_outputs: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Gradients of every leaf for the upstream gradients of every term's loss."""
        resent = self._resend(grad_outputs)
        grads: list[Tensor | None] = []
        for leaf in self.leaves:
            upstream = grad_outputs[leaf.term]
            if upstream is None:
                grads.append(None)
                continue
            if leaf.term in resent:
                result = resent[leaf.term]
                grads.append(self._gradient(result, leaf, f"{result.name}.gradients[{leaf.key}]"))
                continue
            result = self.results[leaf.term]
            local = self._gradient(result, leaf, f"{result.name}.gradients[{leaf.key}]")
            upstream = upstream.to(local.dtype)
            if upstream.dim() and local.shape != upstream.shape:
                upstream = upstream.unsqueeze(result.sample_axis)
            grads.append((upstream * local).to(leaf.tensor.dtype))
        return grads

    def _resend(self, grad_outputs: Sequence[Tensor | None]) -> dict[int, pb.TermResult]:
        """Non-separable terms: evaluate again with the upstream gradient (an exact VJP)."""
        todo = [
            i
            for i, result in enumerate(self.results)
            if not result.separable and grad_outputs[i] is not None and any(leaf.term == i for leaf in self.leaves)
        ]
        if not todo:
            return {}
        request = pb.EvaluateRequest()
        for i in todo:
            term = request.terms.add()
            term.CopyFrom(self.request.terms[i])
            codec.encode_tensor(grad_outputs[i], term.grad_output)
        response = self.client.evaluate(request, self.timeout)
        return dict(zip(todo, response.results, strict=True))


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
) -> dict[str, Tensor]:
    """Evaluate several named loss terms in one round trip; returns {name: differentiable loss}.

    losses = evaluate_terms({
        "loss_cls": (loss_cls, (cls_score, labels), {"avg_factor": num_pos}),
        "loss_bbox": (loss_bbox, (bbox_pred, bbox_targets, bbox_weights), {}),
    })
    sum(losses.values()).backward()
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
    losses = _RemoteEvaluate.apply(plan, *(leaf.tensor for leaf in plan.leaves))
    return dict(zip(plan.names, losses, strict=True))


def build_loss(cfg: Mapping[str, Any], target: str = DEFAULT_TARGET, **kwargs: Any) -> RemoteLoss:
    """Mirror of mmdet's ``build_loss``: a RemoteLoss for ``cfg`` served by ``target``."""
    return RemoteLoss(cfg, target, **kwargs)
