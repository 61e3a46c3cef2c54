"""Real filesystems that fail some operations, or count them, for tests.

Each class is a real fsspec filesystem (local disk, the GCS emulator through gcsfs,
the moto S3 server through s3fs) with a mixin in front of the operations the store
uses. The mixin's settings are constructor keywords, so they travel in
``fs.to_json()`` and worker processes rebuild the same faulty or counting
filesystem. Injected faults are the errors the real library raises; every fault
and every operation is appended to a log file, so a test can count them across
processes.
"""

from __future__ import annotations

import errno
import os
import random
from typing import Any

from fsspec.implementations.local import LocalFileSystem

OPS = {
    "pipe_file": "put",
    "cat_file": "get",
    "ls": "list",
    "find": "list",
    "rm": "delete",
    "rm_file": "delete",
    "mv": "move",
}


def _log(path: str | None, line: str) -> None:
    if path:
        with open(path, "a") as f:  # one short append per line: whole lines across processes
            f.write(line + "\n")


def read_log(path: str) -> list[str]:
    return open(path).read().splitlines() if os.path.exists(path) else []


class _Mixin:
    """``rate`` of the operations fail with a ``kind`` of error: "transient" (retried
    by the store) or "permanent" (not), except in the process ``spare`` (a pid: the
    client, so that only workers fail); every operation is logged to ``log``."""

    def __init__(
        self,
        *args: Any,
        rate: float = 0.0,
        kind: str = "transient",
        log: str | None = None,
        spare: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.spared = spare
        self.fault_rate = rate
        self.fault_kind = kind
        self.op_log = log
        self._rng = random.Random()

    def _op(self, name: str, path: Any) -> None:
        kind = OPS[name]
        if self._rng.random() < self.fault_rate and os.getpid() != self.spared:
            _log(self.op_log, f"FAULT {kind} {path}")
            raise self._fault(kind, str(path))
        _log(self.op_log, f"{kind} {path}")

    def _fault(self, op: str, path: str) -> BaseException:
        raise NotImplementedError  # each filesystem below says what its library raises

    def pipe_file(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        self._op("pipe_file", path)
        return super().pipe_file(path, *args, **kwargs)  # type: ignore[misc]

    def cat_file(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        self._op("cat_file", path)
        return super().cat_file(path, *args, **kwargs)  # type: ignore[misc]

    def ls(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        self._op("ls", path)
        return super().ls(path, *args, **kwargs)  # type: ignore[misc]

    def rm(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        self._op("rm", path)
        return super().rm(path, *args, **kwargs)  # type: ignore[misc]

    def mv(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> Any:
        self._op("mv", path2)
        return super().mv(path1, path2, *args, **kwargs)  # type: ignore[misc]


class FaultyLocal(_Mixin, LocalFileSystem):
    """Local disk, failing as a network filesystem (NFS) does: resets and timeouts."""

    def _fault(self, op: str, path: str) -> BaseException:
        if self.fault_kind == "permanent":
            return PermissionError(errno.EACCES, "Permission denied", path)
        return random.choice(
            [
                ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
                TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
            ]
        )


try:  # the emulators' filesystems, where their libraries are installed
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    from gcsfs import GCSFileSystem
    from gcsfs.retry import HttpError

    class FaultyGCS(_Mixin, GCSFileSystem):
        """GCS through gcsfs, failing as the GCS JSON API does: 503, 429, or 403."""

        def _fault(self, op: str, path: str) -> BaseException:
            if self.fault_kind == "permanent":
                return HttpError({"code": 403, "message": f"Access denied to {path}"})
            code = random.choice([429, 503])
            return HttpError({"code": code, "message": "Backend Error"})

except ImportError:  # pragma: no cover
    pass

try:
    from botocore.exceptions import ClientError
    from s3fs import S3FileSystem
    from s3fs.errors import translate_boto_error

    class FaultyS3(_Mixin, S3FileSystem):
        """S3 through s3fs, failing as S3 does: SlowDown (503) or AccessDenied."""

        def _fault(self, op: str, path: str) -> BaseException:
            code, status = (
                ("AccessDenied", 403) if self.fault_kind == "permanent" else ("SlowDown", 503)
            )
            error = ClientError(
                {
                    "Error": {"Code": code, "Message": f"{code} on {path}"},
                    "ResponseMetadata": {"HTTPStatusCode": status},
                },
                op,
            )
            return translate_boto_error(error)  # what s3fs raises from botocore's error

except ImportError:  # pragma: no cover
    pass
