"""The storage emulators work, and the stores behave as batchpool needs them to.

Runs against real servers that the ``stores`` plugin starts (fake-gcs-server for
``gs://``, moto_server for ``s3://``), through the same clients a user has (gcsfs,
s3fs), and ends with batchpool itself running calls through each of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import pytest
from fsspec import AbstractFileSystem
from services.gcs import ZB_HNS_ENV, make_gcsfs
from services.s3 import make_s3fs

from batchpool import BatchPoolExecutor

KINDS = [pytest.param("gcs", marks=pytest.mark.gcs), pytest.param("s3", marks=pytest.mark.s3)]

#: A child process that builds a store must be quick: gcsfs's ~60 s bucket-type probe
#: (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT) is what this bound catches.
CHILD_DEADLINE = 20.0


@dataclass
class Remote:
    """One test's place in an emulated object store."""

    kind: str
    storage: dict[str, Any]  # what BatchPoolExecutor(**storage) takes
    fs: AbstractFileSystem  # the instance fsspec gives batchpool for that storage
    root: str  # bucket/prefix, no protocol
    make: Callable[..., AbstractFileSystem]  # make(**extra): another client, same service

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])


@pytest.fixture(params=KINDS)
def remote(request: pytest.FixtureRequest) -> Remote:
    storage = request.getfixturevalue(f"{request.param}_storage")
    fs, root = fsspec.core.url_to_fs(storage["storage"], **storage["storage_options"])
    endpoint = storage["storage_options"]["endpoint_url"]
    maker = make_gcsfs if request.param == "gcs" else make_s3fs
    return Remote(
        kind=request.param,
        storage=storage,
        fs=fs,
        root=root,
        make=lambda **extra: maker(endpoint, **extra),
    )


