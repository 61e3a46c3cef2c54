"""pytest plugin: a real container engine for the tests, and a worker image built here.

Loaded from ``tests/conftest.py`` (``pytest_plugins``). Fixtures (session scope):

``container_engine``
    runs ``ci/docker.sh`` (installs Debian's docker.io and debootstrap, starts dockerd
    on a private socket, builds a Debian bookworm base image with python3 and pip from
    the mirror apt uses), puts ``DOCKER_HOST`` in this process's environment and
    returns a ``ContainerEngine``.
``worker_image``
    a worker image built from that base with ``batchpool.images.build_image``: this
    batchpool and its pinned dependencies, tagged by their digest, so it is rebuilt
    only when batchpool's files change. Returns the tag.

Tests using them get the marker ``docker``. When ``CI`` is set the engine must start,
or the tests fail with the script's output; elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from services import read_exports

from batchpool import images

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ci" / "docker.sh"

__all__ = ["ContainerEngine", "container_engine", "worker_image"]


@dataclass(frozen=True)
class ContainerEngine:
    #: ``unix://...``: the daemon's API socket (also in ``os.environ["DOCKER_HOST"]``).
    docker_host: str
    #: The docker CLI that matches the daemon.
    docker: str
    #: A Debian image with python3 (the client's minor version) and pip.
    base_image: str


#: Seconds the first test that needs the engine may take: on a fresh machine its set-up
#: installs docker.io, runs debootstrap and builds the worker image (about 2 minutes).
SETUP_TIMEOUT = 900


def _needs_engine(item: pytest.Item) -> bool:
    return bool({"container_engine", "worker_image"} & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(tryfirst=True)  # before -m selects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_engine(item):
            item.add_marker(pytest.mark.docker)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: the first test that will run
def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        if _needs_engine(item):  # the session fixtures are set up in this test's set-up
            item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT))
            return


def _unavailable(why: str, output: str = "") -> None:
    if os.environ.get("CI"):
        pytest.fail(f"a container engine is required when CI is set, but {why}:\n{output}")
    pytest.skip(f"no container engine here: {why}")


@pytest.fixture(scope="session")
def container_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerEngine]:
    if os.geteuid() != 0:
        _unavailable("ci/docker.sh installs docker.io and starts dockerd as root")
    env_file = tmp_path_factory.mktemp("docker") / "docker.env"
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "BATCHPOOL_DOCKER_ENV": str(env_file)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0 or not env_file.exists():
        _unavailable(f"`bash ci/docker.sh` exited with status {proc.returncode}", proc.stderr)
    env = read_exports(env_file)
    saved = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = env["DOCKER_HOST"]
    try:
        yield ContainerEngine(
            docker_host=env["DOCKER_HOST"],
            docker=env["BATCHPOOL_DOCKER"],
            base_image=env["BATCHPOOL_BASE_IMAGE"],
        )
    finally:
        if saved is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = saved


@pytest.fixture(scope="session")
def worker_image(container_engine: ContainerEngine) -> str:
    tag = f"localhost/batchpool-worker:{images.package_digest()}"
    found = subprocess.run(
        [container_engine.docker, "image", "inspect", tag],
        capture_output=True,
        check=False,
    )
    if found.returncode != 0:
        images.build_image(container_engine.base_image, tag, engine=container_engine.docker)
    return tag
