"""What ``canary=`` costs: a 10,000-call map with and without one, side by side.

Run from the repository root::

    python benchmarks/bench_canary.py                       # local pool, 2 workers
    python benchmarks/bench_canary.py --calls 10000 --canary 10 --repeat 3
    python benchmarks/bench_canary.py --backend slurm       # needs `bash ci/slurm.sh`

In one process, on one warm executor (``max_workers=2`` locally), interleaved, best of
``--repeat``: ``ProcessPoolExecutor.map`` at its default chunksize and at 1,250 (its
best here: 4 chunks per worker), batchpool's plain ``map``, and ``map(...,
canary=N)``, for two workloads: tiny calls (``abs``) and calls that sleep 1 ms. The
canary's cost is one round trip of its own jobs before the rest is submitted: the
ratio column is to batchpool's plain map. A script, not a test: it checks the
results, never asserts times.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchpool import BatchPoolExecutor


def sleep_1ms(x: int) -> int:
    time.sleep(0.001)
    return x


def best(fn: Callable[[], Any], repeat: int, expected: Any) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        assert fn() == expected
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--canary", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", default="local", choices=["local", "slurm"])
    parser.add_argument("--storage", default="/tmp/bench-canary")
    args = parser.parse_args()
    n, canary = args.calls, args.canary
    items = list(range(n))
    options: dict[str, Any] = {"storage": args.storage}
    if args.backend == "local":
        options["max_workers"] = 2
    else:
        from batchpool.backends.slurm import SlurmBackend

        options["backend"] = SlurmBackend(log_dir=Path(args.storage) / "slurm-logs")
    rows = []
    with (
        cf.ProcessPoolExecutor(max_workers=2) as stdlib,
        BatchPoolExecutor(**options) as bpe,
    ):
        list(stdlib.map(abs, range(100)))  # warm both
        list(bpe.map(abs, range(100)))
        for name, fn in (("tiny calls (abs)", abs), ("1 ms calls", sleep_1ms)):
            want = list(map(abs, items))
            timings: dict[str, float] = {}
            cases: dict[str, Callable[[], Any]] = {
                "ProcessPoolExecutor, default chunksize": lambda f=fn: list(stdlib.map(f, items)),
                "ProcessPoolExecutor, chunksize=1250": lambda f=fn: list(
                    stdlib.map(f, items, chunksize=1250)
                ),
                "batchpool map": lambda f=fn: list(bpe.map(f, items)),
                f"batchpool map, canary={canary}": lambda f=fn: list(
                    bpe.map(f, items, canary=canary)
                ),
            }
            if args.backend != "local":  # the stdlib runs on this machine only
                cases = {k: v for k, v in cases.items() if k.startswith("batchpool")}
            for _ in range(args.repeat):  # interleaved: each case once per round
                for case, run in cases.items():
                    timings[case] = min(timings.get(case, float("inf")), best(run, 1, want))
            plain = timings["batchpool map"]
            for case, seconds in timings.items():
                rows.append((name, case, seconds, seconds / plain))
    print(f"{n:,} calls, {args.backend} backend, best of {args.repeat}, {os.cpu_count()} cores")
    print("| workload | executor | seconds | / batchpool map |")
    print("|---|---|---:|---:|")
    for name, case, seconds, ratio in rows:
        print(f"| {name} | {case} | {seconds:.3f} s | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
