"""The bash script a command-running engine (Slurm, SGE, ...) submits for a batch of jobs.

One script serves many jobs as an array: the engine's task index picks the job's
worker arguments. All jobs of one script share their resources and environment
(the executor batches them that way). The script runs the user's ``setup`` lines,
sources ``env_script``, exports the environment, changes to ``working_dir`` and
runs ``python -m batchpool.worker`` for its task.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from batchpool.backends.base import JobSpec


def job_script(
    specs: Sequence[JobSpec],
    index_var: str,
    *,
    directives: Sequence[str] = (),
    first_index: int = 0,
    export_env: bool = True,
) -> str:
    """A bash script running ``specs[i]`` for task index ``first_index + i``.

    ``index_var`` is the engine's task index variable (``SLURM_ARRAY_TASK_ID``,
    ``SGE_TASK_ID``, or ``1`` for the script's first argument); ``directives`` are
    header lines such as ``#SBATCH --mem=8G``. ``export_env=False`` leaves the
    environment out, for an engine that sets it from the job's description (the
    script is then a file that holds no secret).
    """
    if not specs:
        raise ValueError("job_script needs at least one job")
    first = specs[0]
    if any(spec.resources != first.resources or spec.env != first.env for spec in specs):
        raise ValueError("the jobs of one script must share their resources and environment")
    resources = first.resources
    lines = ["#!/bin/bash", *directives, "set -u"]
    lines += list(resources.setup)
    if resources.env_script:
        lines.append(f"source {shlex.quote(resources.env_script)}")
    for name, value in first.environment().items() if export_env else ():
        lines.append(f"export {name}={shlex.quote(value)}")
    if resources.working_dir:
        lines.append(f"cd {shlex.quote(resources.working_dir)}")
    worker = " ".join(shlex.quote(part) for part in first.command()[: -len(first.args)])
    lines.append(f'case "${{{index_var}}}" in')
    for offset, spec in enumerate(specs):
        args = " ".join(shlex.quote(arg) for arg in spec.args)
        lines.append(f"  {first_index + offset}) exec {worker} {args} ;;")
    lines.append(f'  *) echo "batchpool: no job for task ${{{index_var}}}" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines) + "\n"


def alike_groups(jobs: Sequence[JobSpec]) -> list[list[int]]:
    """The positions of ``jobs``, grouped by resources and environment: each group can
    be one script, so one array (or cluster) of the engine; in first-seen order."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for position, spec in enumerate(jobs):
        key = (spec.resources, tuple(sorted(spec.env.items())))
        groups.setdefault(key, []).append(position)
    return list(groups.values())


def batch_name(specs: Sequence[JobSpec]) -> str:
    """A name for an array of jobs: the run's name (a job's name is ``<run>-<chunk>-<attempt>``),
    with what a scheduler's job name may not hold replaced."""
    name = specs[0].name.rsplit("-", 2)[0] if specs[0].name.count("-") >= 2 else specs[0].name
    name = name or "batchpool"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100]
