"""A Ray cluster for the tests: ``ray start --head`` on 127.0.0.1, a free port, its own temp dir.

``RayHead(folder).start()`` runs::

    ray start --head --num-cpus 2 --node-ip-address 127.0.0.1 --port PORT \\
        --include-dashboard false --disable-usage-stats --temp-dir DIR

with ``RAY_AUTH_MODE=disabled`` (Ray 2.60 turns token authentication on by default,
and a driver that connects by address then needs the token) and
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (else Ray rewrites 127.0.0.1 to the
machine's outside address); every driver needs both too: ``ENV`` is set in this
process's environment by ``start`` and so reaches the subprocesses the tests start.

``ray start`` leaves the head's processes (gcs_server, raylet, ...) running and
exits. ``stop()`` ends them by PID: the processes whose command line names this
head's temp dir. ``ray stop`` would stop every Ray of the machine, another
session's or a test's local ``ray.init`` among them. Both are idempotent; a head
that answers on its port is not started twice. Its output goes to ``DIR/start.log``,
quoted when it cannot start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services import HOST, ServiceError, free_port

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: How long ``ray start`` may take (about 5 s here).
START_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0


def ray_command() -> str | None:
    """The ``ray`` console script of this interpreter's environment, else the PATH's."""
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    return shutil.which("ray")


class RayHead:
    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        # Short: Ray's unix sockets live under it (at most 107 characters of path).
        self.temp_dir = Path(folder or tempfile.mkdtemp(prefix="bp-ray-", dir="/tmp"))
        self.port = 0
        self.log = self.temp_dir / "start.log"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def answers(self) -> bool:
        if not self.port:
            return False
        try:
            with socket.create_connection((HOST, self.port), timeout=2):
                return True
        except OSError:
            return False

    def start(self) -> str:
        """Start the head (unless it answers already); its address."""
        os.environ.update(ENV)
        if self.answers():
            return self.address
        ray = ray_command()
        if ray is None:
            raise ServiceError("the ray command is not installed: pip install 'batchpool[ray]'")
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [
            ray, "start", "--head", "--num-cpus", "2", "--node-ip-address", HOST,
            "--port", str(self.port), "--include-dashboard", "false",
            "--disable-usage-stats", "--temp-dir", str(self.temp_dir),
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            try:
                done = subprocess.run(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **ENV},
                    timeout=START_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                self.stop()
                why = f"ray start took over {START_TIMEOUT} s:\n{self.tail()}"
                raise ServiceError(why) from None
        if done.returncode != 0 or not self.answers():
            self.stop()
            raise ServiceError(f"ray start failed ({done.returncode}):\n{self.tail()}")
        return self.address

    def pids(self) -> list[int]:
        """The processes of this head: those whose command line names its temp dir."""
        mark = str(self.temp_dir).encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path("/proc", entry, "cmdline").read_bytes()
            except OSError:
                continue
            if mark in cmdline:
                found.append(int(entry))
        return found

    def stop(self) -> None:
        """End the head's processes: SIGTERM, then SIGKILL after ``STOP_TIMEOUT``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"
