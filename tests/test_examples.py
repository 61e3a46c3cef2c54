"""The examples run as a user runs them: as scripts, in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sge import sge  # noqa: F401  (the session fixture that starts SGE)
from test_slurm import slurm  # noqa: F401  (the session fixture that starts Slurm)

REPO = Path(__file__).resolve().parent.parent


def run_example(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / args[0]), *args[1:]],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_process_pool_script_with_the_import_changed(tmp_path: Path) -> None:
    out = run_example(tmp_path, "dropin.py")
    assert "sum of scores: 4995000 calls reported: 1000" in out
    assert "a worker died: WorkerLostError" in out
    assert "the pool goes on: 1024" in out


def test_demo(tmp_path: Path) -> None:
    out = run_example(tmp_path, "demo.py")
    assert "[0, 3, 6, 9]" in out and "polyethylene" in out and "1024" in out


@pytest.mark.parametrize(
    "backend",
    [
        "local",
        pytest.param("dask", marks=pytest.mark.dask),
        pytest.param("sge", marks=pytest.mark.sge),
        pytest.param("slurm", marks=pytest.mark.slurm),
    ],
)
def test_the_same_script_on_each_backend(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "dask":
        pytest.importorskip("distributed")
    if backend in ("sge", "slurm"):
        request.getfixturevalue(backend)  # the engine is started, its environment set
    out = run_example(
        tmp_path,
        "anywhere.py",
        "--backend",
        backend,
        "--blocks",
        "8",
        "--storage",
        str(tmp_path / "runs"),  # a folder every (single) node sees
    )
    assert "17984 primes below 200,000 (computed on" in out
    assert "17984 primes below 200,000 in one 2-CPU job" in out


def test_operate_a_run_then_resume_only_what_failed(tmp_path: Path) -> None:
    storage = str(tmp_path / "kept")
    first = run_example(tmp_path, "operate.py", storage)
    assert "shard-3.txt: ValueError" in first and "'Failed': 2" in first
    cli = [sys.executable, "-m", "batchpool"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    status = subprocess.run(
        [*cli, "status", f"{storage}/nightly"], capture_output=True, text=True, env=env
    )
    assert status.returncode == 1 and "2 Failed" in status.stdout  # something to fix
    second = run_example(tmp_path, "operate.py", storage, "--repair")
    assert "processing shard-3.txt" in second and "processing shard-0.txt" not in second
    assert "{'Success': 8}" in second
    status = subprocess.run(
        [*cli, "status", f"{storage}/nightly"], capture_output=True, text=True, env=env
    )
    assert status.returncode == 0, status.stdout  # the failures were run again
