"""Server subprocesses for tests and benchmarks: ``losswire serve`` started the way operators start it.

Each server binds an ephemeral loopback port (``--port 0``); the bound port comes from the start-up
log line (:data:`LISTENING`). Every subprocess has a watchdog that kills it after ``HARD_LIMIT``
seconds, whatever the test does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .paths import PLUGINS

SERVICE = "losswire.v1.LossService"
LISTENING = re.compile(r"losswire \S+ listening on (?P<host>\S+):(?P<port>\d+), device (?P<device>[^,\s]+)")
START_TIMEOUT = 60.0  # importing torch on a loaded CI machine
EXIT_TIMEOUT = 20.0
HARD_LIMIT = 120.0  # no server subprocess outlives this, whatever the test does
CALL_TIMEOUT = 30.0


def losswire_script() -> str:
    """The ``losswire`` console script of this environment."""
    beside = Path(sys.executable).parent / "losswire"
    found = str(beside) if beside.exists() else shutil.which("losswire")
    assert found, "the losswire console script is not installed (pip install -e .)"
    return found


def server_env(plugins: bool = False, **variables: str) -> dict[str, str]:
    """This environment without any LOSSWIRE_* setting of the caller's, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSWIRE_")}
    env["PYTHONUNBUFFERED"] = "1"
    if plugins:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGINS), env.get("PYTHONPATH", "")) if p)
    env.update(variables)
    return env


def module_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "losswire.server", *args]


def serve_cmd(*args: str) -> list[str]:
    return [losswire_script(), "serve", *args]


class ServerProcess:
    """A server subprocess whose stderr is read line by line in the background."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self._lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="server-stderr", daemon=True)
        self._reader.start()
        self._watchdog = threading.Timer(HARD_LIMIT, self.proc.kill)
        self._watchdog.daemon = True
        self._watchdog.start()
        self.port: int | None = None
        self.device: str | None = None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def target(self) -> str:
        assert self.port is not None, "the server has not started"
        return f"127.0.0.1:{self.port}"

    def log(self, since: int = 0) -> str:
        with self._changed:
            return "".join(self._lines[since:])

    def mark(self) -> int:
        """A position in the log, for ``wait_for(..., since=mark)``."""
        with self._changed:
            return len(self._lines)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = CALL_TIMEOUT, since: int = 0) -> re.Match[str]:
        """The first log line from ``since`` on that matches; waits for it up to ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = since
        with self._changed:
            while True:
                for line in self._lines[checked:]:
                    match = regex.search(line)
                    if match:
                        return match
                checked = max(checked, len(self._lines))
                if self._eof:
                    raise AssertionError(
                        f"server exited (rc {self.proc.wait(EXIT_TIMEOUT)}) without logging {regex.pattern!r}:\n"
                        + "".join(self._lines)
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no log line {regex.pattern!r} within {timeout} s:\n" + "".join(self._lines))
                self._changed.wait(remaining)

    def wait_started(self) -> ServerProcess:
        match = self.wait_for(LISTENING, START_TIMEOUT)
        self.port, self.device = int(match["port"]), match["device"]
        assert self.port > 0, match.group(0)
        return self

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit within {timeout} s:\n{self.log()}") from None
        self._reader.join(EXIT_TIMEOUT)  # the log is complete once the pipe is drained
        return code

    def close(self) -> None:
        self._watchdog.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(EXIT_TIMEOUT)
        self._reader.join(EXIT_TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
