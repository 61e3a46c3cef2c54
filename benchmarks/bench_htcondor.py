"""Side-by-side benchmark on the local HTCondor pool: batchpool vs a plain ``condor_submit``.

Run from the repository root, as root (it starts the pool with ``ci/htcondor.sh``)::

    python benchmarks/bench_htcondor.py              # 200 calls of a 0.1 s function
    python benchmarks/bench_htcondor.py --calls 50

The same work on the same pool, one after the other, once each:

- ``condor_submit`` of one cluster, ``queue N``, each job ``/bin/sleep 0.1`` (run in the
  pool's container, as its job user), waited for by polling the schedd every 0.2 s;
- batchpool ``map`` of a 0.1 s Python function over N items, at the default chunksize and
  at ``chunksize=10`` (each job a worker that starts Python, imports batchpool and reads
  its chunk from the store).

Wall time runs from the submission (the ``map`` call) until every job has left the queue
(every result is in the client). This is a script, not a test: it checks the results,
never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def pause(x: int) -> int:
    time.sleep(0.1)
    return x * x


def start_pool() -> dict[str, str]:
    env_file = Path(tempfile.mkdtemp()) / "htcondor.env"
    proc = subprocess.run(
        ["bash", str(REPO / "ci" / "htcondor.sh")],
        env={**os.environ, "BATCHPOOL_HTCONDOR_ENV": str(env_file), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"ci/htcondor.sh failed ({proc.returncode}):\n{proc.stderr}")
    env = {}
    for line in env_file.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip('"')
    os.environ["CONDOR_CONFIG"] = env["CONDOR_CONFIG"]
    os.environ["DOCKER_HOST"] = env["DOCKER_HOST"]
    return env


def run_plain(n: int, env: dict[str, str], work: Path) -> float:
    import htcondor2

    description = "\n".join(
        [
            "executable = /bin/sleep",
            "arguments = 0.1",
            f"output = {work}/plain-$(Cluster).$(Process).out",
            f"error = {work}/plain-$(Cluster).$(Process).out",
            f"queue {n}",
        ]
    )
    docker, verb, *rest = env["BATCHPOOL_HTCONDOR_EXEC"].split()  # docker exec -u USER NAME
    start = time.perf_counter()
    proc = subprocess.run(
        [docker, verb, "-i", *rest, "condor_submit", "-terse", "-"],
        input=description,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"condor_submit failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    cluster = int(proc.stdout.split(".")[0])
    schedd = htcondor2.Schedd(htcondor2.Collector().query(htcondor2.AdType.Schedd)[0])
    while schedd.query(f"ClusterId == {cluster}", ["ProcId"]):
        time.sleep(0.2)
    return time.perf_counter() - start


def run_batchpool(n: int, work: Path, chunksize: int | None) -> dict[str, Any]:
    from batchpool import BatchPoolExecutor
    from batchpool.backends.htcondor import HTCondorBackend

    backend = HTCondorBackend(log_dir=work / "batchpool-logs")
    start = time.perf_counter()
    with BatchPoolExecutor(backend=backend, storage=str(work / "batchpool-runs")) as bpe:
        results = list(bpe.map(pause, range(n), chunksize=chunksize))
    wall = time.perf_counter() - start
    if results != [x * x for x in range(n)]:
        raise SystemExit("batchpool: wrong results")
    return {"wall": wall, "submits": backend.submit_calls, "queries": backend.status_calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    os.umask(0)  # the store's folders stay writable by the pool's job user
    env = start_pool()
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=env["BATCHPOOL_HTCONDOR_SHARED"]))
    work.chmod(0o777)
    n = args.calls
    plain = run_plain(n, env, work)
    print(f"plain condor_submit: {plain:.1f} s", file=sys.stderr)
    rows = [("condor_submit, `queue N` of `/bin/sleep 0.1`", plain, 1, "")]
    for label, chunksize in (("default chunksize", None), ("`chunksize=10`", 10)):
        got = run_batchpool(n, work, chunksize)
        print(f"batchpool {label}: {got}", file=sys.stderr)
        rows.append((f"batchpool `map`, {label}", got["wall"], got["submits"], got["queries"]))
    print(f"\n{n} calls of a 0.1 s function on the local single-node pool (2 CPUs)\n")
    print("| executor | wall time | vs condor_submit | submits | schedd queries |")
    print("|---|---:|---:|---:|---:|")
    for label, wall, submits, queries in rows:
        ratio = f"{wall / plain:.2f}\N{MULTIPLICATION SIGN}"
        print(f"| {label} | {wall:.1f} s | {ratio} | {submits} | {queries} |")


if __name__ == "__main__":
    main()
