"""Shared fixtures: executors whose runs live in the test's own temporary folder."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchpool import BatchPoolExecutor

# The GCS emulator and the moto S3 server, started once per session when a test needs them.
pytest_plugins = ["stores", "containers", "htcondor_pool", "browser"]

#: The session fixtures that install and start a cluster (ci/slurm.sh, ci/sge.sh), and the
#: seconds their set-up may add to a test's timeout: on a fresh machine apt installs the
#: packages, and a start that failed is tried once more after a stop.
CLUSTER_FIXTURES = {"slurm": 600, "sge": 600}


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: the tests that will run
def pytest_collection_finish(session: pytest.Session) -> None:
    # Every module that imports a cluster fixture has its own copy of it, set up in the
    # set-up of the module's first test that uses it: that test gets the extra time.
    seen: set[tuple[str, str]] = set()
    for item in session.items:
        module = getattr(item, "module", None)
        for name, extra in CLUSTER_FIXTURES.items():
            if name not in getattr(item, "fixturenames", ()) or (name, str(module)) in seen:
                continue
            seen.add((name, str(module)))
            marker = item.get_closest_marker("timeout")
            base = float(marker.args[0]) if marker and marker.args else 120.0
            item.add_marker(pytest.mark.timeout(base + extra), append=False)


@pytest.fixture(scope="session", autouse=True)
def cpython_classes_from_the_start(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """CPython's test_concurrent_futures classes run in child interpreters that mostly
    wait (tests/test_stdlib_futures.py): started as the session begins, they run beside
    the other tests instead of adding four minutes at the end of the suite."""
    module = sys.modules.get("test_stdlib_futures")
    runs = (
        None if module is None else module.start_with_the_session(request.session, tmp_path_factory)
    )
    yield
    if runs is not None:
        runs.close()


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[BatchPoolExecutor]:
    """A local executor with two workers, shut down (waiting) after the test."""
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path / "store")) as ex:
        yield ex


class Gate:
    """A file-based gate that calls in worker processes wait on, opened by the test."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> str:
        return os.fspath(self.folder / name)

    def open(self, name: str) -> None:
        (self.folder / name).touch()


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path / "gates")
