"""Which process is which on this machine, told so that a forged record cannot fake it.

A pid alone is reused. A pid with its start time (clock ticks since boot, from
``/proc/<pid>/stat``) names one process for the life of one boot, and the boot's
id (``/proc/sys/kernel/random/boot_id``) names the boot. Anyone on the host can
read all three of any process, so they tell a live process from a later one, but
not a batchpool worker from any other process.

That is what the worker token is for. The local pool starts each worker with a
random ``BATCHPOOL_WORKER_TOKEN`` in its environment, which nobody else learns;
the worker's start markers record only a digest of it. A process counts as that
worker only when ``/proc/<pid>/environ`` (readable by its own user alone) holds a
token with the recorded digest: a marker naming any other process, forged or not,
never makes batchpool signal or wait on it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import socket

#: The environment variable through which a local pool worker holds its token.
WORKER_TOKEN_ENV = "BATCHPOOL_WORKER_TOKEN"
#: How long a pool worker whose client died may still run its job (seconds); a client
#: that attaches waits for such a worker that long at most.
ORPHAN_GRACE_ENV = "BATCHPOOL_ORPHAN_GRACE"
DEFAULT_ORPHAN_GRACE = 600.0


def orphan_grace() -> float:
    """``BATCHPOOL_ORPHAN_GRACE`` seconds, or the default when unset or not a number."""
    try:
        grace = float(os.environ.get(ORPHAN_GRACE_ENV, DEFAULT_ORPHAN_GRACE))
    except ValueError:
        return DEFAULT_ORPHAN_GRACE
    return grace if grace >= 0 else DEFAULT_ORPHAN_GRACE


def process_started(pid: int) -> float | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), to tell a live
    process from a later one that reuses its pid; None where /proc is missing, or
    when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces: split after its ")". Then field 3
    # is the state (a zombie has ended, whoever reaps it) and field 22 the start time.
    fields = stat_line.rsplit(b")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    try:
        return float(fields[19])
    except ValueError:
        return None


def same_process(pid: object, pid_started: object) -> bool | None:
    """Whether process ``pid`` of this host is still the one that started at ``pid_started``
    (``process_started`` ticks); None when this cannot be told."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if process_started(os.getpid()) is None:  # no /proc here: start times are unknown
        return None
    now = process_started(pid)
    if now is None:
        return False
    if not isinstance(pid_started, (int, float)):
        return None
    return now == float(pid_started)


@functools.cache  # a process never changes boots; a warm worker asks every job
def boot_id() -> str | None:
    """This boot's id (Linux); None where the kernel does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def new_worker_token() -> str:
    return secrets.token_hex(16)


def token_digest(token: str) -> str:
    """What a start marker records of a worker's token."""
    return hashlib.sha256(f"batchpool-worker\0{token}".encode()).hexdigest()[:32]


def own_token_digest() -> str | None:
    """The digest of this process's worker token, if the local pool gave it one."""
    token = os.environ.get(WORKER_TOKEN_ENV)
    return token_digest(token) if token else None


def environ_token(pid: int) -> str | None:
    """The worker token in the environment process ``pid`` started with; None when it
    has none, or its environment cannot be read (another user's process)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except (OSError, ValueError):
        return None
    prefix = WORKER_TOKEN_ENV.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode("ascii", "replace")
    return None


def is_our_worker(
    host: str | None,
    pid: int | None,
    pid_started: float | None,
    boot: str | None,
    worker: str | None,
) -> bool:
    """Whether the process a start marker names is, right now, the local pool worker
    that wrote it: on this host and boot, started when the marker says, and holding
    the worker token whose digest the marker records."""
    if host != socket.gethostname() or not pid or pid <= 0 or pid_started is None or not worker:
        return False
    here = boot_id()
    if boot is not None and here is not None and boot != here:
        return False
    if process_started(pid) != pid_started:
        return False
    token = environ_token(pid)
    if token is None or token_digest(token) != worker:
        return False
    return process_started(pid) == pid_started  # still the same process after the read
