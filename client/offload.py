"""gRPC's work kept off the main thread, where signal handlers run.

Python runs a signal handler (KeyboardInterrupt's, ``signal.alarm``'s, a scheduler's SIGTERM handler that
raises) in the main thread, between two bytecodes of whatever it is doing. grpcio's Python layer guards
every call's state with a ``threading.Condition``, entered through a Python-level ``__enter__``: an
exception raised there after the lock was taken, before the ``with`` block began, leaves the lock held by
the main thread for good. The channel's polling thread then blocks on it, and every later streamed call
and future on that channel waits forever, past its deadline (seen: an EvaluateStream's lock held by the
main thread, its call CANCELLED, the next call hung). So such a call made on the main thread (a stream,
shared memory, a channel-ready future) runs on another thread, and the main thread only waits for its
outcome in C (``_queue.SimpleQueue``, which a signal interrupts without any lock held). An interrupted
wait raises at once; the call runs on in the background until it ends or its deadline passes, and its
answer is dropped. A blocking unary call needs none of this: its caller polls it, no other thread waits
on its lock.
"""

from __future__ import annotations

import _queue
import _thread
import collections
import contextvars
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# Threads that ran a call wait this long for the next one, then end: a thread costs ~0.3 ms to start,
# a call on a small tensor ~2 ms, so calls back to back reuse one
IDLE_SECONDS = 30.0
MAX_IDLE = 4  # idle threads kept at most (more end at once)

# the job queues of idle threads: popped and appended in C (atomic), never behind a Python-level lock
_idle: collections.deque[_queue.SimpleQueue] = collections.deque()


def off_main_thread(call: Callable[[], T]) -> T:
    """``call()``, run on another thread when the caller is the main thread (else right here)."""
    if threading.get_ident() != threading.main_thread().ident:
        return call()
    outcome: _queue.SimpleQueue = _queue.SimpleQueue()
    context = contextvars.copy_context()
    grad = torch.is_grad_enabled()  # thread-local: the call's tensor copies see the caller's mode

    def run() -> None:
        try:
            with torch.set_grad_enabled(grad):
                result = context.run(call)
        except BaseException as error:  # handed to the caller, who raises it
            outcome.put((False, error))
        else:
            outcome.put((True, result))

    try:
        jobs = _idle.pop()
    except IndexError:
        jobs = _queue.SimpleQueue()
        # _thread, not threading.Thread: Thread.start() waits on an Event (a Condition) on this thread,
        # the very hazard avoided here
        _thread.start_new_thread(_serve, (jobs,))
    jobs.put(run)
    ok, value = outcome.get()
    if ok:
        return value
    raise value


def _serve(jobs: _queue.SimpleQueue) -> None:
    """Run the jobs put on ``jobs``; idle, offer ``jobs`` to the next caller; end after IDLE_SECONDS idle."""
    taken = False  # a caller popped ``jobs``: its job comes next (unless it was interrupted first)
    while True:
        try:
            job: Any = jobs.get(timeout=IDLE_SECONDS)
        except _queue.Empty:
            if taken:
                return  # taken by a caller interrupted before it put its job
            try:
                _idle.remove(jobs)
            except ValueError:
                taken = True  # popped meanwhile: wait for that job
                continue
            return
        job()
        del job
        taken = False
        if len(_idle) >= MAX_IDLE:
            return
        _idle.append(jobs)


if hasattr(os, "register_at_fork"):
    # a forked child has none of the parent's threads: their queues would take its jobs and run none
    os.register_at_fork(after_in_child=_idle.clear)
