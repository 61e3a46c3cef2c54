"""Side-by-side benchmark: batchpool (local backend) vs ProcessPoolExecutor vs loky.

Run from the repository root::

    python benchmarks/bench_local.py              # full run, --repeat 3
    python benchmarks/bench_local.py --quick      # smaller sizes, a smoke check
    python benchmarks/bench_local.py --json out.json

Every executor is created and warmed (all of its workers started, and each kind
of call run) before anything is timed, so process start-up is excluded. All
three executors stay alive for the whole run and the measurements interleave:
in each repeat, each workload runs on every executor in turn, the order of the
executors rotating from one repeat to the next, so slow drift of the machine
hits all of them alike. All calls use each executor's default settings.

The table shows, per workload and executor, the BEST (minimum) wall time over
the repeats (``--stat median``: the median of the repeats). Round-trip medians
pool the single round trips of every repeat.

Executors are created, and shut down, in the order ProcessPoolExecutor, loky,
batchpool: see ``lifecycle`` in ``main``.

A measurement that gets no result within ``--hang-timeout`` seconds is recorded
as a hang (it is interrupted with SIGALRM, so the calls themselves carry no
timeout), its executor is abandoned and replaced by a fresh warmed one, and the
script exits with status 3 after printing the table. This is a script, not a
test: it checks the results are right, never how long they took.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import faulthandler
import importlib
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

# -- the workloads' functions: module level, so that every pool can import them --------


def tiny(x: int) -> int:
    return x + 1


def burn(iterations: int) -> int:
    """Burn CPU: a fixed loop, calibrated once in the parent to take ~50 ms."""
    acc = 0
    for i in range(iterations):
        acc = (acc + i * i) % 1_000_003
    return acc


def warm_sleep(seconds: float) -> int:
    """Used only to warm up: keeps a worker busy so the next call goes to another one."""
    time.sleep(seconds)
    return os.getpid()


# -- helpers -------------------------------------------------------------------------------


def _workloads_module() -> Any:
    """This file imported as ``bench_local``, so pickles refer to ``bench_local.tiny``.

    Run as a script, the functions above live in ``__main__``: stdlib fork workers
    would find them there, but cloudpickle (batchpool, loky) would pickle them by
    value. Imported as ``bench_local``, all three pools pickle them by reference.
    """
    if __name__ != "__main__":
        return sys.modules[__name__]
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("bench_local")


def calibrate_burn(target_s: float) -> int:
    """Iterations of ``burn`` that take ``target_s`` of CPU time in this process."""
    n = 10_000
    while True:
        t0 = time.process_time()
        burn(n)
        spent = time.process_time() - t0
        if spent > 0.02:
            break
        n *= 4
    best = spent
    for _ in range(4):  # the least disturbed measurement
        t0 = time.process_time()
        burn(n)
        best = min(best, time.process_time() - t0)
    return max(1, round(n * target_s / best))


def check(label: str, got: list[Any], expected: list[Any]) -> None:
    if got != expected:
        raise SystemExit(f"{label}: wrong results (first items {got[:5]} vs {expected[:5]})")


class Hang(Exception):
    """A measurement got no result in time."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ``Hang`` in the main thread if the block takes longer than ``seconds``."""
    if not hasattr(signal, "setitimer"):  # pragma: no cover - Windows: no protection
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- the executors -------------------------------------------------------------------------

EXECUTORS = ("batchpool", "stdlib", "loky")
TITLES = {"batchpool": "batchpool", "stdlib": "ProcessPoolExecutor", "loky": "loky"}


def make_executor(kind: str, workers: int) -> cf.Executor:
    if kind == "batchpool":
        from batchpool import BatchPoolExecutor

        return BatchPoolExecutor(max_workers=workers)
    if kind == "stdlib":
        return cf.ProcessPoolExecutor(max_workers=workers)
    if kind == "loky":
        import loky

        # A long idle timeout: loky must not retire its workers between measurements.
        return loky.get_reusable_executor(max_workers=workers, timeout=3600)
    raise ValueError(kind)


