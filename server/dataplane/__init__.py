"""The dataplane: one call, transport-free, the same for every front door (see ``calls``).

``Dataplane`` checks a request's limits (``limits``), admits big calls (``admission``), decodes it
into the engine's terms (``decode``), evaluates them, places and encodes the answer (``encode``),
releases memory after an out-of-memory (``memory``), and serves the descriptions, sessions and
shared-memory regions (``descriptions``, ``shared_memory``, handed over on ``handoff``'s socket) the calls
rely on.
"""

from .calls import Answer, Dataplane, NotQuick, StreamIntake
from .limits import RequestLimits
from .shared_memory import Caller, SharedMemoryLimits, SharedMemoryRegistry

__all__ = [
    "Answer",
    "Caller",
    "Dataplane",
    "NotQuick",
    "RequestLimits",
    "SharedMemoryLimits",
    "SharedMemoryRegistry",
    "StreamIntake",
]
