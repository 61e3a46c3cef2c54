"""Amazon S3 for the tests: moto's server mode, reached with s3fs.

We start ``moto_server -H 127.0.0.1 -p PORT`` (the console script of the running
interpreter's environment, else ``python -m moto.server``), output to a log file.

``MotoServer(log_dir, restartable=True)`` runs moto's WSGI application in a process
of ours instead (``python -m services.s3 --serve HOST PORT``: ``serve`` below), whose
HTTP listener ``stop_listening()`` closes (SIGUSR1) and ``start_listening()`` opens
again on the same port (SIGUSR2), while the process, and with it moto's state (its
buckets and objects, in memory), lives on: an outage of the server as its clients
see it. moto has nothing of its own for that: ``ThreadedMotoServer.stop()`` leaves
its socket bound (a new server cannot take the port), ``moto_server`` keeps its state
in memory and loses it when it stops, and moto's recorder replays requests rather
than restoring state.

s3fs is given ``key``/``secret``/``endpoint_url`` and no ``client_kwargs``: with
``region_name`` in ``client_kwargs``, ``mkdir`` of a bucket sends a location
constraint that moto refuses ("The specified location-constraint is not valid").
The AWS_* variables set below reach any boto client of this process and of every
process started from it (batchpool's local workers), so none of them looks for a
real account's credentials or region.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services import HOST, READY_TIMEOUT, Service, ServiceError, http_request, missing_modules

KEY = SECRET = "testing"
REGION = "us-east-1"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": REGION,
}
os.environ.update(AWS_ENV)
# A session token from a real account would be sent along with the fake key.
os.environ.pop("AWS_SESSION_TOKEN", None)

__all__ = ["AWS_ENV", "KEY", "REGION", "SECRET", "MotoServer", "make_s3fs"]


def storage_options(endpoint: str) -> dict[str, Any]:
    """What ``s3fs.S3FileSystem`` (or ``fsspec.url_to_fs("s3://...")``) needs here."""
    return {"key": KEY, "secret": SECRET, "endpoint_url": endpoint}


def make_s3fs(endpoint: str, **extra: Any) -> Any:
    """An ``s3fs.S3FileSystem`` that talks to the moto server at ``endpoint``."""
    import s3fs

    return s3fs.S3FileSystem(**storage_options(endpoint), **extra)


def _moto_command() -> list[str]:
    """moto's server of this interpreter's environment (never another one on PATH)."""
    name = "moto_server.exe" if os.name == "nt" else "moto_server"
    script = Path(sysconfig.get_path("scripts")) / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "moto.server"]


#: The signals a restartable server's process takes to close and to open its listener.
STOP_LISTENING, START_LISTENING = signal.SIGUSR1, signal.SIGUSR2
_TESTS = str(Path(__file__).resolve().parent.parent)


class MotoServer(Service):
    """moto in server mode on 127.0.0.1 and a free port (state in memory).

    ``restartable=True``: a process of ours serves moto's application, and
    ``stop_listening()`` / ``start_listening()`` (or ``outage()``) take its port away
    and give it back, moto's state kept (see the module's notes)."""

    name = "moto_server"
    ready_path = "/moto-api/"

    def __init__(self, log_dir: str | os.PathLike[str], *, restartable: bool = False) -> None:
        super().__init__(log_dir)
        self.restartable = restartable
        #: How many times the listener was closed and opened again.
        self.outages = 0

    def missing(self) -> str | None:
        # moto[server] brings flask and flask_cors; s3fs is the client the tests use.
        absent = missing_modules("moto", "flask", "flask_cors", "s3fs")
        if absent:
            return (
                f"S3 tests need the pip packages of the [test] extra (moto[server], s3fs); "
                f"not installed: {', '.join(absent)} (pip install -e '.[test]')"
            )
        return None

    def command(self, port: int) -> list[str]:
        if self.restartable:
            return [sys.executable, "-m", "services.s3", "--serve", HOST, str(port)]
        return [*_moto_command(), "-H", HOST, "-p", str(port)]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(AWS_ENV)
        env["MOTO_PORT"] = str(self.port)  # moto builds its own URLs from it
        if self.restartable:  # ``-m services.s3`` from the log folder
            env["PYTHONPATH"] = os.pathsep.join([_TESTS, *filter(None, [env.get("PYTHONPATH")])])
        return env

    # -- an outage of a restartable server ----------------------------------------------

    def _signal(self, signum: int) -> None:
        if not self.restartable:
            raise ServiceError(f"{self.name} was not started with restartable=True")
        if not self.running:
            raise ServiceError(f"{self.name} is not running\n{self.log_tail()}")
        assert self.process is not None
        self.process.send_signal(signum)

    def stop_listening(self) -> None:
        """Close the server's port (and its open connections); wait until it refuses."""
        self._signal(STOP_LISTENING)
        deadline = time.monotonic() + READY_TIMEOUT
        while _accepts(self.port):
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} still accepts connections\n{self.log_tail()}")
            time.sleep(0.02)

    def start_listening(self) -> None:
        """Open the same port again; wait until the server answers there."""
        self._signal(START_LISTENING)
        self._wait_ready(time.monotonic() + READY_TIMEOUT)
        self.outages += 1

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """``with server.outage(): ...``: the port refuses connections in the block."""
        self.stop_listening()
        try:
            yield
        finally:
            self.start_listening()

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error when this server has it already)."""
        status, body = http_request("PUT", f"{self.endpoint}/{name}", body=b"")
        if status != 200 and b"BucketAlreadyOwnedByYou" not in body:
            raise ServiceError(
                f"{self.name}: creating bucket {name!r} answered HTTP {status}: "
                f"{body[:500]!r}\n{self.log_tail()}"
            )
        return name

    def reset(self) -> None:
        """Forget every bucket and object."""
        status, body = http_request("POST", f"{self.endpoint}/moto-api/reset")
        if status != 200:
            raise ServiceError(f"{self.name}: reset answered HTTP {status}: {body[:300]!r}")

    def storage_options(self) -> dict[str, Any]:
        return storage_options(self.endpoint)


def _accepts(port: int | None) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    if port is None:
        return False
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


# -- the restartable server's process ---------------------------------------------------


def serve(host: str, port: int) -> None:
    """Serve moto's application on ``host:port`` until SIGTERM; SIGUSR1 closes the
    listener and every open connection (clients see "connection refused", or their
    kept-alive connection reset), SIGUSR2 opens the same port again. moto's backends
    live in this process, so every bucket and object outlives the outage."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    app = DomainDispatcherApplication(create_backend_app)
    connections: set[socket.socket] = set()
    lock = threading.Lock()

    class Handler(WSGIRequestHandler):
        def setup(self) -> None:
            with lock:
                connections.add(self.request)
            super().setup()

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                with lock:
                    connections.discard(self.request)

    server: Any = None
    thread: threading.Thread | None = None

    def start() -> None:
        nonlocal server, thread
        server = make_server(host, port, app, threaded=True, request_handler=Handler)
        thread = threading.Thread(target=server.serve_forever, name="moto-listener", daemon=True)
        thread.start()
        print(f"listening on {host}:{port}", flush=True)

    def stop() -> None:
        nonlocal server, thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with lock:
            open_now = list(connections)
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        assert thread is not None
        thread.join()
        server = thread = None
        print(f"stopped listening (closed {len(open_now)} open connections)", flush=True)

    requests: queue.SimpleQueue[str] = queue.SimpleQueue()  # put() is safe in a handler
    signal.signal(STOP_LISTENING, lambda *_: requests.put("stop"))
    signal.signal(START_LISTENING, lambda *_: requests.put("start"))
    signal.signal(signal.SIGTERM, lambda *_: requests.put("exit"))
    start()
    while True:
        try:
            what = requests.get(timeout=0.5)
        except queue.Empty:
            continue
        if what == "stop":
            stop()
        elif what == "start" and server is None:
            start()
        elif what == "exit":
            stop()
            return


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"usage: python -m services.s3 --serve HOST PORT (not {sys.argv[1:]})")