def warm_up(ex: cf.Executor, mod: Any, workers: int, burn_n: int) -> None:
    """Start every worker and run each kind of call, untimed."""
    # Calls that sleep longer than a dispatch takes keep each worker busy in turn,
    # so every worker is started and runs some.
    pids = set(ex.map(mod.warm_sleep, [0.3] * (2 * workers)))
    if len(pids) < workers:
        print(f"  note: warm-up reached {len(pids)} of {workers} workers", file=sys.stderr)
    for _ in range(2):
        check("warm-up map", list(ex.map(mod.tiny, range(200))), list(range(1, 201)))
        futures = [ex.submit(mod.tiny, i) for i in range(50)]
        check("warm-up submit", [f.result() for f in futures], list(range(1, 51)))
        for i in range(5):
            ex.submit(mod.tiny, i).result()
    list(ex.map(mod.burn, [burn_n // 10] * (2 * workers)))


def abandon(kind: str, ex: cf.Executor) -> None:
    """Let go of a hung executor without waiting for it; remove a batchpool run's folder."""
    with contextlib.suppress(Exception), deadline(10):
        ex.shutdown(wait=False, cancel_futures=True)
    path = str(getattr(ex, "run_url", "")).removeprefix("file://")
    if kind == "batchpool" and os.path.isabs(path):
        shutil.rmtree(path, ignore_errors=True)


def diagnose(kind: str, ex: cf.Executor) -> str:
    """For a hung batchpool executor: the local backend's jobs that no worker runs.

    Reads private attributes, for this message only; anything unexpected gives "".
    """
    if kind != "batchpool":
        return ""
    try:
        backend = ex.backend  # type: ignore[attr-defined]
        if not backend._lock.acquire(timeout=5):
            return "local backend: its lock is held for good"
        try:
            tracked = set(backend._jobs)
            queued = {job.id for job in backend._queue}
            running = {w.job.id for w in backend._workers if w.job is not None}
        finally:
            backend._lock.release()
        lost = sorted(tracked - queued - running)
        return (
            f"local backend: {len(tracked)} unfinished job(s), {len(queued)} queued, "
            f"{len(running)} running on a worker, {len(lost)} on no worker {lost}"
        )
    except Exception as exc:
        return f"(no diagnosis: {type(exc).__name__}: {exc})"


# -- the measurements: each returns wall seconds, and single samples where it has them -----

Measurement = Callable[..., tuple[float, list[float]]]


def w_map(ex: cf.Executor, mod: Any, n: int, **_: Any) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    results = list(ex.map(mod.tiny, range(n)))
    elapsed = time.perf_counter() - t0
    check("map", results, list(range(1, n + 1)))
    return elapsed, []


def w_submit(ex: cf.Executor, mod: Any, n: int, **_: Any) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    futures = [ex.submit(mod.tiny, i) for i in range(n)]
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - t0
    check("submit", results, list(range(1, n + 1)))
    return elapsed, []


def w_cpu(ex: cf.Executor, mod: Any, n: int, burn_n: int, **_: Any) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    results = list(ex.map(mod.burn, [burn_n] * n))
    elapsed = time.perf_counter() - t0
    check("cpu", results, [mod.burn_result] * n)
    return elapsed, []


def w_roundtrip(ex: cf.Executor, mod: Any, n: int, **_: Any) -> tuple[float, list[float]]:
    samples = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        result = ex.submit(mod.tiny, i).result()
        samples.append(time.perf_counter() - t)
        if result != i + 1:
            raise SystemExit(f"round trip: tiny({i}) returned {result}")
    return time.perf_counter() - t0, samples


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke check")
    parser.add_argument("--repeat", type=int, default=None, help="runs per measurement (3)")
    parser.add_argument(
        "--stat",
        choices=("min", "median"),
        default="min",
        help="how the repeats are summed up in the table (default: min, the best run)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    parser.add_argument(
        "--only", nargs="+", choices=EXECUTORS, default=list(EXECUTORS), help="these executors"
    )
    parser.add_argument(
        "--hang-timeout",
        type=float,
        default=20.0,
        help="seconds after which one measurement counts as hung (default 20)",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3
    if args.repeat < 1 or args.workers < 1:
        parser.error("--repeat and --workers must be at least 1")
    return args


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f} ms"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    mod = _workloads_module()
    workers = args.workers
    sizes = {
        "map": 1_000 if args.quick else 10_000,
        "submit": 200 if args.quick else 1_000,
        "cpu": 8 if args.quick else 40,
        "roundtrip": 20 if args.quick else 50,
    }
    burn_ms = 50
    burn_n = calibrate_burn(burn_ms / 1000)
    mod.burn_result = mod.burn(burn_n)

    # key, label, target (batchpool / stdlib), measurement
    workloads: list[tuple[str, str, str, Measurement]] = [
        ("map", f"map of {sizes['map']:,} tiny calls", "<= 1.0x stdlib", w_map),
        ("submit", f"{sizes['submit']:,} submits of a tiny call", "<= 2.0x stdlib", w_submit),
        ("cpu", f"map of {sizes['cpu']} x {burn_ms} ms CPU", "<= 1.10x stdlib", w_cpu),
        ("roundtrip", f"{sizes['roundtrip']} sequential round trips, total", "-", w_roundtrip),
    ]
    targets = {"map": 1.0, "submit": 2.0, "cpu": 1.10}
    rt_target_ms = 5.0
    summary = "best (min)" if args.stat == "min" else "median"

    print("# batchpool local benchmark")
    print()
    print(f"- command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"- Python {platform.python_version()} ({platform.python_implementation()}) "
        f"on {platform.platform()}"
    )
    print(f"- os.cpu_count(): {os.cpu_count()}; max_workers for every executor: {workers}")
    versions = []
    for name in ("batchpool", "loky", "cloudpickle"):
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception:
            versions.append(f"{name} ?")
    print(f"- {', '.join(versions)}; stdlib start method: {multiprocessing.get_start_method()}")
    print(f"- burn loop: {burn_n:,} iterations = ~{burn_ms} ms of CPU (calibrated here)")
    print(
        f"- repeats: {args.repeat}; the table shows the {summary} run; "
        "executors warmed first, measurements interleaved"
    )

    # The stdlib pool forks its workers (on Linux), and a forked worker keeps copies of
    # every file descriptor of this process, batchpool's worker pipes included: then
    # batchpool's shutdown waits until that worker exits (see benchmarks/README.md).
    # So the stdlib pool is made first and shut down first.
    lifecycle = [k for k in ("stdlib", "loky", "batchpool") if k in args.only]
    executors: dict[str, cf.Executor] = {}
    abandoned: list[cf.Executor] = []
    hangs: list[dict[str, Any]] = []

    def fresh(kind: str) -> None:
        """Create and warm ``kind``'s executor, replacing one that hung in warm-up."""
        for attempt in range(1, 4):
            t0 = time.perf_counter()
            ex = make_executor(kind, workers)
            try:
                with deadline(args.hang_timeout):
                    warm_up(ex, mod, workers, burn_n)
            except Hang:
                why = diagnose(kind, ex)
                hangs.append(
                    {"executor": kind, "workload": "warm-up", "attempt": attempt, "state": why}
                )
                print(f"HANG: {TITLES[kind]} warm-up (attempt {attempt}); {why}", file=sys.stderr)
                abandon(kind, ex)
                abandoned.append(ex)
                continue
            executors[kind] = ex
            print(f"warmed {TITLES[kind]} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
            return
        raise SystemExit(f"{TITLES[kind]} hung in every warm-up")

    raw: dict[str, dict[str, list[float]]] = {w[0]: {k: [] for k in args.only} for w in workloads}
    rt_samples: dict[str, list[float]] = {k: [] for k in args.only}
    try:
        for kind in lifecycle:
            fresh(kind)
        if "batchpool" in executors:
            print(f"- batchpool storage: {executors['batchpool'].run_url}")  # type: ignore[attr-defined]
        print()

        order = list(args.only)
        for rep in range(args.repeat):
            rotated = order[rep % len(order) :] + order[: rep % len(order)]
            for key, label, _, measure in workloads:
                for kind in rotated:
                    try:
                        with deadline(args.hang_timeout):
                            elapsed, samples = measure(
                                executors[kind], mod, n=sizes[key], burn_n=burn_n
                            )
                    except Hang:
                        why = diagnose(kind, executors[kind])
                        hangs.append(
                            {"executor": kind, "workload": key, "repeat": rep + 1, "state": why}
                        )
                        print(
                            f"HANG: {TITLES[kind]} {label}, repeat {rep + 1}: no result in "
                            f"{args.hang_timeout:g} s; replacing the executor; {why}",
                            file=sys.stderr,
                        )
                        abandon(kind, executors[kind])
                        abandoned.append(executors.pop(kind))
                        fresh(kind)
                        continue
                    raw[key][kind].append(elapsed)
                    rt_samples[kind].extend(samples)
                    print(
                        f"repeat {rep + 1}/{args.repeat}  {label:<36} {TITLES[kind]:<20}"
                        f" {elapsed:8.3f} s",
                        file=sys.stderr,
                    )
    finally:
        for kind in [k for k in lifecycle if k in executors]:
            ex = executors[kind]
            t0 = time.perf_counter()
            try:
                with deadline(args.hang_timeout):
                    ex.shutdown(wait=True)
            except Hang:
                why = diagnose(kind, ex)
                hangs.append({"executor": kind, "workload": "shutdown", "state": why})
                print(f"HANG: {TITLES[kind]} shutdown; {why}", file=sys.stderr)
                abandon(kind, ex)
                abandoned.append(ex)
                continue
            print(f"shut down {TITLES[kind]} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)

    summarise: Callable[[list[float]], float] = min if args.stat == "min" else statistics.median

    def stat(key: str, kind: str) -> float | None:
        values = raw[key].get(kind)
        return summarise(values) if values else None

    def rt_median(kind: str) -> float | None:
        values = rt_samples.get(kind)
        return statistics.median(values) if values else None

    header = (
        "| workload | target | batchpool | ProcessPoolExecutor | loky "
        "| batchpool / stdlib | loky / stdlib | batchpool meets target |"
    )
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for key, label, target, _ in workloads:
        b, s, lk = stat(key, "batchpool"), stat(key, "stdlib"), stat(key, "loky")
        met = "-"
        if key in targets and b is not None and s:
            met = "yes" if b / s <= targets[key] else f"NO ({b / s:.2f}x)"
        print(
            f"| {label} | {target} | {fmt_s(b)} | {fmt_s(s)} | {fmt_s(lk)} "
            f"| {ratio(b, s)} | {ratio(lk, s)} | {met} |"
        )
    b, s, lk = rt_median("batchpool"), rt_median("stdlib"), rt_median("loky")
    met = "-" if b is None else ("yes" if b * 1000 <= rt_target_ms else f"NO ({b * 1000:.2f} ms)")
    print(
        f"| round trip, median | <= {rt_target_ms:g} ms | {fmt_ms(b)} | {fmt_ms(s)} "
        f"| {fmt_ms(lk)} | {ratio(b, s)} | {ratio(lk, s)} | {met} |"
    )
    print()
    print(f"Single round trips ({sizes['roundtrip']} per repeat, all repeats pooled):")
    print()
    print("| executor | median | p10 | p90 | min | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in args.only:
        values = sorted(rt_samples[kind])
        if not values:
            continue
        deciles = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
        print(
            f"| {TITLES[kind]} | {fmt_ms(statistics.median(values))} | {fmt_ms(deciles[0])} "
            f"| {fmt_ms(deciles[-1])} | {fmt_ms(values[0])} | {fmt_ms(values[-1])} |"
        )
    print()
    print("Every repeat (seconds, in run order):")
    print()
    for key, label, _, _ in workloads:
        runs = "; ".join(
            f"{TITLES[k]} " + (", ".join(f"{v:.3f}" for v in raw[key][k]) or "-") for k in args.only
        )
        print(f"- {label}: {runs}")
    if hangs:
        print()
        print(f"**{len(hangs)} hang(s)** (no result in {args.hang_timeout:g} s; not in the table):")
        for hang in hangs:
            print(f"- {hang}")

    if args.json:
        dump = {
            "command": [sys.executable, *sys.argv],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "workers": workers,
            "repeat": args.repeat,
            "stat": args.stat,
            "quick": args.quick,
            "sizes": sizes,
            "burn_iterations": burn_n,
            "burn_ms": burn_ms,
            "targets": {
                **{key: f"<= {value}x stdlib" for key, value in targets.items()},
                "roundtrip_median": f"<= {rt_target_ms} ms",
            },
            "seconds": raw,
            "roundtrip_samples_seconds": rt_samples,
            "hangs": hangs,
        }
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=2)
        print(f"\nraw numbers written to {args.json}")

    status = 3 if hangs else 0
    if abandoned:
        # A hung batchpool executor's watcher never ends, and batchpool's exit hook
        # would wait for it forever: leave without running exit hooks.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
