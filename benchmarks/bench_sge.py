"""Side-by-side benchmark on the local SGE cluster: batchpool vs one plain ``qsub -t`` array.

Run from the repository root, as root (it starts the cluster with ``ci/sge.sh``)::

    python benchmarks/bench_sge.py                # 200 calls of a 0.1 s function
    python benchmarks/bench_sge.py --calls 50 --poll 1.0

All three run the same calls on the same cluster, one after the other, once each:
batchpool's ``SGEBackend`` with one ``map`` at the default chunksize, the same with
``chunksize=10``, and the baseline a user would write by hand: ONE array script
handed to ``qsub -t 1-N`` on its standard input, whose task i runs ``python -c``
for call i (sleep 0.1 s, print the square), then ``qstat -j <job>`` every ``--poll``
seconds (0.5) until the job is gone, then the N task output files read back.

The SGE commands are counted by shims put first on ``PATH`` (``qsub``, ``qstat``,
``qacct``, ``qdel``, ``qconf``): each logs its name and arguments, then execs the
real command. "status commands" are ``qstat`` and ``qacct``. Wall time runs from
the call to ``map`` (or from the ``qsub``) until every result is in the client.
This is a script, not a test: it checks the results, never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import shlex
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
COMMANDS = ("qsub", "qstat", "qacct", "qdel", "qconf")


def pause(x: int) -> int:
    time.sleep(0.1)
    return x * x


def start_sge(env_file: Path) -> None:
    """Start SGE with ``ci/sge.sh`` (idempotent) and load the environment it wrote."""
    proc = subprocess.run(
        ["bash", str(REPO / "ci" / "sge.sh")],
        env={**os.environ, "BATCHPOOL_SGE_ENV": str(env_file)},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not env_file.exists():
        sys.exit(f"ci/sge.sh failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    for line in env_file.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export ") :].partition("=")
            os.environ[name] = os.path.expandvars(value)


def install_shims(folder: Path, log: Path) -> None:
    """Shims first on PATH that log each SGE command, then exec the real one."""
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
        if words:
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
    status = counts["qstat"] + counts["qacct"]
    print(f"{label}: {wall:.1f} s, {dict(counts)}", file=sys.stderr)
    return {"label": label, "wall": wall, "qsub": counts["qsub"], "status": status}


def run_batchpool(n: int, work: Path, chunksize: int | None) -> list[Any]:
    from batchpool import BatchPoolExecutor
    from batchpool.backends.sge import SGEBackend

    backend = SGEBackend(log_dir=str(work / "batchpool-logs"))
    with BatchPoolExecutor(backend=backend, storage=str(work / "batchpool-runs")) as bpe:
        return list(bpe.map(pause, range(n), chunksize=chunksize))


def run_qsub_array(n: int, work: Path, poll: float) -> list[Any]:
    """ONE ``qsub -t 1-n`` of a script on stdin; poll ``qstat -j`` until gone; read outputs."""
    out_dir = work / "qsub-t"
    out_dir.mkdir(parents=True, exist_ok=True)
    code = "import sys, time; x = int(sys.argv[1]); time.sleep(0.1); print(x * x)"
    script = "\n".join(
        [
            "#!/bin/bash",
            "#$ -N bench-qsub-t",
            "#$ -S /bin/bash",
            "#$ -j y",
            f"#$ -wd {out_dir}",
            f"#$ -o {out_dir}/task.$TASK_ID",
            f'exec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$((SGE_TASK_ID - 1))"',
            "",
        ]
    )
    out = subprocess.run(
        ["qsub", "-terse", "-t", f"1-{n}"],
        input=script,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    number = out.strip().split(".", 1)[0]
    if not number.isdigit():
        raise SystemExit(f"qsub -terse printed {out.strip()!r}, not a job id")
    while True:
        gone = subprocess.run(["qstat", "-j", number], capture_output=True, check=False)
        if gone.returncode != 0:
            break
        time.sleep(poll)
    results = []
    for task in range(1, n + 1):
        lines = (out_dir / f"task.{task}").read_text().split()
        results.append(int(lines[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument(
        "--poll", type=float, default=0.5, help="seconds between qstat of the baseline (0.5)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sge-"))
    start_sge(work / "sge.env")
    log = work / "commands.log"
    install_shims(work / "shims", log)
    n = args.calls
    rows = [
        measure(
            "batchpool, one `map` (default chunksize)", log, lambda: run_batchpool(n, work, None), n
        ),
        measure("batchpool, one `map`, chunksize=10", log, lambda: run_batchpool(n, work, 10), n),
        measure(
            f"plain `qsub -t 1-{n}`, `qstat -j` every {args.poll:g} s",
            log,
            lambda: run_qsub_array(n, work, args.poll),
            n,
        ),
    ]
    base = rows[-1]
    print(
        f"\n{n} calls of a 0.1 s function on the local single-node SGE "
        f"(16 slots, {os.cpu_count()} real cores); one run each.\n"
    )
    print(
        "| executor | wall time (s) | vs `qsub -t` | `qsub` calls | "
        "status commands (`qstat` + `qacct`) | vs `qsub -t` |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        status_ratio = f"{row['status'] / base['status']:.2f}x" if base["status"] else "-"
        print(
            f"| {row['label']} | {row['wall']:.1f} | {row['wall'] / base['wall']:.2f}x | "
            f"{row['qsub']} | {row['status']} | {status_ratio} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
