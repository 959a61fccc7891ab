"""losswire's thin client: ``RemoteLoss``, a torch.nn.Module whose forward and backward cross the wire.

It needs torch, grpcio and protobuf only; it never imports the loss engine.

    from losswire.client import RemoteLoss
    loss = RemoteLoss(dict(type='FocalLoss', gamma=2.0), target='localhost:50051')(pred, target)
    loss.backward()
"""

from .channel import DEFAULT_TARGET, LossClient, SessionRestartedError, Target
from .errors import RemoteLossError
from .remote import BoundTerm, RemoteLoss, build_loss, evaluate_terms
from .security import Credentials

__all__ = [
    "DEFAULT_TARGET",
    "BoundTerm",
    "Credentials",
    "LossClient",
    "RemoteLoss",
    "RemoteLossError",
    "SessionRestartedError",
    "Target",
    "build_loss",
    "evaluate_terms",
]
