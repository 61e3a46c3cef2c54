"""pytest plugin: a real single-node HTCondor pool for the tests (``ci/htcondor.sh``).

Loaded from ``tests/conftest.py`` (``pytest_plugins``). The session fixture
``htcondor_pool`` runs ``ci/htcondor.sh`` (builds Debian 13's minicondor into an image
with the container engine of ``ci/docker.sh``, starts the pool on the host network,
writes a client configuration and a token), points the ``htcondor2`` bindings of this
process at it and returns an ``HTCondorPool``; at the session's end it stops the pool.

Tests using it get the marker ``htcondor``. When ``CI`` is set the pool must start, or
the tests fail with the script's output; elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from services import read_exports

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ci" / "htcondor.sh"

#: Seconds the first test that needs the pool may take: on a fresh machine its set-up
#: installs docker.io, runs debootstrap twice and builds the pool's image (3-4 minutes).
SETUP_TIMEOUT = 900

__all__ = ["HTCondorPool", "htcondor_pool"]


@dataclass(frozen=True)
class HTCondorPool:
    #: The user the pool runs jobs as (never root).
    job_user: str
    #: A folder under /tmp that the job user may write; the pool sees it at the same path.
    shared: Path
    #: ``docker exec ... <container>``: runs a command inside the pool's container.
    exec_argv: tuple[str, ...]

    def folder(self, name: str) -> Path:
        """A new folder in ``shared`` that the job user may write (for a store or logs)."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.shared))
        path.chmod(0o777)
        return path


def _needs_pool(item: pytest.Item) -> bool:
    return "htcondor_pool" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)  # before -m selects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_pool(item):
            item.add_marker(pytest.mark.htcondor)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: the first test that will run
def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        if _needs_pool(item):  # the session fixture is set up in this test's set-up
            item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT))
            return


def _unavailable(why: str, output: str = "") -> None:
    if os.environ.get("CI"):
        pytest.fail(f"an HTCondor pool is required when CI is set, but {why}:\n{output}")
    pytest.skip(f"no HTCondor pool here: {why}")


@pytest.fixture(scope="session")
def htcondor_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HTCondorPool]:
    if os.geteuid() != 0:
        _unavailable("ci/htcondor.sh starts the pool's container as root")
    try:
        import htcondor2
    except ImportError:
        _unavailable("the htcondor package (the [test] extra) is not installed")
    env_file = tmp_path_factory.mktemp("htcondor") / "htcondor.env"
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        # PYTHON: the pool's jobs run this interpreter, with this batchpool, mounted as is
        env={**os.environ, "BATCHPOOL_HTCONDOR_ENV": str(env_file), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT - 60,
        check=False,
    )
    if proc.returncode != 0 or not env_file.exists():
        _unavailable(f"`bash ci/htcondor.sh` exited with status {proc.returncode}", proc.stderr)
    env = read_exports(env_file)
    saved = os.environ.get("CONDOR_CONFIG")
    os.environ["CONDOR_CONFIG"] = env["CONDOR_CONFIG"]
    htcondor2.reload_config()  # the bindings read CONDOR_CONFIG when first imported
    try:
        yield HTCondorPool(
            job_user=env["BATCHPOOL_HTCONDOR_USER"],
            shared=Path(env["BATCHPOOL_HTCONDOR_SHARED"]),
            exec_argv=tuple(env["BATCHPOOL_HTCONDOR_EXEC"].strip('"').split()),
        )
    finally:
        if saved is None:
            os.environ.pop("CONDOR_CONFIG", None)
        else:
            os.environ["CONDOR_CONFIG"] = saved
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120, check=False)
