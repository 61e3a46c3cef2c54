"""The same script on one machine or a cluster: only the backend changes.

    python examples/anywhere.py                          # local worker processes
    python examples/anywhere.py --backend dask           # a Dask LocalCluster it starts
    python examples/anywhere.py --backend slurm --storage /shared/scratch/batchpool
    python examples/anywhere.py --backend sge   --storage /shared/scratch/batchpool
    python examples/anywhere.py --backend htcondor --storage /shared/scratch/batchpool
    python examples/anywhere.py --backend docker --image my-worker:1   # containers here
    python examples/anywhere.py --backend aws-batch --backend-option job_queue=my-queue \
        --image 1234.dkr.ecr.eu-west-1.amazonaws.com/worker:1 --storage s3://bucket/runs

A cluster's jobs must reach the storage: a folder every node mounts at the same
path, or gs:// / s3:// with credentials on the nodes.
"""

from __future__ import annotations

import argparse
import math
import socket

from batchpool import BatchPoolExecutor
from batchpool.backends import make_backend


def count_primes(start: int, stop: int) -> tuple[int, str]:
    primes = sum(
        n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1)) for n in range(start, stop)
    )
    return primes, socket.gethostname()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="local", help="local, dask, ray, slurm, sge, ...")
    parser.add_argument("--storage", default=None, help="a folder or fsspec URL jobs reach")
    parser.add_argument("--image", default=None, help="the jobs' container image (docker)")
    parser.add_argument(
        "--backend-option", action="append", default=[], metavar="KEY=VALUE",
        help="an argument of the backend (e.g. job_queue=my-queue for aws-batch)",
    )  # fmt: skip
    parser.add_argument(
        "--storage-option", action="append", default=[], metavar="KEY=VALUE",
        help="an fsspec option of the storage (e.g. endpoint_url=...)",
    )  # fmt: skip
    parser.add_argument("--blocks", type=int, default=40)
    args = parser.parse_args()
    backend_options = dict(option.split("=", 1) for option in args.backend_option)
    backend = make_backend(args.backend, **backend_options) if backend_options else args.backend

    step = 25_000
    starts = [i * step for i in range(args.blocks)]
    with BatchPoolExecutor(
        name="primes",
        backend=backend,
        storage=args.storage,
        storage_options=dict(option.split("=", 1) for option in args.storage_option),
        image=args.image,
    ) as bpe:
        results = list(bpe.map(count_primes, starts, [s + step for s in starts]))
        big = bpe.options(cpus=2).submit(count_primes, 0, 200_000).result()
    total = sum(count for count, _ in results)
    hosts = sorted({host for _, host in results})
    print(f"{total} primes below {args.blocks * step:,} (computed on {', '.join(hosts)})")
    print(f"{big[0]} primes below 200,000 in one 2-CPU job")


if __name__ == "__main__":
    main()
