"""pytest plugin: real object stores for the tests (GCS and S3 emulators).

Load it with ``pytest_plugins = ["stores"]`` in ``tests/conftest.py`` (or ``-p stores``
with ``tests/`` on ``sys.path``). Fixtures:

``gcs_service`` / ``s3_service`` (session)
    fake-gcs-server / moto_server, started once on 127.0.0.1 and a free port, with a
    bucket ``batchpool-test``; stopped when the session ends.
``gcs_storage`` / ``s3_storage`` (function)
    ``{"storage": "gs://batchpool-test/<unique prefix>", "storage_options": {...}}``
    (``s3://...`` for S3): a fresh place per test, ready for
    ``BatchPoolExecutor(**gcs_storage)``.
``any_storage`` (function, parametrized)
    the same for ``local`` (a tmp_path folder), ``gcs`` and ``s3``; the last two carry
    the markers ``gcs`` and ``s3``, so ``-m gcs`` / ``-m "not s3"`` select them.

Any test that requests ``gcs_service``/``s3_service`` (directly or through
``gcs_storage``/``s3_storage``) is given the marker ``gcs``/``s3`` at collection.

A service whose pip package is missing skips its tests, with the reason; when the
environment variable ``CI`` is set it fails them instead (CI installs ``[test]``, so a
missing package there is a broken setup). A service that is installed but does not
start always fails its tests, quoting the server's log tail.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Before anything imports gcsfs: the module sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from services import Service, ServiceError, ServiceMissing
from services.gcs import FakeGcsServer
from services.s3 import MotoServer

BUCKET = "batchpool-test"

__all__ = [
    "BUCKET",
    "any_storage",
    "gcs_service",
    "gcs_storage",
    "in_ci",
    "s3_service",
    "s3_storage",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gcs: uses Google Cloud Storage (fake-gcs-server started by the tests)"
    )
    config.addinivalue_line("markers", "s3: uses Amazon S3 (moto_server started by the tests)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a service's fixture (even indirectly) carries its marker."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        for service, marker in (("gcs_service", pytest.mark.gcs), ("s3_service", pytest.mark.s3)):
            if service in names:
                item.add_marker(marker)


def in_ci() -> bool:
    """True when the environment variable CI is set (to anything but an explicit no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _start(service: Service) -> Service:
    """Start ``service``, or skip (developer machine without the package) or fail."""
    try:
        return service.start()
    except ServiceMissing as exc:
        missing, failure = str(exc), None
    except (ServiceError, RuntimeError, OSError) as exc:
        service.stop()
        missing, failure = None, f"{service.name} could not start: {exc}"
    # Outside the except blocks: the report shows the reason, not a chain of tracebacks.
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    if in_ci():
        pytest.fail(f"CI is set, and {service.name} cannot start: {missing}", pytrace=False)
    pytest.skip(f"{service.name}: {missing}")


def _session_service(service: Service) -> Iterator[Service]:
    """Start ``service`` with the bucket, yield it, stop it: all under one try."""
    try:
        _start(service)
        service.create_bucket(BUCKET)
    except BaseException:
        service.stop()
        raise
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def gcs_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcsServer]:
    """fake-gcs-server for the whole session, with the bucket ``batchpool-test``."""
    service = FakeGcsServer(tmp_path_factory.mktemp("fake-gcs-server"))
    yield from _session_service(service)  # type: ignore[misc]


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto_server for the whole session, with the bucket ``batchpool-test``."""
    service = MotoServer(tmp_path_factory.mktemp("moto-server"))
    yield from _session_service(service)  # type: ignore[misc]


def _unique_prefix(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:60]
    return f"{name}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def gcs_storage(gcs_service: FakeGcsServer, request: pytest.FixtureRequest) -> dict[str, Any]:
    """``storage=``/``storage_options=`` for a fresh prefix in the GCS emulator."""
    return {
        "storage": f"gs://{BUCKET}/{_unique_prefix(request)}",
        "storage_options": gcs_service.storage_options(),
    }


@pytest.fixture
def s3_storage(s3_service: MotoServer, request: pytest.FixtureRequest) -> dict[str, Any]:
    """``storage=``/``storage_options=`` for a fresh prefix in the S3 emulator."""
    return {
        "storage": f"s3://{BUCKET}/{_unique_prefix(request)}",
        "storage_options": s3_service.storage_options(),
    }


@pytest.fixture(
    params=[
        "local",
        pytest.param("gcs", marks=pytest.mark.gcs),
        pytest.param("s3", marks=pytest.mark.s3),
    ]
)
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """``storage=``/``storage_options=`` on a local folder, in GCS and in S3."""
    if request.param == "local":
        return {"storage": str(tmp_path / "store"), "storage_options": {}}
    # Looked up only for its own parameter: a local run starts no emulator.
    return dict(request.getfixturevalue(f"{request.param}_storage"))
