"""Job resources per executor (job_options) and per group of calls (options())."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from calls import env

from batchpool import BatchPoolExecutor
from batchpool.backends import JobSpec, Resources
from batchpool.backends.script import job_script


def test_options_override_resources_for_a_group_of_calls(tmp_path: Path) -> None:
    with BatchPoolExecutor(
        max_workers=2, storage=str(tmp_path), job_options={"env": {"STAGE": "default"}}
    ) as ex:
        big = ex.options(cpus=3, env={"STAGE": "big"})
        assert big.submit(env, "OMP_NUM_THREADS").result() == "3"
        assert big.submit(env, "STAGE").result() == "big"
        assert ex.submit(env, "OMP_NUM_THREADS").result() == "1"
        assert ex.submit(env, "STAGE").result() == "default"
        assert list(big.map(env, ["STAGE", "MKL_NUM_THREADS"])) == ["big", "3"]
        # A burst mixing both never shares a job: each call sees its own environment.
        futures = [(ex if i % 2 else big).submit(env, "STAGE") for i in range(60)]
        assert [f.result() for f in futures] == ["default" if i % 2 else "big" for i in range(60)]

        async def via_asyncio() -> list[str]:
            future = await big.async_submit(env, "STAGE")
            return [await future] + [r async for r in big.async_map(env, [["STAGE"]])]

        assert asyncio.run(via_asyncio()) == ["big", "big"]
        assert big.options(env={"STAGE": "bigger"}).submit(env, "STAGE").result() == "bigger"


def test_unknown_or_bad_options_are_refused(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as ex:
        with pytest.raises(TypeError, match=r"unknown job option.*memry.*known:.*memory"):
            ex.options(memry="8G")
        with pytest.raises(ValueError, match="cpus_per_job"):
            ex.options(cpus=0)
    with pytest.raises(TypeError, match="unknown job option"):
        BatchPoolExecutor(storage=str(tmp_path), job_options={"gpu": 1})


def test_the_job_script_runs_setup_env_script_env_and_working_dir(tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "activate").write_text("export FROM_ENV_SCRIPT=yes\n")
    work = tmp_path / "work"
    work.mkdir()
    resources = Resources(
        python=("bash", "-c", 'echo "$PWD $FROM_ENV_SCRIPT $SETUP $MINE $0 $*"', "python"),
        setup=("export SETUP=done",),
        env_script=str(tmp_path / "activate"),
        env=(("MINE", "it's mine"),),
        working_dir=str(work),
    )
    specs = [
        JobSpec(f"j{i}", ("--chunk", f"c{i}", "--attempt", "1"), {}, resources) for i in range(3)
    ]
    script = job_script(specs, "TASK", first_index=1)
    out = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": "/usr/bin:/bin", "TASK": "2"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        str(work),
        "yes",
        "done",
        "it's",
        "mine",
        "python",
        "-m",
        "batchpool.worker",
        "--chunk",
        "c1",
        "--attempt",
        "1",
    ]
    missing = subprocess.run(
        ["bash", "-c", script], env={"TASK": "9"}, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no job for task 9" in missing.stderr
