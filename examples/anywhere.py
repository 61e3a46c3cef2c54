"""The same script on one machine or a cluster: only the backend changes.

    python examples/anywhere.py                          # local worker processes
    python examples/anywhere.py --backend dask           # a Dask LocalCluster it starts
    python examples/anywhere.py --backend slurm --storage /shared/scratch/batchpool
    python examples/anywhere.py --backend sge   --storage /shared/scratch/batchpool
    python examples/anywhere.py --backend docker --image my-worker:1   # containers here

A cluster's jobs must reach the storage: a folder every node mounts at the same
path, or gs:// / s3:// with credentials on the nodes.
"""

from __future__ import annotations

import argparse
import math
import socket

from batchpool import BatchPoolExecutor


def count_primes(start: int, stop: int) -> tuple[int, str]:
    primes = sum(
        n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1)) for n in range(start, stop)
    )
    return primes, socket.gethostname()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="local", help="local, dask, slurm, sge, docker, ...")
    parser.add_argument("--storage", default=None, help="a folder or fsspec URL jobs reach")
    parser.add_argument("--image", default=None, help="the jobs' container image (docker)")
    parser.add_argument("--blocks", type=int, default=40)
    args = parser.parse_args()

    step = 25_000
    starts = [i * step for i in range(args.blocks)]
    with BatchPoolExecutor(
        name="primes", backend=args.backend, storage=args.storage, image=args.image
    ) as bpe:
        results = list(bpe.map(count_primes, starts, [s + step for s in starts]))
        big = bpe.options(cpus=2).submit(count_primes, 0, 200_000).result()
    total = sum(count for count, _ in results)
    hosts = sorted({host for _, host in results})
    print(f"{total} primes below {args.blocks * step:,} (computed on {', '.join(hosts)})")
    print(f"{big[0]} primes below 200,000 in one 2-CPU job")


if __name__ == "__main__":
    main()
