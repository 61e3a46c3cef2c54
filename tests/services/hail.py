"""hailtop (Hail Batch's client) for the tests, installed on first use into a cache folder.

There is no ``hailtop`` distribution on PyPI: it ships inside ``hail``, a 133 MB
wheel whose other requirements (pyspark, pandas, numpy, scipy, bokeh, ...) only
its query engine needs. :func:`ensure_hailtop` runs, once per cache folder::

    pip install --target DIR <hail's client requirements>
    pip install --target DIR --no-deps hail==VERSION

(the requirements with their dependencies first, then hail with ``--no-deps``)
and appends ``DIR`` to ``sys.path`` (appended: packages this environment already
has keep precedence). A finished install leaves a ``.complete`` file, so later
calls only add the folder; a lock file keeps parallel test processes from
installing twice. The folder is ``$BATCHPOOL_HAIL_CACHE`` or
``~/.cache/batchpool-tests/hail-VERSION``.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import subprocess
import sys
from pathlib import Path

HAIL_VERSION = "0.2.139"

#: hail's Requires-Dist without what only the query engine needs (pyspark, pandas,
#: numpy, scipy, bokeh, plotly, contourpy, avro, parsimonious, Deprecated, decorator).
#: jproperties stays: ``import hailtop.batch`` needs it.
CLIENT_REQUIREMENTS = (
    "aiodns>=2.0.0,<3",
    "aiohttp>=3.11.16,<4",
    "azure-identity>=1.23.0,<2",
    "azure-mgmt-storage==20.1.0",
    "azure-storage-blob>=12.11.0,<13",
    "boto3>=1.17,<2.0",
    "botocore>=1.20,<2.0",
    "dill>=0.4.0,<0.5",
    "frozenlist>=1.3.1,<2",
    "google-auth>=2.14.1,<3",
    "google-auth-oauthlib>=0.5.2,<1",
    "humanize>=4.0,<5",
    "janus>=0.6,<1.1",
    "nest_asyncio>=1.5.8,<2",
    "orjson>=3.9.15,<4",
    "rich>=12.6.0,<13",
    "typer>=0.9.0,<1",
    "python-json-logger>=2.0.2,<3",
    "pyyaml>=6.0,<7.0",
    "setuptools>=80.9.0,<82.0.0",
    "sortedcontainers>=2.4.0,<3",
    "tabulate>=0.8.9,<1",
    "uvloop>=0.19.0,<0.22.0",
    "jproperties>=2.1.1,<3",
    "requests>=2.32.4,<3",
)

#: How long the install may take (the wheel is 133 MB).
INSTALL_TIMEOUT = 900.0


class HailtopUnavailable(RuntimeError):
    """hailtop could not be installed or imported; the message says why."""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "batchpool-tests" / f"hail-{HAIL_VERSION}"
    return Path(os.environ.get("BATCHPOOL_HAIL_CACHE") or default)


def _add_to_path(target: Path) -> None:
    if str(target) not in sys.path:
        sys.path.append(str(target))
    importlib.invalidate_caches()


def ensure_hailtop() -> Path:
    """Make ``import hailtop.batch`` work (installing hail's client on first use); return the
    folder it was installed in. Raises :class:`HailtopUnavailable` with pip's output."""
    try:
        import hailtop.batch

        return Path(importlib.import_module("hailtop").__file__ or "").parent.parent
    except ImportError:
        pass
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    complete = target / ".complete"
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            # hail's client requirements with their own dependencies, then hail alone.
            pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            pip += ["--upgrade", "--target", str(target)]
            for argv in (
                [*pip, *CLIENT_REQUIREMENTS],
                [*pip, "--no-deps", f"hail=={HAIL_VERSION}"],
            ):
                try:
                    done = subprocess.run(
                        argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
                    )
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise HailtopUnavailable(f"pip could not install hail: {exc}") from exc
                if done.returncode != 0:
                    tail = (done.stdout + done.stderr)[-3000:]
                    raise HailtopUnavailable(
                        f"{' '.join(argv[2:6])} ... failed (exit {done.returncode}):\n{tail}"
                    )
            complete.write_text(HAIL_VERSION + "\n")
    _add_to_path(target)
    try:
        import hailtop.batch  # noqa: F401
    except Exception as exc:
        raise HailtopUnavailable(
            f"hailtop installed in {target} but does not import: {type(exc).__name__}: {exc}"
        ) from exc
    return target
