"""Side-by-side benchmark on a local Ray: batchpool's RayBackend against Ray's own tasks.

Run from the repository root::

    python benchmarks/bench_ray.py                # 10,000 tiny calls and 40 x 50 ms CPU
    python benchmarks/bench_ray.py --repeat 3

One local Ray (``ray.init(num_cpus=2)``, started by ``RayBackend()``) serves both,
in one process: Ray's own ``ray.get([f.remote(x) for x in items])`` and batchpool's
``map`` on the RayBackend with the default chunksize and with a chunksize chosen for
the workload. Each case runs once to warm up (Ray's worker processes, the runtime env
of batchpool's jobs), then ``--repeat`` times; the best time is reported, and its
ratio to Ray's own. This is a script, not a test: it checks the results, never
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


def best(run: Callable[[], list[Any]], expected: list[Any], repeat: int) -> float:
    assert run() == expected  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        assert run() == expected
        times.append(time.perf_counter() - start)
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
        if True:
            workloads: list[tuple[str, Callable[[int], int], list[int], int]] = [
                ("map of 10,000 tiny calls", tiny, list(range(10_000)), 1000),
                ("map of 40 x 50 ms CPU", cpu_50ms, list(range(40)), 5),
            ]
            for label, fn, items, good in workloads:
                expected = [fn(x) for x in items] if fn is tiny else items
                remote = ray.remote(fn)

                def native(remote: Any = remote, items: list[int] = items) -> list[Any]:
                    return list(ray.get([remote.remote(x) for x in items]))

                def default(fn: Any = fn, items: list[int] = items) -> list[Any]:
                    return list(bpe.map(fn, items))

                def chunked(fn: Any = fn, items: list[int] = items, n: int = good) -> list[Any]:
                    return list(bpe.map(fn, items, chunksize=n))

                ray_time = best(native, expected, args.repeat)
                rows.append((label, "Ray `ray.get([f.remote(x) ...])`", ray_time, 1.0))
                t = best(default, expected, args.repeat)
                rows.append((label, "batchpool `map`, default chunksize", t, t / ray_time))
                t = best(chunked, expected, args.repeat)
                rows.append((label, f"batchpool `map`, `chunksize={good}`", t, t / ray_time))
    backend.close()
    print("| workload | executor | best wall time | vs Ray |")
    print("|---|---|---:|---:|")
    for label, who, seconds, ratio in rows:
        print(f"| {label} | {who} | {seconds:.3f} s | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
