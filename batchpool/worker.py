"""``python -m batchpool.worker``: the code every job runs.

One job runs one chunk: read ``chunks/<chunk>.in``, check its signature, run its
calls, write ``results/<chunk>.<attempt>.out`` (one object, whatever happened)
and the captured output to ``logs/<chunk>.<attempt>.log``.

Two ways to start it:

- one job: ``python -m batchpool.worker --chunk ID --attempt N``, with the store
  and the run secret in the environment (``BATCHPOOL_STORE``,
  ``BATCHPOOL_RUN_SECRET``). This is what cluster engines run.
- a warm pool worker: ``python -m batchpool.worker --serve JOB_FD EVENT_FD``. The
  local backend keeps such processes and sends them the same arguments and
  environment a one-job worker would get, one job at a time, as JSON lines.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

from batchpool.backends.base import THREAD_ENV
from batchpool.serialization import (
    SECRET_ENV,
    SKIPPED,
    Entry,
    decode_chunk,
    encode_outcome,
    error_entry,
    get_serializer,
    seal,
    unseal,
    value_entry,
)
from batchpool.store import STORE_ENV, Store

__all__ = ["SECRET_ENV", "STORE_ENV", "THREAD_ENV", "main", "run_chunk", "run_job", "serve"]

_stores: dict[str, Store] = {}


def _store_from_env(env: Any) -> tuple[Store, bytes]:
    try:
        spec = env[STORE_ENV]
        secret = bytes.fromhex(env[SECRET_ENV])
    except KeyError as exc:
        raise SystemExit(
            f"batchpool.worker: {exc.args[0]} is not set; a job gets it from the executor "
            "that submitted it"
        ) from None
    store = _stores.get(spec)
    if store is None:
        store = _stores[spec] = Store.from_spec(spec)
    return store, secret


def _call_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"{name}()" if name else repr(fn)


def run_chunk(store: Store, secret: bytes, chunk_id: str, attempt: int) -> int:
    """Run one chunk and write its outcome; return how many calls it held."""
    started = time.time()
    key = store.chunk_key(chunk_id)
    header, groups = decode_chunk(unseal(secret, key, store.get(key)))
    serializer = get_serializer(header["serializer"])
    entries: list[Entry] = []
    for n_calls, payload, skip in groups:
        try:
            fn, calls = serializer.loads(payload)
        except BaseException as exc:
            entries.extend([error_entry(exc, serializer)] * n_calls)
            continue
        name = _call_name(fn)
        skipped = frozenset(skip)
        for index, (args, kwargs) in enumerate(calls):
            if index in skipped:
                entries.append((SKIPPED,))
                continue
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:  # SystemExit and KeyboardInterrupt fail this call only
                entries.append(error_entry(exc, serializer))
            else:
                entries.append(value_entry(value, serializer, name))
                del value  # the result must not outlive its pickled entry
    meta = {
        "chunk": chunk_id,
        "attempt": attempt,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started,
        "ended": time.time(),
    }
    result_key = store.result_key(chunk_id, attempt)
    store.put(result_key, seal(secret, result_key, encode_outcome(meta, entries)))
    return len(entries)


class _Capture:
    """The output of one job, captured from file descriptors 1 and 2 into a log file.

    In a pool worker the log file is the one the parent gave as stdout, which it
    reads when the worker dies. A one-job worker makes a temporary one and puts
    the original descriptors back after the job. Every job starts by pointing 1
    and 2 at the (emptied) log again, whatever a previous call did to them.
    """

    def __init__(self, own_file: bool) -> None:
        self._saved: tuple[int, int] | None = None
        if own_file:
            import tempfile

            fd, path = tempfile.mkstemp(prefix="batchpool-", suffix=".log")
            os.close(fd)
            self._log = os.open(path, os.O_RDWR | os.O_APPEND)  # appends after a truncate
            os.unlink(path)
            self._saved = (os.dup(1), os.dup(2))
        else:
            self._log = os.dup(1)

    def begin(self) -> None:
        _flush()
        os.dup2(self._log, 1)
        os.dup2(self._log, 2)
        os.ftruncate(self._log, 0)

    def end(self) -> bytes:
        _flush()
        size = os.fstat(self._log).st_size
        return os.pread(self._log, size, 0) if size else b""

    def restore(self) -> bytes:
        """Put back the original descriptors; return what was captured."""
        text = self.end()
        if self._saved is not None:
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            self._saved = None
        return text


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def run_job(args: Sequence[str], env: Any, capture: _Capture) -> None:
    """Run the job that ``args`` names (``--chunk ID --attempt N``), capturing its output."""
    parsed = _job_parser().parse_args(list(args))
    store, secret = _store_from_env(env)
    capture.begin()
    try:
        run_chunk(store, secret, parsed.chunk, parsed.attempt)
    finally:
        log = capture.end()
        if log:
            store.put(store.log_key(parsed.chunk, parsed.attempt), log)


def _job_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m batchpool.worker")
    parser.add_argument("--chunk", required=True, help="the chunk id to run")
    parser.add_argument("--attempt", type=int, required=True, help="this job's attempt number")
    return parser


# -- the warm pool worker -----------------------------------------------------------------


def _exit_when_orphaned(parent: int) -> None:
    # The pool's parent may be SIGKILLed: a worker must not outlive it.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def serve(job_fd: int, event_fd: int) -> None:
    """Run jobs sent by the local backend until it closes the job pipe."""
    threading.Thread(
        target=_exit_when_orphaned, args=(os.getppid(),), daemon=True, name="orphan-check"
    ).start()
    jobs = os.fdopen(job_fd, "rb")
    events = os.fdopen(event_fd, "wb", buffering=0)

    def send(message: dict[str, Any]) -> None:
        events.write(json.dumps(message).encode() + b"\n")

    hello = json.loads(jobs.readline())
    parent_path = hello["sys_path"]
    sys.path[:] = parent_path + [p for p in sys.path if p not in parent_path]
    capture = _Capture(own_file=False)
    send({"ready": os.getpid()})
    for line in jobs:
        message = json.loads(line)
        if message.get("stop"):
            break
        os.environ.update(message["env"])
        error = ""
        try:
            run_job(message["args"], message["env"], capture)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            _flush()
        send({"done": message["job"], "error": error})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    faulthandler.enable()
    if argv[:1] == ["--serve"]:
        serve(int(argv[1]), int(argv[2]))
        return 0
    capture = _Capture(own_file=True)
    error, status = "", 0
    try:
        run_job(argv, os.environ, capture)
    except SystemExit as exc:  # bad arguments (argparse said why) or a missing variable
        if isinstance(exc.code, int):
            status = exc.code
        else:
            error = str(exc.code)
    except BaseException:
        error = traceback.format_exc()
    finally:
        log = capture.restore()
    if log:  # the engine's own log of the job gets the calls' output too
        os.write(1, log)
    if error:  # the worker's own failure, after the calls' output, on stderr
        sys.stderr.write(error.rstrip("\n") + "\n")
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
