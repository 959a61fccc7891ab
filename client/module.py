"""``RemoteLoss``: an nn.Module whose forward and backward are evaluated by a losswire server.

    loss_fn = RemoteLoss(dict(type='FocalLoss', gamma=2.0), target='localhost:50051')
    loss = loss_fn(pred, labels, avg_factor=num_pos)
    loss.backward()                      # pred.grad arrives from the server

The forward takes exactly the arguments of the MMDetection module for ``cfg['type']`` (the
server's description of that loss defines the signature) and returns what it returns: a tensor,
a tuple (AssociativeEmbeddingLoss) or a dict (SeesawLoss). The round trip itself (one Evaluate,
autograd) is :mod:`losswire.client.roundtrip`.

A stateful loss (SeesawLoss, EQLV2Loss, GHMC/GHMR with momentum) keeps its state on the server for
the life of the module, as the local module keeps its buffers; a named session shares one state
between every module and worker naming it:

    seesaw = RemoteLoss(dict(type='SeesawLoss', num_classes=1203), session='exp42/roi_head')
    seesaw.session_state()['cum_samples']     # read it; seesaw.reset_session() drops it
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from torch import Tensor, nn

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

from .arguments import CallShape
from .client import LossClient
from .configs import ConfigEncoding
from .errors import RemoteLossError, check_implementation
from .roundtrip import eager_under_compile, evaluate_terms
from .sessions import PrivateSession
from .targets import Target, label
from .terms import BoundTerm

log = logging.getLogger("losswire.client")


class RemoteLoss(nn.Module):
    """A loss evaluated by a losswire server, used like the local MMDetection module.

    Args:
        cfg: the mmdet config dict, e.g. ``dict(type='GIoULoss', loss_weight=2.0)``.
        target: the server address (``host:port``); a gRPC name such as ``dns:///losswire:50051``, or
            several servers (``["gpu1:50051", "gpu2:50051"]`` or ``"gpu1:50051,gpu2:50051"``): calls are
            balanced round_robin over the replicas and a session's calls go to one replica (see
            ``losswire.client.replicas``). None (the default): ``$LOSSWIRE_TARGET``, else
            ``localhost:50051``.
        timeout: deadline of each call in seconds (None: the client's, 300 s by default).
        client: an existing ``LossClient`` to share (default: one shared client per target).
        validate: check the config with the server now, so mistakes surface at construction.
        session: keep the loss's state (SeesawLoss, EQLV2Loss, GHM with momentum) on the server
            under this name, shared with every module naming it. None: a stateful loss keeps its state
            in a private session of this module's own (dropped when the module is collected or the
            process exits), so successive calls see one state, as with the local module; a copy or
            unpickled module gets a private session of its own.
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
        expect: the implementation digest (``'sha256:...'``, see :attr:`implementation`) this module
            accepts: a server whose implementation of the loss differs is refused with an
            ``ImplementationMismatchError``, at ``Describe`` and on every answer, before any number of
            its is used. None: any.

    After ``Describe`` (at construction, or at the first forward with ``validate=False``),
    :attr:`implementation` and :attr:`server_version` name what the server runs; ``last_implementation``
    and ``last_server_version`` what answered the latest forward.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        target: Target | None = None,
        *,
        timeout: float | None = None,
        client: LossClient | None = None,
        validate: bool = True,
        session: str | None = None,
        seed: int | None = None,
        transfer_dtype: str | None = None,
        expect: str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not super(): a subclass may also derive from mmdet's loss class
        if not isinstance(cfg, Mapping):  # else dict(cfg) says "dictionary update sequence element #0..."
            raise TypeError(
                f"RemoteLoss: cfg must be the loss's config dict, e.g. dict(type='FocalLoss', gamma=2.0); "
                f"got a {type(cfg).__name__} ({cfg!r:.60})"
            )
        codec.transfer_dtype_of(transfer_dtype)  # a ValueError now for a bad name
        self.transfer_dtype = transfer_dtype
        self.cfg = dict(cfg)
        self.client = client or LossClient.shared(target)
        self.timeout = timeout
        self.session = session
        self.seed = seed
        self.expect = expect
        # the session step of this module's latest forward: the order the server applied it in
        self.last_session_step = 0
        # the server's decode / compute / encode milliseconds of this module's latest forward
        self.last_timings: pb.Timings | None = None
        # what answered the latest forward: the server's version and the loss's implementation digest
        self.last_server_version = ""
        self.last_implementation = ""
        self._reset_caches()
        self._private: PrivateSession | None = None
        if validate:
            self.describe()

    def _reset_caches(self) -> None:
        """What is rebuilt from the server's description and the config on first use."""
        self._description: pb.DescribeResponse | None = None
        self._described_config: bytes | None = None  # the encoded config the description answers
        self._call_shape: CallShape | None = None
        self._config = ConfigEncoding()

    # -- copies and pickles ----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # Channels do not pickle or deep-copy (mmengine deep-copies configs and modules): keep the
        # target and reconnect through the shared client on the other side. Credentials given in code
        # travel along (a pickle then holds the token); the environment's are read again over there.
        state = self.__dict__.copy()
        credentials = None if self.client.credentials_from_env else self.client.credentials
        state["client"] = (self.client.target, credentials)
        description = self._description
        state["_description"] = None if description is None else description.SerializeToString()
        state["_call_shape"] = state["_config"] = state["last_timings"] = None
        # A private session belongs to this module: a copy gets its own (see __setstate__)
        private = self._private
        state["_private"] = None
        state["_copied_from"] = private.name if private is not None and private.used else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        (target, credentials), description = state["client"], state["_description"]
        copied_from = state.pop("_copied_from", None)
        self.__dict__.update({**state, "client": LossClient.shared(target, credentials)})
        self._call_shape, self._config = None, ConfigEncoding()
        self._description = None if description is None else pb.DescribeResponse.FromString(description)
        if copied_from is not None:
            log.warning(
                "losswire: a copy of RemoteLoss(%s) starts from a fresh server-side state: the state the original "
                "accumulated (private session %r) stays with the original, whereas a copy of the local module "
                "would carry it. Name a session (session=...) to share one state between modules",
                self.cfg.get("type"),
                copied_from,
            )

    # -- the server's description ----------------------------------------------------------------------

    def describe(self) -> pb.DescribeResponse:
        """The server's description of the current config (fetched once per config; validates it)."""
        if self._description is None:
            self._accept_description(self.client.describe(self.cfg, self.timeout))
        return self._description

    def _accept_description(self, description: pb.DescribeResponse) -> None:
        """Keep ``description`` (of the current config) after checking the pinned implementation."""
        check_implementation(
            description.loss.name, self.expect, description.loss.implementation, self._target_label(), "Describe"
        )
        self._description = description
        self._described_config = self.encoded_config()

    @property
    def info(self) -> pb.LossInfo:
        """The server's description of this loss (fetched once, with config validation)."""
        return self.describe().loss

    @property
    def implementation(self) -> str:
        """The server's implementation digest of this loss (``'sha256:...'``), from ``Describe``."""
        return self.info.implementation

    @property
    def server_version(self) -> str:
        """The losswire version of the server that described this loss."""
        return self.describe().server_version

    @property
    def input_names(self) -> list[str]:
        return [item.name for item in self.info.inputs]

    def keeps_state(self) -> bool:
        """Whether the current config keeps state across calls (``DescribeResponse.stateful``); a
        config changed since it was described is described again if the loss's type can keep state."""
        description = self.describe()
        if not description.loss.stateful:
            return False
        if self._described_config != self.encoded_config():
            self._accept_description(self.client.describe(self.cfg, self.timeout))
        return self._description.stateful

    def extra_repr(self) -> str:
        session = f", session={self.session!r}" if self.session else ""
        return f"cfg={self.cfg!r}, target={self.client.target!r}{session}"

    # -- calls -----------------------------------------------------------------------------------------

    # torch.compile: binding reads the server's description (protobuf), which dynamo cannot trace either
    @eager_under_compile
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        term = self.bind(*args, **kwargs)
        return evaluate_terms({"": term}, client=self.client, timeout=self.timeout)[""]

    def bind(self, *args: Any, **kwargs: Any) -> BoundTerm:
        """Bind forward arguments as mmdet's module would: a TypeError for a wrong call, an
        ``ArgumentError`` (a TypeError and a RemoteLossError) naming the argument for a value the loss
        does not accept."""
        shape = self.call_shape()
        arguments = shape.bind(args, kwargs)
        shape.check(arguments)
        return BoundTerm(self, arguments)

    def call_shape(self) -> CallShape:
        """What the forward takes, from the server's description: built once, not on every forward
        (again if ``cfg`` gains or loses a sampler, which adds the sampling arguments)."""
        sampled = "sampler" in self.cfg
        shape = self._call_shape
        if shape is None or shape.sampled != sampled:
            shape = self._call_shape = CallShape(self.info, sampled)
        return shape

    def encoded_config(self) -> bytes:
        """``cfg`` as a serialized ``google.protobuf.Struct``: encoded again only when ``cfg`` changed
        (compared with a copy of what was encoded, so editing ``module.cfg`` in place is seen)."""
        return self._config.encode(self.cfg)

    def term_session(self) -> str:
        """The session a term of this module names: the given one, the private one of a stateful
        config, or "" (no state kept across calls)."""
        if self.session:
            return self.session
        if not self.keeps_state():
            return ""
        config = self.encoded_config()
        private = self._private
        if private is None or private.config != config:
            # a config with other parameters cannot continue the old state (the server would refuse it)
            if private is not None:
                private.drop_later()
            private = self._private = PrivateSession(self.client, config)
            weakref.finalize(self, private.drop_later).atexit = False
        private.used = True
        return private.name

    def accept_answer(self, response: pb.EvaluateResponse, result: pb.TermResult, forward: bool = True) -> None:
        """Check one term's answer against the pinned implementation (before any number is used) and
        record what answered it (for a forward, not a recompute)."""
        check_implementation(self.info.name, self.expect, result.implementation, self._target_label(), "Evaluate")
        if not forward:
            return
        self.last_timings = response.timings
        self.last_server_version, self.last_implementation = response.server_version, result.implementation
        if result.session_step:
            self.last_session_step = result.session_step

    def _target_label(self) -> str:
        return label(self.client.target)

    # -- server-held state -----------------------------------------------------------------------------

    @property
    def session_name(self) -> str | None:
        """The session holding this module's state: the named one, else its private one once a call
        created it (None before, and for a loss that keeps no state)."""
        if self.session:
            return self.session
        return self._private.name if self._private is not None and self._private.used else None

    def session_state(self) -> dict[str, Tensor]:
        """The session's state tensors by name (e.g. ``cum_samples``), as the server holds them now."""
        return self._state_call(self.client.get_session)

    def reset_session(self) -> dict[str, Tensor]:
        """Drop the session's state (the next forward starts afresh); returns the state it had."""
        return self._state_call(self.client.reset_session)

    def _state_call(self, call: Callable[[str, float | None], pb.SessionInfo]) -> dict[str, Tensor]:
        name = self._session_name()
        try:
            return _decode_state(call(name, self.timeout))
        except RemoteLossError as error:
            if error.code != grpc.StatusCode.NOT_FOUND or name == self.session:
                raise
            return {}  # a private session no call created (they all failed) or that expired: no state

    def _session_name(self) -> str:
        name = self.session_name
        if name is None:
            raise ValueError(
                f"this RemoteLoss({self.cfg.get('type')}) holds no state on the server yet: pass session='name' to "
                "share one, or call it once (a stateful config keeps its state in a private session)"
            )
        return name


def _decode_state(info: pb.SessionInfo) -> dict[str, Tensor]:
    return {k: codec.decode_tensor(v, f"state[{k}]") for k, v in info.state.items()}


def build_loss(cfg: Mapping[str, Any], target: Target | None = None, **kwargs: Any) -> RemoteLoss:
    """Mirror of mmdet's ``build_loss``: a RemoteLoss for ``cfg`` served by ``target`` (None:
    ``$LOSSWIRE_TARGET``, else ``localhost:50051``)."""
    return RemoteLoss(cfg, target, **kwargs)
