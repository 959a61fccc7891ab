"""The autograd round trip: one Evaluate for several terms in forward, their gradients in backward.

Forward sends every term (``terms.encode_term``) in one request and returns the losses. The answer
already holds each loss's gradient for every input that requires grad, so backward multiplies them
by the upstream gradient locally when the loss is separable (every built-in loss is); otherwise it
sends the upstream gradient back for an exact recompute (``grad_output``; a session term replays the
state its forward saw).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import torch
from torch import Tensor

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec

from .answers import malformed
from .client import LossClient
from .errors import RemoteLossError
from .terms import BoundTerm, Leaf, TermLoss, encode_term

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclasses.dataclass
class _Output:
    term: int  # index of the term
    key: str  # the part's key ("" for a single-tensor loss)


class RoundTrip:
    """One Evaluate round trip for several terms, and what backward needs afterwards."""

    def __init__(self, terms: Sequence[tuple[str, BoundTerm]], client: LossClient, timeout: float | None):
        self.client, self.timeout = client, timeout
        self.names = [name for name, _ in terms]
        self.terms = list(terms)
        self.request = pb.EvaluateRequest()
        self.leaves: list[Leaf] = []
        self.devices: list[torch.device] = []
        # big tensors are not copied into the request: if it is big enough to stream, their chunks
        # are cut straight from their memory
        holds_back = client.stream_threshold is not None or client.shared_memory_threshold is not None
        self.sink = chunks.StreamSink() if holds_back else None
        self.streamed: dict[str, Tensor] = {}
        self.lent: dict[str, tuple[Tensor, int]] = {}  # gradients handed to autograd as they are (see _lend)
        self.resent: set[int] = set()  # the terms the latest backward had the server recompute (see _resend)
        transfers = [codec.transfer_dtype_of(bound.loss.transfer_dtype or client.transfer_dtype) for _, bound in terms]
        if transfers and all(t == transfers[0] for t in transfers):
            self.request.transfer_dtype = transfers[0]  # the answer travels narrowed too
        grad_enabled = torch.is_grad_enabled()
        for index, (name, bound) in enumerate(terms):
            # the module's description checks its answer's loss shape (loss_shapes), where the client has none
            # of its own (an unpickled module, or one of another client)
            client.descriptions.note(bound.loss.info, replace=False)
            message = self.request.terms.add(name=name)
            self.leaves += encode_term(
                bound,
                message,
                index,
                grad_enabled=grad_enabled,
                transfer=transfers[index],
                sink=self.sink,
                allocate=client.buffers.take,
            )
            self.devices.append(bound.arguments[bound.loss.call_shape().names[0]].device)

    def run(self) -> list[Tensor]:
        """Evaluate; returns every output tensor, term by term and part by part (see ``outputs``)."""
        response, self.streamed = self.client.evaluate_tensors(self.request, self.timeout, sink=self.sink)
        self.results = list(response.results)
        for (_, bound), result in zip(self.terms, self.results, strict=True):
            bound.loss.accept_answer(response, result)  # refuses another implementation than pinned
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
                loss = _decoded(message, path, streamed=self.streamed)
                tensors.append(loss.to(self.devices[index]))
        # a term whose every gradient combines with any upstream gradient by the separable rule needs no
        # resend in backward; another (a weight of shape [N, 1] on an [N, 4] loss) is recomputed exactly
        self.local = [self._rule_holds(index, result) for index, result in enumerate(self.results)]
        if all(self.local):
            self.request = self.sink = None  # backward needs no resend: free the encoded inputs
        elif self.sink is not None:
            self.sink.inline()  # a resend copies the request's terms: they need their data
        return tensors

    def _rule_holds(self, index: int, result: pb.TermResult) -> bool:
        """Whether the separable rule gives every gradient of term ``index`` for any upstream gradient."""
        if not result.separable:
            return False
        parts = [result] if (result.structure or "tensor") == "tensor" else list(result.parts)
        keys = [leaf.key for leaf in self.leaves if leaf.term == index]
        return all(
            key not in part.gradients or _broadcasts(part.loss.shape, part.gradients[key].shape, result.sample_axis)
            for part in parts
            for key in keys
        )

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

    def second_order_inputs(self, grad_outputs: Sequence[Tensor | None]) -> list[Tensor]:
        """What the gradients of the latest backward depend on beyond what autograd sees: every input of the
        loss, and the upstream gradients of the terms recomputed by the server (their gradients came back as
        numbers, not as ``upstream * local``)."""
        upstreams = [
            upstream
            for output, upstream in zip(self.outputs, grad_outputs, strict=True)
            if upstream is not None and upstream.requires_grad and output.term in self.resent
        ]
        return [leaf.tensor for leaf in self.leaves] + upstreams

    def loss_names(self) -> str:
        """The loss types of this round trip's terms, for messages: "FocalLoss, GIoULoss"."""
        return ", ".join(dict.fromkeys(str(bound.loss.cfg.get("type")) for _, bound in self.terms))

    # -- backward --------------------------------------------------------------------------------------

    def vjp(self, grad_outputs: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Gradients of every leaf for the upstream gradients of every output tensor."""
        resent = self._resend(grad_outputs)
        self.resent = set(resent)
        grads: list[Tensor | None] = [None] * len(self.leaves)
        for i, leaf in enumerate(self.leaves):
            if leaf.term in resent:
                result = resent[leaf.term]
                if leaf.key not in result.constant:  # else: no gradient, as autograd gives a detached input
                    grads[i] = self._gradient(result.gradients, leaf, f"term {result.name!r}", "", {})[0]
                continue
            result = self.results[leaf.term]
            for output, upstream in zip(self.outputs, grad_outputs, strict=True):
                if output.term != leaf.term or upstream is None:
                    continue
                gradients, path, constant = self._part_gradients(output)
                if leaf.key in constant:
                    continue
                where = f"term {result.name!r} part {output.key!r}"
                local, field = self._gradient(gradients, leaf, where, path, self.streamed)
                contribution = self._lend(local, field, upstream, leaf.tensor)
                if contribution is None:
                    contribution = _separable_product(upstream, local, result.sample_axis).to(leaf.tensor.dtype)
                grads[i] = contribution if grads[i] is None else grads[i] + contribution
        return grads

    def _gradient(
        self, gradients: Mapping[str, pb.Tensor], leaf: Leaf, where: str, path: str, streamed: Mapping[str, Tensor]
    ) -> tuple[Tensor, str | None]:
        """The gradient the server sent for ``leaf``, and its field path when its memory is this
        round trip's alone and writable (it came in chunks or through shared memory), else None (a view
        of the response's immutable bytes)."""
        if leaf.key not in gradients:
            raise RemoteLossError(
                grpc.StatusCode.INTERNAL, f"the server returned no gradient for {leaf.key!r} of {where}"
            )
        field = f"{path}.gradients[{leaf.key}]"
        message = gradients[leaf.key]
        tensor = _decoded(message, field, streamed=streamed, allocate=self.client.buffers.take)
        # a gradient that travelled narrowed was widened into memory of its own
        owned = field in streamed or tensor.device != leaf.tensor.device or message.data_dtype != pb.DTYPE_UNSPECIFIED
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
        # an upstream 1 that requires grad (create_graph=True) must stay a factor: its derivative is wanted
        if upstream.requires_grad or upstream.dim() != 0 or upstream.device.type != "cpu" or upstream.item() != 1.0:
            return None
        self.lent[field] = (local, local._version)
        # a tensor object of its own (same memory, same version counter): autograd keeps a gradient
        # as .grad without copying it only when nothing else references that object
        return local.detach()

    def _part_gradients(self, output: _Output) -> tuple[Mapping[str, pb.Tensor], str, Sequence[str]]:
        """The gradients of one output, their path in the response (for streamed tensors), and the keys of
        those of inputs it does not depend on."""
        result = self.results[output.term]
        if self.structures[output.term] == "tensor":
            return result.gradients, f"results[{output.term}]", result.constant
        j, part = next((j, p) for j, p in enumerate(result.parts) if p.key == output.key)
        return part.gradients, f"results[{output.term}].parts[{j}]", part.constant

    def _resend(self, grad_outputs: Sequence[Tensor | None]) -> dict[int, pb.TermResult]:
        """Non-separable terms: evaluate again with the upstream gradients (an exact VJP). A session
        term replays the state its forward saw (``replay_step``), so the state is not updated twice."""
        todo = [
            i
            for i in range(len(self.results))
            if not self.local[i]
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
        for i, result in zip(todo, response.results, strict=True):
            self.terms[i][1].loss.accept_answer(response, result, forward=False)
        return dict(zip(todo, response.results, strict=True))


def _decoded(message: pb.Tensor, path: str, **options: Any) -> Tensor:
    """``codec.decode_tensor`` of an answer's tensor: one inconsistent with itself (its data's length
    against its shape) is the server's fault, DATA_LOSS (``answers.check_answer`` has checked the rest)."""
    try:
        return codec.decode_tensor(message, path, **options)
    except codec.CodecError as error:
        raise malformed(str(error), path) from None


def _separable_product(upstream: Tensor, local: Tensor, sample_axis: int) -> Tensor:
    """The separable rule (``TermResult.separable``): the upstream gradient times the loss's gradient,
    with size-1 axes inserted at ``sample_axis`` until the ranks match, so a per-sample loss's
    upstream gradient ([N]) broadcasts over each sample's elements ([N, C], or [N, H, W] masks)."""
    upstream = upstream.to(local.dtype)
    while upstream.dim() and upstream.dim() < local.dim():
        upstream = upstream.unsqueeze(sample_axis)
    return upstream * local


def _broadcasts(loss_shape: Sequence[int], gradient_shape: Sequence[int], sample_axis: int) -> bool:
    """Whether an upstream gradient of ``loss_shape``, given size-1 axes at ``sample_axis`` as
    :func:`_separable_product` does, multiplies a gradient of ``gradient_shape`` into its own shape:
    every gradient element then belongs to one loss element (or one sample)."""
    upstream = list(loss_shape)
    if not upstream:
        return True  # a 0-d loss: any gradient scales
    if len(upstream) < len(gradient_shape) and not -len(upstream) - 1 <= sample_axis <= len(upstream):
        return False  # no axis to insert there: recomputed exactly instead
    while len(upstream) < len(gradient_shape):
        axis = sample_axis if sample_axis >= 0 else sample_axis + len(upstream) + 1
        upstream.insert(axis, 1)
    try:
        return tuple(torch.broadcast_shapes(tuple(upstream), tuple(gradient_shape))) == tuple(gradient_shape)
    except RuntimeError:
        return False


class _RemoteEvaluate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: RoundTrip, *leaf_tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.plan = plan
        return tuple(plan.run())

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        plan: RoundTrip = ctx.plan
        grads = plan.vjp(grad_outputs)
        if torch.is_grad_enabled():  # backward(create_graph=True): autograd may differentiate these again
            grads = _first_order_only(grads, plan.second_order_inputs(grad_outputs), plan.loss_names())
        return (None, *grads)


def _first_order_only(grads: list[Tensor | None], inputs: Sequence[Tensor], losses: str) -> list[Tensor | None]:
    """The server's gradients, for a graph that will be differentiated again (``create_graph=True``).

    The server sends first derivatives only: ``grad`` is a constant here, except through the upstream
    gradient (``upstream * local``, whose derivative in the upstream's own inputs is right). Left as it
    is, a gradient penalty ``(grad ** 2).sum().backward()`` would silently miss every second derivative
    in the loss's inputs (pred.grad None where the local module gives one). So each gradient gets a zero
    term that depends on those inputs (``inputs``: and on the upstream gradient of a term the server
    recomputed, whose gradient came back as numbers) and whose backward raises: autograd runs it exactly
    when a derivative in them is asked for, never for the first-order values."""
    if not inputs:
        return grads
    marked = []
    for grad in grads:
        if grad is not None:
            grad = grad + _NoSecondDerivative.apply(losses, grad.dtype, grad.device, *inputs)
        marked.append(grad)
    return marked


class _NoSecondDerivative(torch.autograd.Function):
    """A zero whose derivative in ``inputs`` raises, naming the losses. The gradient it is added to is no
    input of it: a derivative in the upstream gradient's own inputs does not pass through here."""

    @staticmethod
    def forward(ctx: Any, losses: str, dtype: torch.dtype, device: torch.device, *inputs: Tensor) -> Tensor:
        ctx.losses = losses
        return torch.zeros((), dtype=dtype, device=device)

    @staticmethod
    def backward(ctx: Any, *_: Tensor) -> tuple[Tensor | None, ...]:
        raise RuntimeError(
            f"losswire: a second derivative of {ctx.losses} was asked for (backward of a gradient taken with "
            "create_graph=True: a gradient penalty, a Hessian, meta-learning), but the server computes first "
            "derivatives only; the remote gradient cannot be differentiated again. Compute that term with a local "
            "loss module"
        )


def eager_under_compile(fn: _F) -> _F:
    """``fn``, run eagerly when torch.compile traces a caller: dynamo cannot trace a gRPC call (it failed inside
    the codec with an InternalTorchDynamoError), so a RemoteLoss call becomes a graph break, as an opaque
    Python call would. Not ``torch.compiler.disable`` at import: that imports torch._dynamo, two seconds of a
    thin client's start-up; this asks for it only while compiling, when it is loaded anyway."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        eager = getattr(fn, "_losswire_eager", None)
        if eager is None:
            eager = fn._losswire_eager = torch.compiler.disable(fn)  # type: ignore[attr-defined]
        return eager(*args, **kwargs)

    return call  # type: ignore[return-value]


@eager_under_compile
def evaluate_terms(
    terms: Mapping[str, BoundTerm | tuple[TermLoss, Sequence[Any], Mapping[str, Any] | None]],
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

    A term whose loss returns a tuple or a dict gives a tuple or dict of tensors; ``(module, args)``
    and ``(module, args, None)`` stand for no keyword arguments; no terms, no call (``{}``).
    """
    _refuse_functorch()
    if not isinstance(terms, Mapping):
        expected = "a dict {name: (remote_loss, args, kwargs)}"
        raise TypeError(f"evaluate_terms: terms must be {expected}; got {_kind(terms)}")
    bound_terms = [(name, _bound(name, term)) for name, term in terms.items()]
    if not bound_terms:
        return {}
    clients = {id(t.loss.client): t.loss.client for _, t in bound_terms}
    if client is None:
        if len(clients) != 1:
            raise ValueError("evaluate_terms: every RemoteLoss of one call must share one client (target)")
        client = next(iter(clients.values()))
    plan = RoundTrip(bound_terms, client, timeout)
    tensors = _RemoteEvaluate.apply(plan, *(leaf.tensor for leaf in plan.leaves))
    return dict(zip(plan.names, plan.regroup(tensors), strict=True))


def _bound(name: str, term: Any) -> BoundTerm:
    """One entry of ``evaluate_terms``: a BoundTerm, or (module, args[, kwargs]) bound as its forward would."""
    if isinstance(term, BoundTerm):
        return term
    if isinstance(term, (tuple, list)) and len(term) in (2, 3) and hasattr(term[0], "bind"):
        module, args, kwargs = (*term, None) if len(term) == 2 else term
        if isinstance(args, (tuple, list)) and (kwargs is None or isinstance(kwargs, Mapping)):
            return module.bind(*args, **dict(kwargs or {}))
    raise TypeError(
        f"evaluate_terms: term {name!r} must be (remote_loss, args, kwargs), e.g. (loss_cls, (cls_score, labels), "
        f"{{'avg_factor': 4.0}}), or remote_loss.bind(...); got {_kind(term)}"
    )


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _refuse_functorch() -> None:
    """Under torch.func transforms (grad, vmap, jacrev...) the inputs are functorch's wrapped tensors, which
    have no memory to send: say so, instead of torch's "Cannot access data pointer of Tensor that doesn't have
    storage" from deep inside the encoder."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # no public query in torch
    if active is not None and active():
        raise RuntimeError(
            "losswire: a RemoteLoss cannot be called under torch.func transforms (torch.func.grad, vmap, jacrev, "
            "functional_call inside them...): the server computes on the tensors' values, which those transforms "
            "hide. Call it outside them and take gradients with loss.backward() or torch.autograd.grad"
        )
