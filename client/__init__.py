"""losswire's thin client: ``RemoteLoss``, a torch.nn.Module whose forward and backward cross the wire.

It needs torch, grpcio and protobuf only; it never imports the loss engine (``losswire.server``).

    from losswire.client import RemoteLoss
    loss = RemoteLoss(dict(type='FocalLoss', gamma=2.0), target='localhost:50051')(pred, target)
    loss.backward()

The path of a call, module by module: ``module`` (RemoteLoss, argument binding in ``arguments``) ->
``roundtrip`` (the autograd Function; each term encoded by ``terms``) -> ``client`` (LossClient) ->
``transports`` (unary, EvaluateStream or shared memory) -> ``replicas`` and ``sessions`` (which
server holds a session, restarted sessions) -> ``channels`` (retries, the first connection, deadlines)
-> ``targets`` (what to dial). Without ``target=``, clients dial ``$LOSSWIRE_TARGET``, else
``localhost:50051``.
"""

from .client import LossClient
from .errors import ArgumentError, ImplementationMismatchError, RemoteLossError
from .module import RemoteLoss, build_loss
from .roundtrip import evaluate_terms
from .security import Credentials
from .sessions import SessionRestartedError
from .targets import DEFAULT_TARGET, Target
from .terms import BoundTerm

__all__ = [
    "DEFAULT_TARGET",
    "ArgumentError",
    "BoundTerm",
    "Credentials",
    "ImplementationMismatchError",
    "LossClient",
    "RemoteLoss",
    "RemoteLossError",
    "SessionRestartedError",
    "Target",
    "build_loss",
    "evaluate_terms",
]
