"""What a call gives back (``Answer``), and the scope that names a failing term (``AtTerm``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks

from ..errors import TermError
from .memory import released_if_out_of_memory


@dataclasses.dataclass
class Answer:
    """A call's answer: the response; for a streamed answer, the sink whose tensors follow it in
    chunks; and what to free once it has been sent (a big call's tensors: see ``keep``)."""

    response: pb.EvaluateResponse
    sink: chunks.StreamSink | None = None
    # big tensors (streamed, in shared memory) and their outcomes: freeing hundreds of MiB returns pages
    # to the system (munmap, milliseconds per 100 MiB), so the front door frees them after sending
    keep: list[Any] = dataclasses.field(default_factory=list)


class AtTerm:
    """``with AtTerm(index, name)``: errors raised inside name the term (``TermError``); an out-of-memory
    releases the call's memory. (A class, not a generator: a call enters several per term.)"""

    __slots__ = ("index", "name")

    def __init__(self, index: int, name: str) -> None:
        self.index, self.name = index, name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> bool:
        if isinstance(error, Exception):
            raise TermError(self.index, self.name, released_if_out_of_memory(error, f"terms[{self.index}]")) from None
        return False
