"""Per-job overhead of the docker backend, side by side with the engine's own CLI.

Run from the repository root, with a daemon reachable (``bash ci/docker.sh`` starts one
and prints the DOCKER_HOST to export) and a worker image::

    python benchmarks/bench_docker.py --image localhost/batchpool-worker:TAG [--jobs 20]

In one run, interleaved over ``--repeat`` rounds (best of each reported):

- ``docker run --rm IMAGE python3 -c pass``, one after another: what the engine
  itself costs per container;
- batchpool, one ``submit(...).result()`` at a time (each a container): the round trip
  of a job, engine included;
- batchpool, ``map`` of ``--jobs`` chunks of one call each, ``parallel`` at once;
- ProcessPoolExecutor (stdlib), the same map: what the containers replace.

The table gives seconds per job and the ratio to ``docker run`` alone. This is a
script, not a test: it checks results, never how long they took.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import tempfile
import time
from collections.abc import Callable

from batchpool import BatchPoolExecutor
from batchpool.backends.docker import DockerBackend
from batchpool.images import find_engine


def nothing(x: int) -> int:
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engine", default=None)
    args = parser.parse_args()
    engine = find_engine(args.engine)
    n = args.jobs
    storage = tempfile.mkdtemp(prefix="bench-docker-")

    def plain_runs() -> None:
        for _ in range(n):
            subprocess.run(
                [engine, "run", "--rm", "--network", "host", args.image, "python3", "-c", "pass"],
                check=True,
                capture_output=True,
            )

    backend = DockerBackend(engine=engine)
    bpe = BatchPoolExecutor(backend=backend, image=args.image, storage=storage)
    ppe = cf.ProcessPoolExecutor()
    ppe.submit(nothing, 0).result()

    def round_trips() -> None:
        for i in range(n):
            assert bpe.submit(nothing, i).result(timeout=120) == i

    def batch_map() -> None:
        assert list(bpe.map(nothing, range(n), chunksize=1)) == list(range(n))

    def stdlib_map() -> None:
        assert list(ppe.map(nothing, range(n))) == list(range(n))

    cases: dict[str, Callable[[], None]] = {
        "docker run --rm (CLI alone, serial)": plain_runs,
        "batchpool submit().result(), serial": round_trips,
        f"batchpool map, {backend.parallel} containers at once": batch_map,
        "ProcessPoolExecutor map (no containers)": stdlib_map,
    }
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeat):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            best[name] = min(best[name], time.perf_counter() - start)
    bpe.shutdown()
    ppe.shutdown()
    backend.close()
    base = best["docker run --rm (CLI alone, serial)"]
    print(
        f"{n} jobs, best of {args.repeat}; engine {engine}, DOCKER_HOST={os.environ.get('DOCKER_HOST')}"  # noqa: E501
    )
    print(f"{'case':48} {'s/job':>8} {'vs docker run':>14}")
    for name, seconds in best.items():
        print(f"{name:48} {seconds / n:8.3f} {seconds / base:13.2f}x")


if __name__ == "__main__":
    main()
