"""Real storage emulators that the tests start and stop themselves.

Each service is a server process on 127.0.0.1 and a free port, started from a pip
package of the ``[test]`` extra (``gcs.FakeGcsServer``, ``s3.MotoServer``). What every
service shares lives here:

- its output goes to a log FILE (a pipe that nobody reads fills up and hangs the
  server), whose tail is quoted when it cannot start;
- every wait is bounded: readiness is polled until a deadline, stopping escalates
  from SIGTERM to SIGKILL with bounded waits;
- on Linux the server is also killed when the process that started it dies
  (``PR_SET_PDEATHSIG``), so a test run killed hard leaves no server behind;
- ``start()`` and ``stop()`` are idempotent.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
#: How long a server may take to answer its first request.
READY_TIMEOUT = 20.0
#: How long a server may take to exit after SIGTERM (then SIGKILL, then as long again).
STOP_TIMEOUT = 5.0
#: Bounded wait for one HTTP request to a service.
REQUEST_TIMEOUT = 5.0

__all__ = [
    "HOST",
    "READY_TIMEOUT",
    "Service",
    "ServiceError",
    "ServiceMissing",
    "free_port",
    "http_request",
    "missing_modules",
    "read_exports",
]


class ServiceError(RuntimeError):
    """A service was installed but did not start (the message quotes its log tail)."""


class ServiceMissing(RuntimeError):
    """A package a service needs is not installed here."""


def _bypass_proxies_for_loopback() -> None:
    """Keep a proxy configured for the machine away from the emulators (all clients)."""
    for name in ("NO_PROXY", "no_proxy"):
        current = [item for item in os.environ.get(name, "").split(",") if item]
        missing = [host for host in (HOST, "localhost") if host not in current]
        if missing:
            os.environ[name] = ",".join(current + missing)


_bypass_proxies_for_loopback()

# urllib without any proxy, whatever the environment says.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def read_exports(path: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines a ``ci/`` script wrote, expanded against our
    environment (``PATH=/usr/bin:$PATH``)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export ") :].partition("=")
            env[name] = os.path.expandvars(value)
    return env


def missing_modules(*modules: str) -> list[str]:
    """The names among ``modules`` that cannot be imported here (nothing is imported)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> tuple[int, bytes]:
    """``(status, body)`` of one request; an HTTP error status is returned, not raised."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with _opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _load_prctl() -> Any:
    """libc's prctl, looked up now: a child between fork and exec must not import."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """SIGTERM this child when the thread that started it ends (pytest's main thread)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Service:
    """One server process, its log file, and the URL it answers on."""

    #: A short name for messages ("fake-gcs-server", "moto_server").
    name = "service"
    #: Path (on the service) that answers 200 once it serves requests.
    ready_path = "/"
    #: Bind attempts (a free port may be taken between ``free_port()`` and the bind).
    start_attempts = 3

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = Path(log_dir)
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None

    # -- what a service says about itself ------------------------------------------------

    def missing(self) -> str | None:
        """Why this service cannot run here (a missing package), or None."""
        raise NotImplementedError

    def command(self, port: int) -> Sequence[str]:
        raise NotImplementedError

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error when it exists) and return the name."""
        raise NotImplementedError

    def storage_options(self) -> dict[str, Any]:
        """fsspec ``storage_options`` that reach this service."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, which the fixtures have prepared."""
        return dict(os.environ)

    # -- state --------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise ServiceError(f"{self.name} is not started")
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    # -- start / stop -------------------------------------------------------------------

    def start(self) -> Service:
        """Start the server and wait until it answers; a no-op when it already runs."""
        if self.running:
            return self
        reason = self.missing()
        if reason:
            raise ServiceMissing(reason)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        error: ServiceError | None = None
        for attempt in range(1, self.start_attempts + 1):
            try:
                self._spawn(attempt)
                self._wait_ready(time.monotonic() + READY_TIMEOUT)
            except ServiceError as exc:
                error = exc
                self.stop()
                if "address already in use" in str(exc).lower():
                    continue  # somebody took the port first: another one
                raise
            self.startup_seconds = time.monotonic() - started
            return self
        assert error is not None
        raise error

    def _spawn(self, attempt: int) -> None:
        self.port = free_port()
        self.log_path = self.log_dir / f"{self.name}-{self.port}.log"
        argv = list(self.command(self.port))
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(argv)}   (attempt {attempt})\n".encode())
            log.flush()
            try:
                # The child gets its own copy of the descriptor; ours is closed at once.
                self.process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.environment(),
                    cwd=self.log_dir,
                    preexec_fn=_die_with_parent if _prctl is not None else None,
                )
            except OSError as exc:
                raise ServiceError(f"{self.name}: cannot run {argv[0]}: {exc}") from exc

    def _wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        url = self.endpoint + self.ready_path
        last = "no answer yet"
        delay = 0.02
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServiceError(
                    f"{self.name} exited with code {code} before it answered {url}\n"
                    f"--- {self.log_path} (last lines) ---\n{self.log_tail()}"
                )
            try:
                status, _ = http_request("GET", url, timeout=1.0)
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
            else:
                if status == 200:
                    return
                last = f"HTTP {status}"
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"{self.name} did not answer {url} within {READY_TIMEOUT:.0f} s "
                    f"(last: {last})\n--- {self.log_path} (last lines) ---\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(0.2, delay * 2)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); every wait is bounded. Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(STOP_TIMEOUT)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self.endpoint}, pid {self.process.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {state}>"
