"""Side-by-side benchmark on a local Ray: batchpool's RayBackend against Ray's own tasks.

Run from the repository root::

    python benchmarks/bench_ray.py                # 10,000 tiny calls and 40 x 50 ms CPU
    python benchmarks/bench_ray.py --repeat 3

One local Ray (``ray.init(num_cpus=2)``, started by ``RayBackend()``) serves both,
in one process: Ray's own ``ray.get([f.remote(x) for x in items])`` and batchpool's
``map`` on the RayBackend with the default chunksize and with a chunksize chosen for
the workload. Each case runs once to warm up (Ray's worker processes, the runtime env
of batchpool's jobs), then ``--repeat`` times, each on fresh items; the best time is
reported, and its ratio to Ray's own. This is a script, not a test: it checks the results, never
asserts timings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

from batchpool import BatchPoolExecutor
from batchpool.backends.ray import RayBackend


def tiny(x: int) -> int:
    return x + 1


def cpu_50ms(x: int) -> int:
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    return x


def best(
    run: Callable[[list[int]], list[Any]], fn: Callable[[int], int], items: list[int], repeat: int
) -> float:
    """The best wall time of ``repeat`` runs after a warm-up, each on fresh items (shifted by
    a new offset), so that no run can reuse another's work; every result is checked."""
    times = []
    for round_ in range(repeat + 1):  # round 0 warms up
        shifted = [x + round_ * len(items) for x in items]
        start = time.perf_counter()
        got = run(shifted)
        elapsed = time.perf_counter() - start
        assert got == [fn(x) for x in shifted]
        if round_:
            times.append(elapsed)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    import ray

    backend = RayBackend(max_workers=2, init_options={"log_to_driver": False})
    rows: list[tuple[str, str, float, float]] = []
    with (
        tempfile.TemporaryDirectory() as storage,
        BatchPoolExecutor(backend=backend, storage=storage, max_workers=2) as bpe,
    ):
        workloads: list[tuple[str, Callable[[int], int], list[int], int]] = [
            ("map of 10,000 tiny calls", tiny, list(range(10_000)), 1000),
            ("map of 40 x 50 ms CPU", cpu_50ms, list(range(40)), 5),
        ]
        for label, fn, items, good in workloads:
            remote = ray.remote(fn)

            def native(xs: list[int], remote: Any = remote) -> list[Any]:
                return list(ray.get([remote.remote(x) for x in xs]))

            def default(xs: list[int], fn: Any = fn) -> list[Any]:
                return list(bpe.map(fn, xs))

            def chunked(xs: list[int], fn: Any = fn, n: int = good) -> list[Any]:
                return list(bpe.map(fn, xs, chunksize=n))

            ray_time = best(native, fn, items, args.repeat)
            rows.append((label, "Ray `ray.get([f.remote(x) ...])`", ray_time, 1.0))
            t = best(default, fn, items, args.repeat)
            rows.append((label, "batchpool `map`, default chunksize", t, t / ray_time))
            t = best(chunked, fn, items, args.repeat)
            rows.append((label, f"batchpool `map`, `chunksize={good}`", t, t / ray_time))
    backend.close()
    print("| workload | executor | best wall time | vs Ray |")
    print("|---|---|---:|---:|")
    for label, who, seconds, ratio in rows:
        print(f"| {label} | {who} | {seconds:.3f} s | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
