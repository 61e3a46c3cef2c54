"""Shared fixtures: executors whose runs live in the test's own temporary folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchpool import BatchPoolExecutor

# The GCS emulator and the moto S3 server, started once per session when a test needs them.
pytest_plugins = ["stores", "containers", "htcondor_pool"]


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