def _clean_env() -> dict[str, str]:
    """This environment without anything that could point a client at a store."""
    drop = ("AWS_", "GCSFS_", "GOOGLE_", "CLOUDSDK_", "STORAGE_EMULATOR_HOST", "MOTO_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _run_child(code: str, stdin: str, env: dict[str, str] | None) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; its last stdout line is a JSON report."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            input=stdin,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child process did not finish within 60 s: {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the fixtures themselves ----------------------------------------------------------------


def test_storage_fixtures_give_fresh_places(gcs_storage, s3_storage, gcs_service, s3_service):
    for storage, scheme in ((gcs_storage, "gs"), (s3_storage, "s3")):
        assert set(storage) == {"storage", "storage_options"}
        assert storage["storage"].startswith(f"{scheme}://batchpool-test/test_storage_fixtures")
        assert storage["storage_options"]["endpoint_url"].startswith("http://127.0.0.1:")
    for service in (gcs_service, s3_service):
        assert service.running, service
        assert service.startup_seconds < 20
        assert service.log_path.is_file()


def test_any_storage_opens(any_storage):
    fs, root = fsspec.core.url_to_fs(any_storage["storage"], **any_storage["storage_options"])
    fs.mkdirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/hello", b"hi")
    assert fs.cat_file(f"{root}/hello") == b"hi"


# -- what batchpool does with a store -------------------------------------------------------


def test_write_read_overwrite(remote: Remote):
    fs = remote.fs
    fs.pipe_file(remote.path("a", "one"), b"first")
    assert fs.cat_file(remote.path("a", "one")) == b"first"
    fs.pipe_file(remote.path("a", "one"), b"second, longer")
    assert fs.cat_file(remote.path("a", "one")) == b"second, longer"
    assert fs.cat_file(remote.path("a", "one"), start=-6) == b"longer"
    with pytest.raises(FileNotFoundError):
        fs.cat_file(remote.path("a", "missing"))


def test_20_mib_object(remote: Remote):
    data = os.urandom(20 << 20)
    fs = remote.fs
    fs.pipe_file(remote.path("big", "piped"), data)  # one request
    with fs.open(remote.path("big", "streamed"), "wb", block_size=5 << 20) as f:  # in parts
        for start in range(0, len(data), 3 << 20):
            f.write(data[start : start + (3 << 20)])
    for name in ("piped", "streamed"):
        fs.invalidate_cache(remote.path("big", name))
        assert fs.size(remote.path("big", name)) == len(data)
        assert fs.cat_file(remote.path("big", name)) == data


def test_listing_1100_objects_and_recursive_rm(remote: Remote):
    fs = remote.fs
    names = [f"{i:04d}" for i in range(1100)]  # more than one page (1,000) of listing
    fs.pipe({remote.path("many", name): name.encode() for name in names})
    fs.pipe_file(remote.path("many-sibling", "keep"), b"keep")  # shares the text prefix
    fs.pipe_file(remote.path("many", "sub", "deeper"), b"deep")

    fs.invalidate_cache(remote.root)
    found = fs.find(remote.path("many"))
    assert found == sorted(
        [remote.path("many", n) for n in names] + [remote.path("many", "sub", "deeper")]
    )
    fs.invalidate_cache(remote.root)
    listed = fs.ls(remote.path("many"), detail=False)
    assert len(listed) == 1101  # 1,100 objects and the "folder" sub
    assert remote.path("many", "sub") in [p.rstrip("/") for p in listed]

    fs.rm(remote.path("many"), recursive=True)
    fs.invalidate_cache(remote.root)
    assert fs.find(remote.path("many")) == []
    assert not fs.exists(remote.path("many", "0000"))
    assert fs.cat_file(remote.path("many-sibling", "keep")) == b"keep"


def test_exists_sees_new_objects_despite_listing_cache(remote: Remote):
    fs = remote.fs
    folder = remote.path("events")
    fs.pipe_file(f"{folder}/a", b"a")
    assert fs.ls(folder, detail=False) == [f"{folder}/a"]  # fills fsspec's dircache

    # Its own writes invalidate its own cache.
    fs.pipe_file(f"{folder}/b", b"b")
    assert fs.exists(f"{folder}/b")

    # Another client's write (a worker's) is not in this one's cached listing:
    # invalidate_cache(path) before exists/cat_file makes it visible.
    other = remote.make(skip_instance_cache=True)
    other.pipe_file(f"{folder}/c", b"c")
    fs.invalidate_cache(f"{folder}/c")
    assert fs.exists(f"{folder}/c")
    assert fs.cat_file(f"{folder}/c") == b"c"

    # A client without a listings cache never needs to.
    uncached = remote.make(skip_instance_cache=True, use_listings_cache=False)
    assert sorted(uncached.ls(folder, detail=False)) == [f"{folder}/{n}" for n in "abc"]
    other.pipe_file(f"{folder}/d", b"d")
    assert uncached.exists(f"{folder}/d")
    assert uncached.cat_file(f"{folder}/d") == b"d"


_FROM_JSON_CHILD = """
import json, sys, time
started = time.monotonic()
from fsspec import AbstractFileSystem
request = json.loads(sys.stdin.read())
fs = AbstractFileSystem.from_json(request["fs"])
fs.pipe_file(request["path"], request["payload"].encode())
print(json.dumps({"cls": type(fs).__module__ + ":" + type(fs).__name__,
                  "options": fs.storage_options, "seconds": time.monotonic() - started}))
"""


def test_object_written_by_a_process_that_rebuilt_the_fs_from_json(remote: Remote):
    """What batchpool's workers do (Store.spec / Store.from_spec), in a bare environment."""
    text = remote.fs.to_json()
    spec = json.loads(text)
    # What travels is the class and exactly the constructor's keyword arguments:
    # gs: endpoint_url, token="anon", project; s3: endpoint_url, key, secret (in clear).
    carried = {k: v for k, v in spec.items() if k not in ("cls", "protocol", "args")}
    assert carried == remote.storage["storage_options"]
    # The fast gcsfs class itself travels, whatever the child's environment says.
    assert (
        spec["cls"]
        == {"gcs": "gcsfs.core:GCSFileSystem", "s3": "s3fs.core:S3FileSystem"}[remote.kind]
    )

    path = remote.path("from-child", "object")
    report = _run_child(
        _FROM_JSON_CHILD,
        json.dumps({"fs": text, "path": path, "payload": "written by the child"}),
        env=_clean_env(),  # no AWS_*, no GCSFS_*, no STORAGE_EMULATOR_HOST
    )
    assert report["cls"] == spec["cls"]
    assert report["options"] == remote.storage["storage_options"]
    assert report["seconds"] < CHILD_DEADLINE, report
    remote.fs.invalidate_cache(path)
    assert remote.fs.exists(path)
    assert remote.fs.cat_file(path) == b"written by the child"


_INHERITED_ENV_CHILD = """
import json, os, sys, time
started = time.monotonic()
import fsspec, gcsfs, gcsfs.core
request = json.loads(sys.stdin.read())
fs, root = fsspec.core.url_to_fs(request["storage"], **request["storage_options"])
fs.pipe_file(root + "/from-url", b"ok")
print(json.dumps({"env": os.environ.get(request["var"]), "seconds": time.monotonic() - started,
                  "fast_class": gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem,
                  "cls": type(fs).__name__}))
"""


@pytest.mark.gcs
def test_child_processes_inherit_the_fast_gcsfs(gcs_storage):
    """A child (as batchpool's local workers are) inherits GCSFS_..._SUPPORT=false."""
    assert os.environ[ZB_HNS_ENV] == "false"
    report = _run_child(
        _INHERITED_ENV_CHILD, json.dumps({**gcs_storage, "var": ZB_HNS_ENV}), env=None
    )
    assert report["env"] == "false"
    assert report["fast_class"] and report["cls"] == "GCSFileSystem", report
    assert report["seconds"] < CHILD_DEADLINE, report


# -- batchpool end to end -------------------------------------------------------------------


def test_executor_end_to_end(remote: Remote):
    started = time.monotonic()
    with BatchPoolExecutor(max_workers=2, **remote.storage) as ex:
        assert list(ex.map(abs, range(-50, 0), timeout=60)) == list(range(50, 0, -1))
        assert ex.submit(pow, 2, 10).result(timeout=60) == 1024
    assert time.monotonic() - started < 30
    remote.fs.invalidate_cache(remote.root)
    assert remote.fs.find(remote.root) == []  # cleanup_bucket=True: the run is gone


def test_executor_results_travel_through_the_store(remote: Remote):
    with BatchPoolExecutor(max_workers=2, cleanup_bucket=False, **remote.storage) as ex:
        assert ex.submit(divmod, 7, 2).result(timeout=60) == (3, 1)
    remote.fs.invalidate_cache(remote.root)
    keys = [path[len(remote.root) + 1 :] for path in remote.fs.find(remote.root)]
    run_ids = {key.split("/")[0] for key in keys}
    assert len(run_ids) == 1, keys
    relative = sorted(key.split("/", 1)[1] for key in keys)
    assert "manifest.json" in relative
    assert any(k.startswith("chunks/") and k.endswith(".in") for k in relative), relative
    # written by a worker process, through the emulator:
    assert any(k.startswith("results/") and k.endswith(".out") for k in relative), relative


@pytest.mark.parametrize(
    "remote",
    [
        pytest.param("gcs", marks=pytest.mark.gcs),
        pytest.param("s3", marks=pytest.mark.s3),
    ],
    indirect=True,
)
def test_executor_survives_a_listing_of_its_run(remote: Remote):
    """Looking at a run while it works must not hide its next results from it.

    ``remote.fs`` is the very instance the executor uses (fsspec caches instances by
    their arguments), so this listing fills the executor's listings cache too.
    """
    with BatchPoolExecutor(max_workers=1, cleanup_bucket=False, **remote.storage) as ex:
        assert ex.submit(pow, 2, 3).result(timeout=60) == 8
        (run,) = remote.fs.ls(remote.root, detail=False)
        assert len(remote.fs.ls(f"{run}/results", detail=False)) == 1
        assert ex.submit(pow, 2, 4).result(timeout=60) == 16
