"""Side-by-side benchmark at scale: batchpool vs ProcessPoolExecutor vs loky, time and memory.

Run from the repository root::

    python benchmarks/bench_scale.py                         # maps of 10k and 1M, 1M submits
    python benchmarks/bench_scale.py --sizes 10k,1M,10M      # also the 10M map (long)
    python benchmarks/bench_scale.py --sizes 10k --submits 10000   # a smoke check
    python benchmarks/bench_scale.py --json scale.json       # also dump every raw number

Workloads, all of the tiny call ``inc(x) = x + 1`` (module level here, pickled by
reference as ``bench_scale.inc`` by all three pools):

- maps of ``--sizes`` calls: ``ex.map(inc, range(n))``; from ``--generator-from``
  calls on (10M) the input is a generator, ``(i for i in range(n))``, and batchpool
  gets ``buffersize=``. Python 3.11's ``ProcessPoolExecutor.map`` (and loky's) has no
  ``buffersize`` and reads the whole input at once: its memory says so.
- ``--submits`` single ``ex.submit(inc, i)``, then every ``.result()``.
- ``--roundtrips`` sequential ``ex.submit(inc, i).result()``: their median, in ms.

Contenders, each with ``max_workers=--workers`` (2): batchpool with default settings
(``BatchPoolExecutor(max_workers=2, storage=<temporary folder>)``), the stdlib
``ProcessPoolExecutor`` at ``chunksize=1`` and at the best of ``--chunksizes``
(100, 1,000, 10,000), and ``loky.get_reusable_executor`` at the best of the same
chunksizes. Submits and round trips have no chunksize.

Every measurement runs in a FRESH subprocess (``bench_scale.py --one CONTENDER
CASE SIZE``), so no contender's memory pollutes another's. In it, the executor is
created and warmed (every worker started, the same kind of call run once on a
small input) before anything is timed, so process start-up is not measured. A map
of at most 100,000 calls takes milliseconds: it is timed 7 times back to back
(``--map-repeats``) and the median kept, for every contender alike. The
client's peak RSS growth is the peak resident set size during the timed operation
(Linux: ``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs``
just before) minus the RSS right before it. Map results are checked one by one as
they arrive and not kept, so the growth is the executor's own, not a list of
results (the submits keep their futures, as a caller of ``submit`` must).

A subprocess still running after ``--timeout`` seconds (900, start-up and warm-up
included), or whose client's RSS exceeds ``--max-rss-mb`` (8,192 MiB), is killed with
its worker processes and reported as such; the script then exits with status 3.
The output is a Markdown table ready to paste; this is a script, not a test: it
checks the results are right, never how long they took.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import gc
import importlib
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

# -- the workload's functions: module level, so that every pool can import them ---------


def inc(x: int) -> int:
    return x + 1


def warm_sleep(seconds: float) -> int:
    """Used only to warm up: keeps a worker busy so the next call goes to another one."""
    time.sleep(seconds)
    return os.getpid()


def _workloads_module() -> Any:
    """This file imported as ``bench_scale``, so pickles refer to ``bench_scale.inc``.

    Run as a script, the functions above live in ``__main__``: cloudpickle (batchpool,
    loky) would pickle them by value. Imported as ``bench_scale``, all three pools
    pickle them by reference, as in ``bench_local.py``.
    """
    if __name__ != "__main__":
        return sys.modules[__name__]
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("bench_scale")


# -- memory of this process ------------------------------------------------------------------


def status_kb(field_name: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status``; None off Linux."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _maxrss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS


class PeakRSS:
    """The peak RSS of this process during a ``with`` block, above its RSS at the start.

    Methods, best first: ``VmHWM`` reset through ``/proc/self/clear_refs`` (Linux 4.0+,
    exact); ``VmRSS`` sampled every 2 ms by a thread (may miss a short spike); the
    growth of ``ru_maxrss`` (counts only what exceeds every earlier peak).
    """

    def __init__(self) -> None:
        self.method = ""
        self.baseline_kb = 0
        self.peak_kb = 0
        self.end_kb = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        gc.collect()
        rss = status_kb("VmRSS")
        if rss is None:
            self.method = "ru_maxrss growth (no /proc: counts only past earlier peaks)"
            self.baseline_kb = _maxrss_kb()
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM, reset via /proc/self/clear_refs"
        except OSError:
            self.method = "VmRSS sampled every 2 ms"
            self._sampler = threading.Thread(target=self._sample, daemon=True)
        self.baseline_kb = status_kb("VmRSS") or rss
        self.peak_kb = self.baseline_kb
        if self._sampler is not None:
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_kb = max(self.peak_kb, status_kb("VmRSS") or 0)

    def __exit__(self, *exc_info: Any) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        if self.method.startswith("ru_maxrss"):
            self.peak_kb = _maxrss_kb()
            self.end_kb = self.peak_kb
            return
        self.end_kb = status_kb("VmRSS") or 0
        hwm = (status_kb("VmHWM") or 0) if self._sampler is None else 0
        self.peak_kb = max(self.peak_kb, hwm, self.end_kb)

    @property
    def growth_mib(self) -> float:
        return max(0, self.peak_kb - self.baseline_kb) / 1024


# -- one measurement, in the subprocess ----------------------------------------------------

CONTENDERS = ("batchpool", "stdlib", "loky")
TITLES = {"batchpool": "batchpool", "stdlib": "ProcessPoolExecutor", "loky": "loky"}
CASES = ("map", "genmap", "submit", "roundtrip")
#: Maps of at most this many calls are timed SMALL_MAP_REPEATS times (their median).
SMALL_MAP, SMALL_MAP_REPEATS = 100_000, 7
RESULT_PREFIX = "RESULT "


def make_executor(kind: str, workers: int, storage: str | None) -> cf.Executor:
    if kind == "batchpool":
        from batchpool import BatchPoolExecutor

        return BatchPoolExecutor(max_workers=workers, storage=storage)
    if kind == "stdlib":
        return cf.ProcessPoolExecutor(max_workers=workers)
    if kind == "loky":
        import loky

        # A long idle timeout: loky must not retire its workers during the run.
        return loky.get_reusable_executor(max_workers=workers, timeout=3600)
    raise ValueError(kind)


def run_map(
    ex: cf.Executor,
    mod: Any,
    kind: str,
    n: int,
    *,
    generator: bool,
    chunksize: int | None,
    buffersize: int,
) -> float:
    """Wall seconds of ``ex.map(inc, ...)`` of ``n`` calls, until the last result is in."""
    items: Iterable[int] = (i for i in range(n)) if generator else range(n)
    kwargs: dict[str, Any] = {}
    if kind == "batchpool":
        if generator:
            kwargs["buffersize"] = buffersize
        if chunksize is not None:
            kwargs["chunksize"] = chunksize
    else:
        kwargs["chunksize"] = chunksize or 1
    expected = 1
    t0 = time.perf_counter()
    for result in ex.map(mod.inc, items, **kwargs):
        if result != expected:
            raise SystemExit(f"map: item {expected - 1} gave {result!r}, not {expected}")
        expected += 1
    elapsed = time.perf_counter() - t0
    if expected != n + 1:
        raise SystemExit(f"map: {expected - 1} results for {n} calls")
    return elapsed


def run_submit(ex: cf.Executor, mod: Any, n: int) -> float:
    """Wall seconds of ``n`` submits and then every ``.result()``."""
    t0 = time.perf_counter()
    futures = [ex.submit(mod.inc, i) for i in range(n)]
    for i, future in enumerate(futures):
        result = future.result()
        if result != i + 1:
            raise SystemExit(f"submit: inc({i}) returned {result!r}")
    elapsed = time.perf_counter() - t0
    del futures
    return elapsed


def run_roundtrips(ex: cf.Executor, mod: Any, n: int) -> tuple[float, list[float]]:
    """Total seconds and single samples of ``n`` sequential ``submit(...).result()``."""
    samples = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        result = ex.submit(mod.inc, i).result()
        samples.append(time.perf_counter() - t)
        if result != i + 1:
            raise SystemExit(f"round trip: inc({i}) returned {result!r}")
    return time.perf_counter() - t0, samples


def warm_up(ex: cf.Executor, mod: Any, args: argparse.Namespace, kind: str, case: str) -> None:
    """Start every worker, then run the timed kind of call once on a small input."""
    pids = set(ex.map(mod.warm_sleep, [0.3] * (2 * args.workers)))
    if len(pids) < args.workers:
        print(f"note: warm-up reached {len(pids)} of {args.workers} workers", file=sys.stderr)
    if case in ("map", "genmap"):
        run_map(
            ex,
            mod,
            kind,
            2_000,
            generator=case == "genmap",
            chunksize=args.chunksize,
            buffersize=args.buffersize,
        )
    elif case == "submit":
        run_submit(ex, mod, 200)
    run_roundtrips(ex, mod, 10)


def run_one(args: argparse.Namespace) -> int:
    """The ``--one CONTENDER CASE SIZE`` subprocess: print one RESULT line of JSON."""
    kind, case, size_text = args.one
    if kind not in CONTENDERS or case not in CASES:
        raise SystemExit(f"--one: unknown contender {kind!r} or case {case!r}")
    size = parse_size(size_text)
    mod = _workloads_module()
    storage = tempfile.mkdtemp(prefix="bench_scale-store-") if kind == "batchpool" else None
    t0 = time.perf_counter()
    ex = make_executor(kind, args.workers, storage)
    try:
        warm_up(ex, mod, args, kind, case)
        warm_s = time.perf_counter() - t0
        samples: list[float] = []
        with PeakRSS() as mem:
            if case in ("map", "genmap"):
                # A map of milliseconds is timed several times, back to back, and its
                # median kept: one sample of it says more about the machine than the pool.
                repeats = args.map_repeats or (SMALL_MAP_REPEATS if size <= SMALL_MAP else 1)
                samples = [
                    run_map(
                        ex,
                        mod,
                        kind,
                        size,
                        generator=case == "genmap",
                        chunksize=args.chunksize,
                        buffersize=args.buffersize,
                    )
                    for _ in range(repeats)
                ]
                seconds = statistics.median(samples)
            elif case == "submit":
                seconds = run_submit(ex, mod, size)
            else:
                seconds, samples = run_roundtrips(ex, mod, size)
        result = {
            "contender": kind,
            "case": case,
            "size": size,
            "chunksize": args.chunksize,
            "buffersize": args.buffersize if kind == "batchpool" and case == "genmap" else None,
            "seconds": seconds,
            "roundtrip_median_s": statistics.median(samples) if case == "roundtrip" else None,
            "samples_s": samples,
            "rss_baseline_mib": mem.baseline_kb / 1024,
            "rss_peak_mib": mem.peak_kb / 1024,
            "rss_end_mib": mem.end_kb / 1024,
            "rss_growth_mib": mem.growth_mib,
            "rss_method": mem.method,
            "startup_and_warmup_s": warm_s,
            "storage": storage,
        }
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    finally:
        t1 = time.perf_counter()
        ex.shutdown(wait=True)
        print(f"shutdown took {time.perf_counter() - t1:.2f} s", file=sys.stderr)
        if storage is not None:
            shutil.rmtree(storage, ignore_errors=True)
    return 0


# -- the parent: one subprocess per measurement --------------------------------------------


@dataclass
class Run:
    contender: str
    case: str
    size: int
    chunksize: int | None
    status: str = "ok"  # ok, timeout, rss-limit, error, not installed
    seconds: float | None = None
    rss_growth_mib: float | None = None
    roundtrip_median_s: float | None = None
    wall_s: float = 0.0  # the whole subprocess, start-up and shutdown included
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (batchpool's workers start sessions of their own)."""
    children = _children_map()
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the subprocess, its process group and every process it started."""
    below = descendants(proc.pid)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in [proc.pid, *below]:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def run_child(args: argparse.Namespace, kind: str, case: str, size: int, cs: int | None) -> Run:
    run = Run(kind, case, size, cs)
    if kind == "loky" and importlib.util.find_spec("loky") is None:
        run.status, run.note = "not installed", "pip install loky"
        return run
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        kind,
        case,
        str(size),
        "--workers",
        str(args.workers),
        "--buffersize",
        str(args.buffersize),
        "--map-repeats",
        str(args.map_repeats),
    ]
    if cs is not None:
        cmd += ["--chunksize", str(cs)]
    # Every temporary folder of the run (batchpool's store and worker logs, loky's)
    # goes below the parent's, removed at the end even if the subprocess was killed.
    env = dict(os.environ, TMPDIR=args.tmp_root)
    limit_kb = args.max_rss_mb * 1024
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    out, err = "", ""
    killed = ""
    while True:
        try:
            out, err = proc.communicate(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - t0
            rss = status_kb("VmRSS", proc.pid) or 0
            if elapsed > args.timeout:
                killed = f"timeout (> {args.timeout:g} s)"
            elif rss > limit_kb:
                killed = f"client RSS > {args.max_rss_mb:,} MiB after {elapsed:.0f} s"
            if killed:
                kill_tree(proc)
                out, err = proc.communicate()
                break
    run.wall_s = time.monotonic() - t0
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if lines:
        run.result = json.loads(lines[-1][len(RESULT_PREFIX) :])
        run.seconds = run.result["seconds"]
        run.rss_growth_mib = run.result["rss_growth_mib"]
        run.roundtrip_median_s = run.result["roundtrip_median_s"]
        if killed:
            run.note = f"measured, then killed at shutdown: {killed}"
        elif proc.returncode != 0:
            run.note = f"measured, then exit status {proc.returncode}"
    else:
        if killed:
            run.status = "timeout" if killed.startswith("timeout") else "rss-limit"
            run.note = killed
        else:
            run.status = "error"
            tail = err.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            run.note = tail[0][:200]
    if run.status != "ok" or run.note:
        run.result["stderr_tail"] = err.strip().splitlines()[-20:]
    return run


# -- arguments and output --------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``10k``, ``1M``, ``10_000_000`` or ``2,000`` as a number."""
    t = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(t[-1:].lower(), 1)
    if scale != 1:
        t = t[:-1]
    try:
        value = round(float(t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("10k,1M"),
        help="map sizes, comma separated (default 10k,1M; all: 10k,1M,10M; '' for none)",
    )
    parser.add_argument(
        "--submits", type=parse_size, default=1_000_000, help="single submits (1M; 0: skip)"
    )
    parser.add_argument(
        "--roundtrips", type=parse_size, default=200, help="sequential round trips (200; 0: skip)"
    )
    parser.add_argument(
        "--chunksizes",
        type=parse_sizes,
        default=[100, 1_000, 10_000],
        help="chunksizes tried for the 'best' of stdlib and loky (100,1000,10000)",
    )
    parser.add_argument(
        "--generator-from",
        type=parse_size,
        default=10_000_000,
        help="maps of this many calls or more take a generator (default 10M)",
    )
    parser.add_argument(
        "--buffersize",
        type=int,
        default=64,
        help="batchpool's map buffersize (in chunks) for generator input (64)",
    )
    parser.add_argument("--workers", type=int, default=2, help="max_workers of every pool (2)")
    parser.add_argument(
        "--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), help="these pools"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per measurement, the best is shown (1)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess (900)")
    parser.add_argument(
        "--max-rss-mb",
        type=int,
        default=8192,
        help="kill a client whose RSS exceeds this many MiB (8192)",
    )
    parser.add_argument("--tmp", metavar="DIR", help="where the temporary folders go")
    parser.add_argument(
        "--map-repeats",
        type=int,
        default=0,
        help=f"in each run, time a map this many times and keep the median "
        f"({SMALL_MAP_REPEATS} up to {SMALL_MAP:,} calls, else 1)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every raw number here")
    parser.add_argument("--one", nargs=3, metavar=("CONTENDER", "CASE", "SIZE"), help="internal")
    parser.add_argument("--chunksize", type=int, help="internal, with --one")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.repeat < 1 or args.buffersize < 1:
        parser.error("--workers, --repeat and --buffersize must be at least 1")
    if any(cs < 1 for cs in args.chunksizes):
        parser.error("--chunksizes must be at least 1")
    return args


def fmt_count(n: int) -> str:
    for scale, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= scale and n % scale == 0:
            return f"{n // scale:,}{suffix}"
    return f"{n:,}"


def case_label(case: str, size: int, buffersize: int) -> str:
    if case == "map":
        return f"map of {fmt_count(size)}"
    if case == "genmap":
        return f"map of {fmt_count(size)}, generator (batchpool buffersize={buffersize})"
    if case == "submit":
        return f"{fmt_count(size)} submits"
    return f"round trip, median of {size:,}"


def best(runs: list[Run]) -> Run | None:
    ok = [r for r in runs if r.status == "ok" and value(r) is not None]
    return min(ok, key=lambda r: value(r) or 0.0) if ok else None


def value(run: Run) -> float | None:
    """What the table compares: wall seconds, or for round trips the median."""
    return run.roundtrip_median_s if run.case == "roundtrip" else run.seconds


def fmt_time(run: Run | None, runs: list[Run], with_cs: bool = False) -> str:
    if run is None:
        if not runs:
            return "-"
        return "; ".join(sorted({r.note if r.status != "error" else "error" for r in runs}))
    v = value(run)
    if v is None:
        return "-"
    if run.case == "roundtrip":
        text = f"{v * 1000:.2f} ms"
    else:
        text = f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if with_cs and run.chunksize is not None:
        text += f" (cs {run.chunksize:,})"
    return text


def fmt_ratio(run: Run | None, ref: Run | None) -> str:
    a = None if run is None else value(run)
    b = None if ref is None else value(ref)
    return "-" if a is None or not b else f"{a / b:.2f}x"


def fmt_mib(run: Run | None, runs: list[Run]) -> str:
    if run is not None and run.rss_growth_mib is not None:
        return f"{run.rss_growth_mib:,.1f}"
    if any(r.status == "rss-limit" for r in runs):
        return "> limit"
    return "-"


def versions() -> str:
    found = []
    for name in ("batchpool", "loky", "cloudpickle"):
        try:
            found.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        return run_one(args)

    # (case, size, contender, chunksize) in run order; "cs1" is the stdlib at chunksize=1.
    plan: list[tuple[str, int, str, int | None]] = []
    for size in args.sizes:
        case = "genmap" if size >= args.generator_from else "map"
        if "stdlib" in args.only:
            plan.append((case, size, "stdlib", 1))
            plan += [(case, size, "stdlib", cs) for cs in args.chunksizes]
        if "loky" in args.only:
            plan += [(case, size, "loky", cs) for cs in args.chunksizes]
        if "batchpool" in args.only:
            plan.append((case, size, "batchpool", None))
    for case, n in (("submit", args.submits), ("roundtrip", args.roundtrips)):
        if n > 0:
            plan += [(case, n, kind, None) for kind in ("stdlib", "loky", "batchpool")]
    plan = [p for p in plan if p[2] in args.only]

    print("# batchpool scale benchmark")
    print()
    print(f"- command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"- Python {platform.python_version()} ({platform.python_implementation()}) "
        f"on {platform.platform()}"
    )
    print(f"- os.cpu_count(): {os.cpu_count()}; max_workers for every executor: {args.workers}")
    print(f"- {versions()}; stdlib start method: {multiprocessing.get_start_method()}")
    print(
        "- one fresh subprocess per measurement, executor warmed first; "
        f"best of {args.repeat} run(s); timeout {args.timeout:g} s, "
        f"client RSS limit {args.max_rss_mb:,} MiB"
    )

    tmp_root = tempfile.mkdtemp(prefix="bench_scale-", dir=args.tmp)
    args.tmp_root = tmp_root
    print(f"- temporary folders (batchpool's storage among them) under {tmp_root}")
    runs: list[Run] = []
    try:
        for case, size, kind, cs in plan:
            for rep in range(args.repeat):
                run = run_child(args, kind, case, size, cs)
                runs.append(run)
                shown = fmt_time(run if run.status == "ok" else None, [run])
                mib = fmt_mib(run if run.status == "ok" else None, [run])
                print(
                    f"{case_label(case, size, args.buffersize):<54} {TITLES[kind]:<20} "
                    f"cs={cs if cs is not None else '-':<6} run {rep + 1}: {shown:>14}, "
                    f"RSS +{mib} MiB ({run.wall_s:.1f} s in all) {run.note}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)

    method = next((r.result.get("rss_method") for r in runs if r.result.get("rss_method")), "?")
    print(f"- client RSS growth: peak during the timed operation minus RSS before it ({method})")
    print()
    print(
        "| case | batchpool | / stdlib best | RSS +MiB "
        "| stdlib cs=1 | / stdlib best | RSS +MiB "
        "| stdlib best | RSS +MiB "
        "| loky best | / stdlib best | RSS +MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cases = list(dict.fromkeys((case, size) for case, size, _, _ in plan))
    for case, size in cases:
        mine = [r for r in runs if (r.case, r.size) == (case, size)]

        def pick(kind: str, chunksizes: list[int | None], group: list[Run] = mine) -> list[Run]:
            return [r for r in group if r.contender == kind and r.chunksize in chunksizes]

        chunked = case in ("map", "genmap")
        many: list[int | None] = list(args.chunksizes) if chunked else [None]
        bp_runs = pick("batchpool", [None])
        s1_runs = pick("stdlib", [1]) if chunked else []
        sb_runs = pick("stdlib", many)
        lk_runs = pick("loky", many)
        bp, s1, sb, lk = best(bp_runs), best(s1_runs), best(sb_runs), best(lk_runs)
        print(
            f"| {case_label(case, size, args.buffersize)} "
            f"| {fmt_time(bp, bp_runs)} | {fmt_ratio(bp, sb)} | {fmt_mib(bp, bp_runs)} "
            f"| {fmt_time(s1, s1_runs)} | {fmt_ratio(s1, sb)} | {fmt_mib(s1, s1_runs)} "
            f"| {fmt_time(sb, sb_runs, with_cs=chunked)} | {fmt_mib(sb, sb_runs)} "
            f"| {fmt_time(lk, lk_runs, with_cs=chunked)} | {fmt_ratio(lk, sb)} "
            f"| {fmt_mib(lk, lk_runs)} |"
        )
    print()
    print(
        "Times are wall seconds of the timed operation (round trips: the median of the "
        "single ones); ratios are to the stdlib's best. Submits and round trips have no "
        "chunksize: their stdlib column is plain `ProcessPoolExecutor.submit`."
    )
    print()
    print("Every run:")
    print()
    for run in runs:
        cs_text = "" if run.chunksize is None else f", chunksize {run.chunksize:,}"
        if run.status == "ok":
            text = (
                f"{fmt_time(run, [run])}, RSS +{fmt_mib(run, [run])} MiB "
                f"(baseline {run.result['rss_baseline_mib']:,.1f} MiB)"
            )
        else:
            text = run.note if run.note.startswith(run.status) else f"{run.status}: {run.note}"
        note = f"; {run.note}" if run.status == "ok" and run.note else ""
        label = case_label(run.case, run.size, args.buffersize)
        print(f"- {label}, {TITLES[run.contender]}{cs_text}: {text}{note}")
    failed = [r for r in runs if r.status not in ("ok", "not installed")]
    if failed:
        print()
        print(f"**{len(failed)} run(s) without a result** (see above; stderr tails in --json).")

    if args.json:
        dump = {
            "command": [sys.executable, *sys.argv],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "versions": versions(),
            "settings": {
                k: v for k, v in vars(args).items() if k not in ("one", "chunksize", "tmp_root")
            },
            "runs": [asdict(r) for r in runs],
        }
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=2)
        print(f"\nraw numbers written to {args.json}")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
