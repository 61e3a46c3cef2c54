"""CPython's own ``Lib/test`` package, fetched once per machine for tests/test_stdlib_futures.py.

The package comes from Debian's (or Ubuntu's) packages for the running ``python3.X``:
``libpython3.X-testsuite`` ships the ``test_*.py`` files, ``libpython3.X-stdlib`` the
``test`` package itself (``test/__init__.py``, ``test/support``, ``test/libregrtest``).
Both are downloaded with ``apt-get download`` (no root needed, nothing is installed)
and unpacked with ``dpkg-deb -x``; only their ``usr/lib/python3.X/test`` is kept.

:func:`testsuite_path` returns a folder that holds that ``test`` package and nothing
importable besides, so putting it on a path shadows nothing but ``test``. It is
idempotent: the folder is built under an exclusive lock in a staging folder next to
it and renamed into place when complete, so two runs never see half of it, and a
complete folder is returned without any download.

Where it lives: ``$BATCHPOOL_TEST_CACHE/cpython-testsuite-3.X`` (default
``~/.cache/batchpool-tests``). ``$BATCHPOOL_CPYTHON_TESTSUITE`` names a prepared folder
(one holding ``test/``) to use instead, e.g. on a machine without apt.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import platformdirs

__all__ = [
    "REQUIRED_FILES",
    "TestsuiteUnavailable",
    "cache_root",
    "packages",
    "testsuite_path",
]

#: Files the folder must hold for tests/test_stdlib_futures.py (relative to it).
REQUIRED_FILES = (
    "test/__init__.py",
    "test/support/__init__.py",
    "test/support/script_helper.py",
    "test/support/threading_helper.py",
    "test/test_concurrent_futures.py",
)
#: The file that records where the folder came from, written last.
SOURCE_FILE = "SOURCE.json"
#: Bounds on the commands that fetch it: a hung mirror must not hang the test run.
DOWNLOAD_TIMEOUT = 300.0
UPDATE_TIMEOUT = 600.0
#: How long a run waits for another run that is building the folder.
LOCK_TIMEOUT = 900.0


class TestsuiteUnavailable(RuntimeError):
    """The test suite could not be found or fetched; the message says why and what to do."""

    __test__ = False  # not a test class, whatever pytest's name pattern says


def cache_root() -> Path:
    """The folder under which fetched suites are kept."""
    given = os.environ.get("BATCHPOOL_TEST_CACHE")
    return Path(given) if given else Path(platformdirs.user_cache_dir("batchpool-tests"))


def packages(version: str) -> tuple[str, str]:
    """The Debian packages that together hold CPython ``version``'s ``test`` package."""
    return f"libpython{version}-stdlib", f"libpython{version}-testsuite"


def testsuite_path(version: str | None = None) -> Path:
    """The folder that holds CPython ``version``'s ``test`` package (default: this Python's).

    Fetched on first use and kept; raises :class:`TestsuiteUnavailable` with the reason
    (and the output of the failing command) when it cannot be had.
    """
    version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
    given = os.environ.get("BATCHPOOL_CPYTHON_TESTSUITE")
    if given:
        folder = Path(given)
        missing = _missing_files(folder)
        if missing:
            raise TestsuiteUnavailable(
                f"BATCHPOOL_CPYTHON_TESTSUITE={given} lacks {', '.join(missing)}"
            )
        return folder
    root = cache_root()
    folder = root / f"cpython-testsuite-{version}"
    if _complete(folder):
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TestsuiteUnavailable(f"cannot create the cache folder {root}: {exc}") from exc
    with _locked(root / f"cpython-testsuite-{version}.lock"):
        if _complete(folder):  # another run built it while we waited
            return folder
        if folder.exists():  # incomplete or damaged by hand: set it aside, build anew
            shutil.rmtree(folder, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".cpython-testsuite-{version}-", dir=root))
        try:
            _build(staging, version)
            os.rename(staging / "lib", folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not _complete(folder):  # pragma: no cover - _build checks the same files
        raise TestsuiteUnavailable(f"{folder} is incomplete after it was built")
    return folder


def _missing_files(folder: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def _complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and not _missing_files(folder)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes, waited for at most LOCK_TIMEOUT."""
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TestsuiteUnavailable(
                        f"another run has held {path} for {LOCK_TIMEOUT:.0f} s while "
                        f"fetching the CPython test suite; remove the lock if it is stale"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run(command: Sequence[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, LC_ALL="C"),
        )
    except subprocess.TimeoutExpired as exc:
        raise TestsuiteUnavailable(
            f"`{' '.join(command)}` did not finish in {timeout:.0f} s"
        ) from exc
    except OSError as exc:
        raise TestsuiteUnavailable(f"cannot run `{' '.join(command)}`: {exc}") from exc


def _tail(result: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    text = (result.stdout + result.stderr).strip().splitlines()
    return "\n".join(text[-lines:]) or "(no output)"


def _download(package: str, where: Path) -> Path:
    """``apt-get download package`` into ``where``; one ``apt-get update`` when the
    package lists are missing or stale (as root only: it needs root)."""
    command = ["apt-get", "download", package]
    result = _run(command, where, DOWNLOAD_TIMEOUT)
    if result.returncode != 0 and os.geteuid() == 0:
        update = _run(["apt-get", "update"], where, UPDATE_TIMEOUT)
        if update.returncode != 0:
            raise TestsuiteUnavailable(
                f"`apt-get download {package}` failed and so did `apt-get update`:\n"
                f"{_tail(result)}\n{_tail(update)}"
            )
        result = _run(command, where, DOWNLOAD_TIMEOUT)
    debs = sorted(where.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        hint = (
            ""
            if os.geteuid() == 0
            else " (as a user other than root, run `sudo apt-get update` first)"
        )
        raise TestsuiteUnavailable(f"`apt-get download {package}` failed{hint}:\n{_tail(result)}")
    return debs[-1]


def _build(staging: Path, version: str) -> None:
    """Download both packages into ``staging`` and leave ``staging/lib/test``."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise TestsuiteUnavailable(
                f"`{tool}` is not installed: the CPython {version} test suite is fetched as "
                f"the Debian packages {' and '.join(packages(version))}; on another system "
                f"point BATCHPOOL_CPYTHON_TESTSUITE at a folder holding CPython's Lib/test"
            )
    unpacked = staging / "unpacked"
    unpacked.mkdir()
    sources = []
    for package in packages(version):
        deb = _download(package, staging)
        result = _run(["dpkg-deb", "-x", str(deb), str(unpacked)], staging, DOWNLOAD_TIMEOUT)
        if result.returncode != 0:
            raise TestsuiteUnavailable(f"`dpkg-deb -x {deb.name}` failed:\n{_tail(result)}")
        sources.append({"package": package, "file": deb.name, "sha256": _sha256(deb)})
    lib = staging / "lib"
    lib.mkdir()
    found = unpacked / "usr" / "lib" / f"python{version}" / "test"
    if not found.is_dir():
        raise TestsuiteUnavailable(
            f"the packages {' and '.join(packages(version))} hold no usr/lib/python{version}/test"
        )
    os.rename(found, lib / "test")
    missing = _missing_files(lib)
    if missing:
        raise TestsuiteUnavailable(
            f"the packages {' and '.join(packages(version))} lack {', '.join(missing)}"
        )
    record = {"python": version, "packages": sources, "fetched": time.time()}
    (lib / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":  # pragma: no cover - for a manual fetch
    print(testsuite_path(*sys.argv[1:2]))
