"""Side-by-side benchmark on the local Slurm cluster: batchpool vs submitit's ``map_array``.

Run from the repository root, as root (it starts the cluster with ``ci/slurm.sh``)::

    python benchmarks/bench_slurm.py              # 200 calls of a 0.1 s function
    python benchmarks/bench_slurm.py --calls 50

Both run the same calls on the same cluster, one after the other, once each. The
Slurm commands are counted by shims put first on ``PATH`` (``sbatch``, ``squeue``,
``sacct``, ``scontrol``, ``scancel``): each logs its name and arguments, then execs
the real command. "status commands" are ``squeue``, ``sacct`` and
``scontrol show job``. Wall time runs from the call to ``map``/``map_array`` until
every result is in the client. This is a script, not a test: it checks the
results, never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("sbatch", "squeue", "sacct", "scontrol", "scancel", "srun")


def pause(x: int) -> int:
    time.sleep(0.1)
    return x * x


def start_slurm() -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "ci" / "slurm.sh")], capture_output=True, text=True, check=False
    )
    conf = [line for line in proc.stdout.splitlines() if line.startswith("export SLURM_CONF=")]
    if proc.returncode != 0 or not conf:
        sys.exit(f"ci/slurm.sh failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    os.environ["SLURM_CONF"] = conf[-1].split("=", 1)[1]


def install_shims(folder: Path, log: Path) -> None:
    """Shims first on PATH that log each Slurm command, then exec the real one."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        real = shutil.which(name)
        if real is None:
            continue
        shim = folder / name
        shim.write_text(f'#!/bin/bash\necho "{name} $*" >> {log}\nexec {real} "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ['PATH']}"


def count(log: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    if not log.exists():
        return counts
    for line in log.read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "scontrol":
            counts["scontrol show job" if words[1:3] == ["show", "job"] else "scontrol other"] += 1
        else:
            counts[words[0]] += 1
    log.write_text("")
    return counts


def measure(label: str, log: Path, run: Callable[[], list[Any]], n: int) -> dict[str, Any]:
    count(log)  # start from zero
    start = time.perf_counter()
    results = run()
    wall = time.perf_counter() - start
    counts = count(log)
    if results != [x * x for x in range(n)]:
        raise SystemExit(f"{label}: wrong results")
    status = counts["squeue"] + counts["sacct"] + counts["scontrol show job"]
    print(f"{label}: {wall:.1f} s, {dict(counts)}", file=sys.stderr)
    return {
        "label": label,
        "wall": wall,
        "sbatch": counts["sbatch"],
        "status": status,
        "counts": counts,
    }


def run_batchpool(n: int, work: Path, chunksize: int | None) -> list[Any]:
    from batchpool import BatchPoolExecutor
    from batchpool.backends.slurm import SlurmBackend

    backend = SlurmBackend(log_dir=work / "batchpool-logs")
    with BatchPoolExecutor(backend=backend, storage=str(work / "batchpool-runs")) as bpe:
        return list(bpe.map(pause, range(n), chunksize=chunksize))


def run_submitit(n: int, work: Path) -> list[Any]:
    import submitit

    executor = submitit.AutoExecutor(folder=work / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=10, slurm_partition="debug", slurm_array_parallelism=n)
    jobs = executor.map_array(pause, range(n))
    return [job.result() for job in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    try:
        import submitit  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "submitit"], check=True)
    start_slurm()
    work = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    log = work / "commands.log"
    install_shims(work / "shims", log)
    n = args.calls
    rows = [
        measure(
            "batchpool, one `map` (default chunksize)", log, lambda: run_batchpool(n, work, None), n
        ),
        measure("batchpool, one `map`, chunksize=10", log, lambda: run_batchpool(n, work, 10), n),
        measure("submitit 1.5 `map_array`", log, lambda: run_submitit(n, work), n),
    ]
    base = rows[-1]["wall"]
    print(
        f"\n{n} calls of a 0.1 s function on the local single-node Slurm "
        f"(16 CPUs advertised, 2 real cores); one run each.\n"
    )
    print("| executor | wall time (s) | vs submitit | `sbatch` calls | status commands |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['label']} | {row['wall']:.1f} | {row['wall'] / base:.2f}x | "
            f"{row['sbatch']} | {row['status']} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
