"""Amazon S3 for the tests: moto's server mode, reached with s3fs.

We start ``moto_server -H 127.0.0.1 -p PORT`` (the console script of the running
interpreter's environment, else ``python -m moto.server``), output to a log file.

s3fs is given ``key``/``secret``/``endpoint_url`` and no ``client_kwargs``: with
``region_name`` in ``client_kwargs``, ``mkdir`` of a bucket sends a location
constraint that moto refuses ("The specified location-constraint is not valid").
The AWS_* variables set below reach any boto client of this process and of every
process started from it (batchpool's local workers), so none of them looks for a
real account's credentials or region.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from services import HOST, Service, ServiceError, http_request, missing_modules

KEY = SECRET = "testing"
REGION = "us-east-1"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": REGION,
}
os.environ.update(AWS_ENV)
# A session token from a real account would be sent along with the fake key.
os.environ.pop("AWS_SESSION_TOKEN", None)

__all__ = ["AWS_ENV", "KEY", "REGION", "SECRET", "MotoServer", "make_s3fs"]


def storage_options(endpoint: str) -> dict[str, Any]:
    """What ``s3fs.S3FileSystem`` (or ``fsspec.url_to_fs("s3://...")``) needs here."""
    return {"key": KEY, "secret": SECRET, "endpoint_url": endpoint}


def make_s3fs(endpoint: str, **extra: Any) -> Any:
    """An ``s3fs.S3FileSystem`` that talks to the moto server at ``endpoint``."""
    import s3fs

    return s3fs.S3FileSystem(**storage_options(endpoint), **extra)


def _moto_command() -> list[str]:
    """moto's server of this interpreter's environment (never another one on PATH)."""
    name = "moto_server.exe" if os.name == "nt" else "moto_server"
    script = Path(sysconfig.get_path("scripts")) / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "moto.server"]


class MotoServer(Service):
    """moto in server mode on 127.0.0.1 and a free port (state in memory)."""

    name = "moto_server"
    ready_path = "/moto-api/"

    def missing(self) -> str | None:
        # moto[server] brings flask and flask_cors; s3fs is the client the tests use.
        absent = missing_modules("moto", "flask", "flask_cors", "s3fs")
        if absent:
            return (
                f"S3 tests need the pip packages of the [test] extra (moto[server], s3fs); "
                f"not installed: {', '.join(absent)} (pip install -e '.[test]')"
            )
        return None

    def command(self, port: int) -> list[str]:
        return [*_moto_command(), "-H", HOST, "-p", str(port)]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(AWS_ENV)
        env["MOTO_PORT"] = str(self.port)  # moto builds its own URLs from it
        return env

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error when this server has it already)."""
        status, body = http_request("PUT", f"{self.endpoint}/{name}", body=b"")
        if status != 200 and b"BucketAlreadyOwnedByYou" not in body:
            raise ServiceError(
                f"{self.name}: creating bucket {name!r} answered HTTP {status}: "
                f"{body[:500]!r}\n{self.log_tail()}"
            )
        return name

    def reset(self) -> None:
        """Forget every bucket and object."""
        status, body = http_request("POST", f"{self.endpoint}/moto-api/reset")
        if status != 200:
            raise ServiceError(f"{self.name}: reset answered HTTP {status}: {body[:300]!r}")

    def storage_options(self) -> dict[str, Any]:
        return storage_options(self.endpoint)
