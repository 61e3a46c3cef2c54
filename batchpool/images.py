"""Worker images that match this client: a base image, the user's requirements, and this
batchpool with the very versions of its serializer and storage libraries.

A worker unpickles what this client pickled, so both must run the same Python minor
version and the same serializer (the worker checks and says so when they differ). The
image is built from a Dockerfile written into a fresh folder:

- the base image must have ``python3`` of this client's minor version, and pip;
- one layer installs batchpool's dependencies pinned to the versions installed here
  (cloudpickle, dill, fsspec, msgspec, ... and s3fs/gcsfs when this client has them),
  and the user's ``requirements.txt``;
- the last layer copies this batchpool package (the files of this installation, so an
  unreleased or edited checkout is what runs), so rebuilding after a change of
  batchpool alone is quick: the engine's cache keeps the layers before it.

``build_image`` runs ``docker build`` (or ``podman build``) with the host's network, so
pip reaches the index the host reaches. ``batchpool image build`` is its command line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from batchpool.errors import BackendError

#: Distributions installed into a worker image, when this client has them, at its versions.
WORKER_DISTRIBUTIONS = (
    "cloudpickle",
    "dill",
    "fsspec",
    "msgspec",
    "platformdirs",
    "tenacity",
    "tqdm",
    "s3fs",
    "gcsfs",
)
#: Where the batchpool package lives inside a worker image.
IMAGE_PACKAGE_ROOT = "/opt/batchpool"
#: Seconds one image build may take.
BUILD_TIMEOUT = 1800.0


def find_engine(engine: str | None = None) -> str:
    """The container engine's command: ``engine`` if given (a name or a path), else
    ``docker`` or ``podman``, whichever is found first on the PATH."""
    for name in [engine] if engine else ["docker", "podman"]:
        path = shutil.which(name)
        if path:
            return path
    wanted = repr(engine) if engine else "docker or podman"
    raise BackendError(
        f"no container engine found: {wanted} is not on the PATH; install one "
        "(Debian: apt-get install docker.io, or podman) or name its command with engine="
    )


def pinned_requirements() -> list[str]:
    """``name==version`` of each of ``WORKER_DISTRIBUTIONS`` installed here."""
    pins = []
    for name in WORKER_DISTRIBUTIONS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version}")
    return pins


def package_folder() -> Path:
    """The folder of the batchpool package this client imports."""
    return Path(__file__).resolve().parent


def package_digest() -> str:
    """A short digest of batchpool's own files and the pins: a tag that changes with them."""
    digest = hashlib.sha256()
    for pin in pinned_requirements():
        digest.update(pin.encode() + b"\n")
    root = package_folder()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def dockerfile(base: str, *, has_requirements: bool) -> str:
    """The Dockerfile of a worker image on ``base``."""
    major, minor = sys.version_info[:2]
    user_requirements = " -r /tmp/batchpool/requirements.txt" if has_requirements else ""
    check = (
        "import sys; v = sys.version_info[:2]; "
        f"sys.exit(0 if v == ({major}, {minor}) else "
        f"'batchpool: the base image runs Python %d.%d, but the client runs {major}.{minor}: "
        "pickled functions do not carry across Python versions; choose a base image with "
        f"python3 {major}.{minor}' % v)"
    )
    return "\n".join(
        [
            f"FROM {base}",
            "ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "
            "PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1",
            f'RUN python3 -c "{check}"',
            "RUN python3 -m pip --version >/dev/null 2>&1 || { echo 'batchpool: the base image "
            "has python3 but not pip; install pip in it (Debian: python3-pip)' >&2; exit 1; }",
            "COPY pins.txt requirements.txt /tmp/batchpool/",
            "RUN python3 -m pip install --no-cache-dir -r /tmp/batchpool/pins.txt"
            f"{user_requirements}",
            f"COPY batchpool {IMAGE_PACKAGE_ROOT}/batchpool",
            f"ENV PYTHONPATH={IMAGE_PACKAGE_ROOT}",
            'RUN python3 -c "import batchpool.worker"',
            "",
        ]
    )


def write_context(folder: Path, base: str, requirements: str | None = None) -> None:
    """Write a worker image's build context into ``folder``: the Dockerfile, the pins,
    the user's requirements and a copy of this batchpool package."""
    has_requirements = False
    user = ""
    if requirements is not None:
        path = Path(requirements)
        if not path.is_file():
            raise ValueError(
                f"requirements file {requirements!r} does not exist; give the path of a "
                "pip requirements file (one requirement per line)"
            )
        user = path.read_text()
        has_requirements = bool(user.strip())
    (folder / "pins.txt").write_text("\n".join(pinned_requirements()) + "\n")
    (folder / "requirements.txt").write_text(user)
    (folder / "Dockerfile").write_text(dockerfile(base, has_requirements=has_requirements))
    shutil.copytree(
        package_folder(),
        folder / "batchpool",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )


def build_image(
    base: str,
    tag: str,
    requirements: str | None = None,
    *,
    engine: str | None = None,
    network: str | None = "host",
    extra_args: Sequence[str] = (),
    quiet: bool = True,
) -> str:
    """Build a worker image ``tag`` from ``base`` and return its tag.

    ``requirements`` is a pip requirements file installed in the image as well.
    Raises ``BackendError`` with the tail of the build's output when it fails.
    """
    for label, value in (("base", base), ("tag", tag)):
        if not isinstance(value, str) or not value or value.startswith("-") or " " in value:
            raise ValueError(f"{label}={value!r} is not an image name")
    command = find_engine(engine)
    with tempfile.TemporaryDirectory(prefix="batchpool-image-") as folder:
        write_context(Path(folder), base, requirements)
        argv = [command, "build", "-t", tag]
        if network:
            argv += ["--network", network]
        argv += [*extra_args, folder]
        env = {**os.environ, "DOCKER_BUILDKIT": os.environ.get("DOCKER_BUILDKIT", "0")}
        try:
            proc = subprocess.run(
                argv,
                capture_output=quiet,
                text=True,
                timeout=BUILD_TIMEOUT,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BackendError(
                f"`{' '.join(argv[:4])} ...` did not finish in {BUILD_TIMEOUT:.0f} s"
            ) from None
        if proc.returncode != 0:
            output = ((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()
            tail = "\n".join(output[-25:])
            raise BackendError(
                f"building the worker image {tag!r} from {base!r} failed (exit status "
                f"{proc.returncode}); the last lines of the build:\n{tail}"
            )
    return tag
