"""A real backend for tests: each job is a fresh ``python -m batchpool.worker`` process
started in an empty folder with a clean environment, as on a machine that shares
nothing with the client but the store (and has batchpool installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from batchpool.backends import Backend, JobSpec, JobState
from batchpool.backends.base import Notify

REPO = str(Path(__file__).resolve().parent.parent)


class ForeignProcessBackend(Backend):
    name = "foreign-process"

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="batchpool-foreign-")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def max_parallel(self) -> int:
        return 2

    def submit(self, jobs: Sequence[JobSpec], notify: Notify | None = None) -> list[str]:
        ids = []
        for spec in jobs:
            env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO, **spec.env}
            job_id = f"p{len(self.procs)}"
            self.procs[job_id] = subprocess.Popen(
                [sys.executable, *spec.command()[1:]],
                env=env,
                cwd=self.folder,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            ids.append(job_id)
        return ids

    def status(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        states = {}
        for job_id in job_ids:
            code = self.procs[job_id].poll()
            states[job_id] = (
                JobState.RUNNING
                if code is None
                else JobState.SUCCEEDED
                if code == 0
                else JobState.FAILED
            )
        return states

    def cancel(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            self.procs[job_id].kill()

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()
