"""Where a request enters: the thin LossService servicer.

validate -> decode (``losswire.client.codec``) -> evaluate (``evaluate.Evaluator``, no gRPC) ->
encode. Every failure leaves through ``status.to_status``; no exception escapes as UNKNOWN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import torch

from losswire.client import codec
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc

from . import __version__
from .evaluate import Evaluator, TermOutcome, TermRequest
from .losses import LOSSES, LossDescription, Registry, output_kind_of
from .status import RequestError, to_status

log = logging.getLogger("losswire.server")


def _term_label(index: int, name: str) -> str:
    return f"terms[{index}]" + (f" ({name})" if name else "")


class LossService(pb_grpc.LossServiceServicer):
    """Evaluates loss terms on ``device`` with the losses of ``registry``."""

    def __init__(self, device: torch.device, registry: Registry = LOSSES, max_elements: int | None = None) -> None:
        self.device = device
        self.registry = registry
        self.max_elements = max_elements
        self.evaluator = Evaluator(registry)

    # -- Evaluate --------------------------------------------------------------------------------

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:  # noqa: N802
        started = time.perf_counter()
        where, term_path = "", ""
        try:
            names = self._check_terms(request.terms)
            terms = []
            for index, (message, name) in enumerate(zip(request.terms, names, strict=True)):
                where, term_path = _term_label(index, message.name), f"terms[{index}]."
                terms.append(self._decode_term(message, name, f"terms[{index}]"))
            decoded = time.perf_counter()
            outcomes = []
            for index, term in enumerate(terms):
                where, term_path = _term_label(index, term.name), f"terms[{index}]."
                outcomes.append(self.evaluator.evaluate(term))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            computed = time.perf_counter()
            where, term_path = "", ""
            response = pb.EvaluateResponse(device=str(self.device))
            for outcome in outcomes:
                self._encode_outcome(outcome, response.results.add())
            encoded = time.perf_counter()
        except Exception as error:
            self._abort(context, error, where, term_path)
        timings = response.timings
        timings.decode_ms = (decoded - started) * 1e3
        timings.compute_ms = (computed - decoded) * 1e3
        timings.encode_ms = (encoded - computed) * 1e3
        log.debug(
            "Evaluate %s: decode %.2f ms, compute %.2f ms, encode %.2f ms",
            ",".join(t.config.get("type", "?") for t in terms),
            timings.decode_ms,
            timings.compute_ms,
            timings.encode_ms,
        )
        return response

    @staticmethod
    def _check_terms(terms: Iterable[pb.LossTerm]) -> list[str]:
        names = [t.name for t in terms]
        if not names:
            raise RequestError("the request has no terms; send at least one LossTerm", field="terms")
        if len(names) > 1:
            for index, name in enumerate(names):
                if not name:
                    raise RequestError(
                        f"terms[{index}].name is empty; name every term of a multi-term request",
                        field=f"terms[{index}].name",
                    )
                if names.index(name) != index:
                    raise RequestError(
                        f"terms[{index}].name {name!r} repeats terms[{names.index(name)}]", field=f"terms[{index}].name"
                    )
        return names

    def _decode_term(self, message: pb.LossTerm, name: str, field: str) -> TermRequest:
        device, limit = self.device, self.max_elements
        config = codec.decode_config(message.config)
        if not config:
            raise RequestError(f'{field}.config is empty; send {{"type": "<loss name>", ...}}', field=f"{field}.config")
        if not message.HasField("pred"):
            raise RequestError(
                f"{field}.pred is missing; every term needs its prediction tensor", field=f"{field}.pred"
            )

        def optional(name: str, decode: Callable[..., Any] | None = None) -> Any:
            """The decoded field, or None when the caller did not send it."""
            if not message.HasField(name):
                return None
            value = getattr(message, name)
            return value if decode is None else decode(value, f"{field}.{name}", device, limit)

        return TermRequest(
            name=name,
            config=config,
            pred=codec.decode_tensor(message.pred, f"{field}.pred", device, limit),
            target=optional("target", codec.decode_value),
            weight=optional("weight", codec.decode_tensor),
            avg_factor=optional("avg_factor"),
            reduction_override=optional("reduction_override"),
            inputs={k: codec.decode_value(v, f"{field}.inputs[{k}]", device, limit) for k, v in message.inputs.items()},
            gradients=list(message.gradients) or ["pred"],
            grad_output=optional("grad_output", codec.decode_tensor),
        )

    @staticmethod
    def _encode_outcome(outcome: TermOutcome, out: pb.TermResult) -> None:
        out.name = outcome.name
        codec.encode_tensor(outcome.loss, out.loss)
        for key, grad in outcome.gradients.items():
            codec.encode_tensor(grad, out.gradients[key])
        out.output = outcome.output.value
        out.separable = outcome.separable
        out.sample_axis = outcome.sample_axis

    @staticmethod
    def _abort(context: grpc.ServicerContext, error: Exception, where: str, term_path: str) -> None:
        status = to_status(error, where, term_path)
        if status.code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", where or "Evaluate")
        else:
            log.debug("refused: %s", status.details)
        context.abort_with_status(status)

    # -- Describe / ListLosses -------------------------------------------------------------------

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:  # noqa: N802
        try:
            config = self.registry.normalise(codec.decode_config(request.config))
            module = self.registry.build(config)
            description = self.registry.describe(config["type"])
            response = pb.DescribeResponse(output=output_kind_of(module, description).value)
            describe(description, response.loss)
            codec.encode_config(config, response.config)
        except Exception as error:
            self._abort(context, error, "config", "")
        return response

    def ListLosses(self, request: pb.ListLossesRequest, context: grpc.ServicerContext) -> pb.ListLossesResponse:  # noqa: N802
        response = pb.ListLossesResponse(server_version=__version__, device=str(self.device))
        for description in self.registry.descriptions():
            describe(description, response.losses.add())
        return response


def describe(description: LossDescription, out: pb.LossInfo) -> None:
    """Engine description -> ``losswire.v1.LossInfo``."""
    out.name = description.name
    out.summary = description.summary
    for spec in description.params:
        param = out.params.add(name=spec.name, type=spec.type, nullable=spec.nullable)
        param.default.CopyFrom(codec.json_value(spec.default))
        param.choices.extend(codec.json_value(c) for c in spec.choices or ())
    for spec in description.inputs:
        item = out.inputs.add(name=spec.name, kind=spec.kind, optional=spec.optional)
        item.default.CopyFrom(codec.json_value(spec.default))
        item.choices.extend(codec.json_value(c) for c in spec.choices or ())
    out.output = description.output.value
    out.output_variants.update({k: v.value for k, v in description.output_variants.items()})
    out.differentiable.extend(description.differentiable)
    out.separable = description.separable
    out.sample_axis = description.sample_axis
