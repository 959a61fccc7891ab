"""The engine's descriptions and the sessions' state, as the contract's messages."""

from __future__ import annotations

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

from ..evaluation import Session, SessionStore
from ..losses import LossDescription


def loss_info(description: LossDescription, out: pb.LossInfo, implementation: str = "") -> None:
    """Engine description -> ``losswire.v1.LossInfo``."""
    out.name = description.name
    out.summary = description.summary
    for spec in description.params:
        param = out.params.add(
            name=spec.name,
            type=spec.type,
            nullable=spec.nullable,
            minimum=spec.minimum,
            maximum=spec.maximum,
            exclusive_minimum=spec.exclusive_minimum,
            exclusive_maximum=spec.exclusive_maximum,
        )
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
    out.stochastic = description.stochastic
    out.stateful = description.stateful
    out.extra_inputs = description.extra_inputs
    out.value_inputs.extend(description.value_inputs)
    out.implementation = implementation


def session_info(sessions: SessionStore, session: Session, with_state: bool) -> pb.SessionInfo:
    """A session's name, config, step count and expiry; with its state tensors when asked."""
    info = pb.SessionInfo(
        session=session.name,
        steps=session.steps,
        idle_seconds=sessions.idle(session),
        expires_in_seconds=sessions.expires_in(session),
    )
    codec.encode_config(session.config, info.config)
    if with_state:
        for key, value in session.state().items():
            codec.encode_tensor(value, info.state[key])
    return info
