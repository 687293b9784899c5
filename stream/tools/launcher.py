"""Start ``sentiment-stream worker`` as a child process: what the demo, the bench, the sweep and the tests run.

A :class:`WorkerProcess` gets its configuration the way a deployed worker does, from ``SENTIMENT_*``
variables (:meth:`Settings.to_env`), its own metrics and health ports (free ones unless given), and
writes its output to a log file whose tail explains a worker that never became ready.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from stream.service.settings import Settings

__all__ = ["WORKER_MODULE", "WorkerNotReady", "WorkerProcess", "free_port"]

log = logging.getLogger(__name__)

WORKER_MODULE = ("stream.cli", "worker")  # run as ``python -m stream.cli worker``
_LOG_TAIL_CHARS = 3000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


class WorkerNotReady(RuntimeError):
    """The worker exited, or its health endpoint did not answer in time; the message ends with its log's tail."""


@dataclass
class WorkerProcess:
    """One worker subprocess with its own metrics and web ports; a context manager that stops it on exit.

    ``overrides`` are settings fields on top of ``settings``; ``env`` adds plain environment variables
    (e.g. ``OMP_NUM_THREADS``). ``module`` runs another ``python -m`` module that reads the same
    settings (the bench's naive peer). ``new_session`` starts the child in a session of its own: with
    sched_autogroup (Debian's default) the kernel shares the CPU between sessions, so on a shared
    machine every process under test gets the same share instead of splitting its parent's.
    """

    settings: Settings
    log_path: Path
    overrides: Mapping[str, object] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    metrics_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    module: Sequence[str] = WORKER_MODULE
    new_session: bool = False
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        fields = {**self.overrides, "metrics_port": self.metrics_port, "web_port": self.web_port}
        env = self.settings.to_env(None, **fields)
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *self.module],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=self.new_session,
            )
        return self

    def __enter__(self) -> WorkerProcess:
        return self if self.proc is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.terminate()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the worker was not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def health_url(self) -> str:
        return f"http://{_local(self.settings.web_host)}:{self.web_port}/health"

    @property
    def metrics_url(self) -> str:
        return f"http://{_local(self.settings.metrics_host)}:{self.metrics_port}/metrics"

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /health answers (the Faust app is up; partitions may still be assigning).

        Raises :class:`WorkerNotReady` when the process exits first or ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise WorkerNotReady(
                    f"the worker exited (code {self.returncode}); log {self.log_path}:\n{self.log_tail()}"
                )
            with suppress(OSError):
                urllib.request.urlopen(self.health_url, timeout=1).read()
                return
            time.sleep(0.2)
        raise WorkerNotReady(f"the worker was not ready in {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def health(self, timeout: float = 5) -> bytes:
        with urllib.request.urlopen(self.health_url, timeout=timeout) as resp:
            return bytes(resp.read())

    def metrics_text(self, timeout: float = 5) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as resp:
            return resp.read().decode()

    def terminate(self, timeout: float = 40) -> int:
        """SIGTERM and wait; returns the exit code. Still running after ``timeout``: SIGKILL (code -9)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop %.0f s after SIGTERM; killing it", self.proc.pid, timeout)
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
