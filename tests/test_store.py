"""The run's storage: atomic objects, signed frames, the manifest, cleanup.

And, end to end with real worker processes, that neither side unpickles what
does not carry the run's signature.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import secrets
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import cloudpickle
import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import given, settings
from hypothesis import strategies as st

import batchpool
from batchpool import BatchPoolExecutor, IntegrityError, JobState, LocalBackend
from batchpool.errors import FATAL_EXIT_CODE
from batchpool.serialization import (
    MAGIC,
    client_versions,
    decode_outcome,
    encode_chunk,
    get_serializer,
    outcome_values,
    seal,
    unseal,
)
from batchpool.store import StorageError, Store
from batchpool.worker import SECRET_ENV, STORE_ENV

pytestmark = pytest.mark.timeout(60)

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))


def make_store(folder: Path) -> Store:
    store = Store(LocalFileSystem(), str(folder))
    store.create()
    return store


def tmp_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def run_folder(ex: BatchPoolExecutor) -> Path:
    fs, path = fsspec.core.url_to_fs(ex.run_url)
    assert isinstance(fs, LocalFileSystem)
    return Path(path)


class CreatesFolder:
    """A pickle whose loading creates a folder: proof of whether it was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# -- Store on a local folder ---------------------------------------------------------------


def test_create_makes_the_run_folders(tmp_path):
    make_store(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {
        "chunks",
        "results",
        "logs",
        "events",
        "blobs",
    }


@settings(max_examples=30, deadline=None, database=None)
@given(data=st.binary(max_size=100_000), name=st.text("abcdef0123456789", min_size=1, max_size=20))
def test_put_get_round_trip_leaves_no_temporary_files(tmp_path_factory, data, name):
    folder = tmp_path_factory.mktemp("store")
    store = make_store(folder)
    key = store.result_key(name, 1)
    store.put(key, data)
    assert store.get(key) == data
    assert store.exists(key)
    assert (folder / "results" / f"{name}.1.out").read_bytes() == data
    assert tmp_leftovers(folder) == []


def test_put_overwrites_whole_object(tmp_path):
    store = make_store(tmp_path)
    store.put("chunks/a.in", b"x" * 10_000)
    store.put("chunks/a.in", b"short")
    assert store.get("chunks/a.in") == b"short"
    assert tmp_leftovers(tmp_path) == []


def test_get_of_a_missing_key_raises_file_not_found(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(FileNotFoundError):
        store.get("results/nothing.1.out")
    assert not store.exists("results/nothing.1.out")


def test_put_into_a_missing_folder_fails_and_leaves_nothing(tmp_path):
    store = Store(LocalFileSystem(), str(tmp_path / "never-created"))
    with pytest.raises(StorageError, match="its folder is missing"):
        store.put("chunks/a.in", b"data")
    assert not (tmp_path / "never-created").exists()


def test_readers_see_whole_objects_while_writers_replace_them(tmp_path):
    store = make_store(tmp_path)
    versions = [bytes([i]) * 300_000 for i in range(4)]
    key = "results/contended.1.out"
    store.put(key, versions[0])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            while not stop.is_set():
                store.put(key, versions[index])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(1, 4)]
    for t in threads:
        t.start()
    try:
        for _ in range(200):
            assert store.get(key) in versions  # never a mix, never a partial object
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert tmp_leftovers(tmp_path) == []


def test_spec_round_trip(tmp_path):
    store = make_store(tmp_path / "run")
    spec = store.spec()
    assert isinstance(spec, str)
    json.loads(spec)  # plain JSON: it travels in an environment variable
    again = Store.from_spec(spec)
    assert again.root == store.root
    assert again.url == store.url
    assert isinstance(again.fs, LocalFileSystem)
    store.put("chunks/x.in", b"written by one")
    assert again.get("chunks/x.in") == b"written by one"
    again.put("results/x.1.out", b"written by the other")
    assert store.get("results/x.1.out") == b"written by the other"


def test_delete_run_removes_only_the_run_folder(tmp_path):
    store = make_store(tmp_path / "run-1")
    store.put("results/a.1.out", b"a")
    store.put(store.MANIFEST, b"{}")
    # Siblings, some sharing the run's name as a prefix.
    for sibling in ("run-10", "run-1.bak", "other"):
        make_store(tmp_path / sibling).put("results/a.1.out", b"keep me")
    (tmp_path / "run-1-notes.txt").write_text("keep me")

    store.delete_run()

    assert not (tmp_path / "run-1").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other",
        "run-1-notes.txt",
        "run-1.bak",
        "run-10",
    ]
    for sibling in ("run-10", "run-1.bak", "other"):
        assert (tmp_path / sibling / "results" / "a.1.out").read_bytes() == b"keep me"
    store.delete_run()  # deleting a deleted run is a no-op


# -- signed frames -------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, database=None)
@given(body=st.binary(max_size=2000), key=st.text(min_size=1, max_size=40))
def test_seal_unseal_round_trip(body, key):
    frame = seal(SECRET, key, body)
    assert frame.startswith(MAGIC)
    assert unseal(SECRET, key, frame) == body


@settings(max_examples=200, deadline=None, database=None)
@given(body=st.binary(min_size=1, max_size=500), data=st.data())
def test_a_frame_altered_by_one_byte_is_refused(body, data):
    key = "results/0123abcd.1.out"
    frame = bytearray(seal(SECRET, key, body))
    index = data.draw(st.integers(0, len(frame) - 1), label="index")
    delta = data.draw(st.integers(1, 255), label="delta")
    frame[index] = (frame[index] + delta) % 256
    with pytest.raises(IntegrityError, match=key):
        unseal(SECRET, key, bytes(frame))


@settings(max_examples=50, deadline=None, database=None)
@given(body=st.binary(max_size=500), data=st.data())
def test_a_truncated_frame_is_refused(body, data):
    key = "chunks/abc.in"
    frame = seal(SECRET, key, body)
    cut = data.draw(st.integers(0, len(frame) - 1), label="cut")
    with pytest.raises(IntegrityError, match=key):
        unseal(SECRET, key, frame[:cut])


def test_a_frame_copied_to_another_key_is_refused():
    body = pickle.dumps({"value": 42})
    frame = seal(SECRET, "results/aaaa.1.out", body)
    for other in ("results/bbbb.1.out", "results/aaaa.2.out", "chunks/aaaa.in"):
        with pytest.raises(IntegrityError, match=other):
            unseal(SECRET, other, frame)


def test_a_frame_signed_with_another_secret_is_refused():
    key = "chunks/cafe.in"
    frame = seal(OTHER_SECRET, key, b"body")
    with pytest.raises(IntegrityError, match=key):
        unseal(SECRET, key, frame)


def test_a_frame_without_magic_is_refused():
    key = "chunks/cafe.in"
    with pytest.raises(IntegrityError, match=key):
        unseal(SECRET, key, pickle.dumps("not a frame") * 20)
    with pytest.raises(IntegrityError, match=key):
        unseal(SECRET, key, b"")


def test_refused_frame_is_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    key = "results/feed.1.out"
    evil = pickle.dumps(CreatesFolder(str(marker)))
    for frame in (
        MAGIC + bytes(32) + evil,
        seal(OTHER_SECRET, key, evil),
        seal(SECRET, "results/other.1.out", evil),
    ):
        with pytest.raises(IntegrityError):
            decode_outcome(unseal(SECRET, key, frame))
    assert not marker.exists()
    with pytest.raises(TypeError):  # the control: a signed frame is unpickled, and runs it
        decode_outcome(unseal(SECRET, key, seal(SECRET, key, evil)))
    assert marker.exists()


# -- the worker, run by hand on a store in tmp_path ----------------------------------------


def _greet(x):
    print(f"hello from call {x}")
    return x * 2


@pytest.fixture
def hand_run(tmp_path):
    """A store, a secret, and a way to run ``python -m batchpool.worker`` on one chunk."""
    store = make_store(tmp_path / "run")
    secret = secrets.token_bytes(32)
    serializer = get_serializer("cloudpickle")
    env = {
        **os.environ,
        STORE_ENV: store.spec(),
        SECRET_ENV: secret.hex(),
        # Functions of this module travel by reference: let the worker import it.
        "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p),
    }

    def write_valid_chunk(fn, calls) -> str:
        chunk_id = uuid.uuid4().hex
        key = store.chunk_key(chunk_id)
        payload = serializer.dumps((fn, [((x,), {}) for x in calls]))
        body = encode_chunk(client_versions(serializer), [(len(calls), payload, ())])
        store.put(key, seal(secret, key, body))
        return chunk_id

    def run(chunk_id: str, attempt: int = 1) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "batchpool.worker",
                "--chunk",
                chunk_id,
                "--attempt",
                str(attempt),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    return store, secret, serializer, write_valid_chunk, run


def test_worker_runs_a_signed_chunk(hand_run, tmp_path):
    store, secret, serializer, write_valid_chunk, run = hand_run
    chunk_id = write_valid_chunk(_greet, [3, 4])
    done = run(chunk_id, attempt=2)
    assert done.returncode == 0, done.stdout + done.stderr

    key = store.result_key(chunk_id, 2)
    assert [p.name for p in (tmp_path / "run" / "results").iterdir()] == [f"{chunk_id}.2.out"]
    meta, entries = decode_outcome(unseal(secret, key, store.get(key)))
    assert meta["chunk"] == chunk_id
    assert meta["attempt"] == 2
    # One entry for the group: its values, pickled together.
    assert outcome_values(entries, serializer, lambda first, n: True) == ([6, 8], {})

    log = store.get(store.log_key(chunk_id, 2)).decode()
    assert "hello from call 3" in log
    assert "hello from call 4" in log
    assert "hello from call 3" in done.stdout  # and the engine's own log gets it too
    assert tmp_leftovers(tmp_path) == []


def test_worker_run_by_hand_prints_no_warning(hand_run):
    _, _, _, write_valid_chunk, run = hand_run
    done = run(write_valid_chunk(_greet, [1]))
    assert done.returncode == 0
    assert "RuntimeWarning" not in done.stderr


def _tampered_frames(secret: bytes, key: str, marker: str) -> dict[str, bytes]:
    evil = pickle.dumps(CreatesFolder(marker))
    return {
        "unsigned": MAGIC + bytes(32) + evil,
        "other-secret": seal(OTHER_SECRET, key, evil),
        "signed-for-another-key": seal(secret, "chunks/someone-else.in", evil),
        "no-frame": evil,
    }


@pytest.mark.parametrize(
    "how", ["unsigned", "other-secret", "signed-for-another-key", "no-frame", "flipped-byte"]
)
def test_worker_refuses_a_tampered_chunk_before_unpickling(hand_run, tmp_path, how):
    store, secret, _, write_valid_chunk, run = hand_run
    marker = tmp_path / "unpickled"
    chunk_id = write_valid_chunk(_greet, [1])
    key = store.chunk_key(chunk_id)
    if how == "flipped-byte":
        frame = bytearray(store.get(key))
        frame[-5] ^= 0x01
        store.put(key, bytes(frame))
    else:
        store.put(key, _tampered_frames(secret, key, str(marker))[how])

    done = run(chunk_id)
    assert done.returncode == FATAL_EXIT_CODE  # a retry would read the same bytes
    assert "IntegrityError" in done.stdout + done.stderr
    assert key in done.stdout + done.stderr
    assert not marker.exists()
    # The outcome says so, with no result in it: the client fails the calls at once.
    [outcome] = (tmp_path / "run" / "results").iterdir()
    result_key = f"results/{outcome.name}"
    meta, entries = decode_outcome(unseal(secret, result_key, outcome.read_bytes()))
    assert entries == [] and meta["fatal"].startswith("IntegrityError: ") and key in meta["fatal"]


def test_worker_reports_a_refused_chunk_on_stderr(hand_run, tmp_path):
    store, secret, _, write_valid_chunk, run = hand_run
    chunk_id = write_valid_chunk(_greet, [1])
    key = store.chunk_key(chunk_id)
    store.put(key, _tampered_frames(secret, key, str(tmp_path / "m"))["unsigned"])
    done = run(chunk_id)
    assert done.returncode != 0
    assert "IntegrityError" in done.stderr


def test_worker_without_the_secret_refuses_to_start(hand_run, tmp_path):
    store, _, _, write_valid_chunk, _ = hand_run
    chunk_id = write_valid_chunk(_greet, [1])
    env = {k: v for k, v in os.environ.items() if k not in (STORE_ENV, SECRET_ENV)}
    env[STORE_ENV] = store.spec()
    done = subprocess.run(
        [sys.executable, "-m", "batchpool.worker", "--chunk", chunk_id, "--attempt", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert SECRET_ENV in done.stderr
    assert list((tmp_path / "run" / "results").iterdir()) == []


# -- end to end through an executor --------------------------------------------------------


def write_file(path: str) -> str:
    Path(path).write_text("ran")
    return "ran"


class TamperingBackend(LocalBackend):
    """Real local workers, and an attacker with write access to the storage (not the secret).

    ``target="chunk"`` rewrites each chunk input after the executor wrote it and
    before its job starts; ``target="result"`` rewrites each outcome after its job
    wrote it and before the executor reads it.
    """

    def __init__(self, target: str, marker: str) -> None:
        super().__init__(2, echo_output=False)
        self.target = target
        self.marker = marker
        self.tampered: list[str] = []

    def _evil(self, key: str) -> bytes:
        return MAGIC + bytes(32) + pickle.dumps(CreatesFolder(self.marker))

    def submit(self, jobs, notify=None):
        places = []
        for spec in jobs:
            store = Store.from_spec(spec.env[STORE_ENV])
            chunk_id, attempt = spec.args[1], int(spec.args[3])
            places.append((store, chunk_id, attempt))
            if self.target == "chunk":
                key = store.chunk_key(chunk_id)
                store.put(key, self._evil(key))
                self.tampered.append(key)

        def tampering_notify(event):
            if self.target == "result" and event.state is JobState.SUCCEEDED:
                for store, chunk_id, attempt in places:
                    key = store.result_key(chunk_id, attempt)
                    if key not in self.tampered and store.exists(key):
                        store.put(key, self._evil(key))
                        self.tampered.append(key)
            if notify is not None:
                notify(event)

        return super().submit(jobs, tampering_notify)


def test_worker_refuses_a_chunk_tampered_in_storage(tmp_path):
    marker = tmp_path / "unpickled"
    ran = tmp_path / "ran"
    backend = TamperingBackend("chunk", str(marker))
    try:
        with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), backend=backend) as ex:
            future = ex.submit(write_file, str(ran))
            error = future.exception(timeout=30)
    finally:
        backend.close()
    # Refused at once, as itself: a retry would read the same forged bytes.
    assert isinstance(error, IntegrityError)
    assert future.job is not None and future.job.attempt == 1
    assert backend.tampered == [backend.tampered[0]] and backend.tampered[0] in str(error)
    assert not marker.exists()  # the tampered pickle was never loaded
    assert not ran.exists()  # and the call never ran


def test_client_refuses_a_result_tampered_in_storage(tmp_path):
    marker = tmp_path / "unpickled"
    ran = tmp_path / "ran"
    backend = TamperingBackend("result", str(marker))
    try:
        with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), backend=backend) as ex:
            error = ex.submit(write_file, str(ran)).exception(timeout=30)
    finally:
        backend.close()
    assert ran.exists()  # the call ran on the worker...
    assert isinstance(error, IntegrityError)  # ...but its rewritten outcome was refused
    assert len(backend.tampered) == 1
    assert backend.tampered[0] in str(error)
    assert not marker.exists()  # without being unpickled


# -- the manifest and cleanup --------------------------------------------------------------


def test_manifest_written_at_creation(tmp_path):
    with BatchPoolExecutor(
        name="my run", max_workers=2, storage=str(tmp_path), cleanup_bucket=False
    ) as ex:
        folder = run_folder(ex)
        assert folder.parent == tmp_path
        assert folder.name.startswith("my-run-")
        manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["name"] == "my run"
    assert manifest["run_id"] == folder.name
    assert manifest["format"] == "batchpool-run/2"
    assert manifest["backend"] == {"name": "local", "options": {}}
    assert manifest["client"]["pid"] == os.getpid()
    assert manifest["created"]
    client = manifest["client"]
    assert client["python"] == platform.python_version()
    assert client["batchpool"] == batchpool.__version__
    assert client["serializer"] == "cloudpickle"
    assert client["serializer_version"] == cloudpickle.__version__
    assert manifest["settings"]["max_workers"] == 2
    assert manifest["settings"]["max_attempts"] == 3


def test_manifest_names_the_serializer(tmp_path):
    dill = pytest.importorskip("dill")
    with BatchPoolExecutor(
        max_workers=2, storage=str(tmp_path), serializer="dill", cleanup_bucket=False
    ) as ex:
        manifest = json.loads((run_folder(ex) / "manifest.json").read_text())
    assert manifest["client"]["serializer"] == "dill"
    assert manifest["client"]["serializer_version"] == dill.__version__


def leak_secret(path: str) -> int:
    """Write the run secret outside the store, so the test can look for it inside."""
    Path(path).write_text(os.environ[SECRET_ENV])
    return 1


def test_run_secret_is_never_written_to_storage(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    runs = tmp_path / "runs"
    with BatchPoolExecutor(max_workers=2, storage=str(runs), cleanup_bucket=False) as ex:
        assert ex.submit(leak_secret, str(outside / "secret")).result(timeout=30) == 1
        assert list(ex.map(leak_secret, [str(outside / "secret")] * 5, chunksize=2)) == [1] * 5
        folder = run_folder(ex)
    secret_hex = (outside / "secret").read_text()
    secret = bytes.fromhex(secret_hex)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.parent.name == "results" for p in files)
    for p in files:
        data = p.read_bytes()
        assert secret not in data, p
        assert secret_hex.encode() not in data, p


def test_cleanup_bucket_true_removes_the_run_after_shutdown(tmp_path):
    sibling = tmp_path / "sibling-run"
    make_store(sibling).put("results/x.1.out", b"keep")
    ex = BatchPoolExecutor(max_workers=2, storage=str(tmp_path), cleanup_bucket=True)
    folder = run_folder(ex)
    assert list(ex.map(pow, [2, 3], [5, 2])) == [32, 9]
    assert (folder / "manifest.json").exists()
    ex.shutdown(wait=True)
    assert not folder.exists()
    assert tmp_path.exists()
    assert (sibling / "results" / "x.1.out").read_bytes() == b"keep"


def test_cleanup_bucket_false_keeps_the_run(tmp_path):
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), cleanup_bucket=False) as ex:
        folder = run_folder(ex)
        assert ex.submit(_greet, 5).result(timeout=30) == 10
    assert (folder / "manifest.json").exists()
    outcomes = list((folder / "results").iterdir())
    assert len(outcomes) == 1
    assert outcomes[0].name.endswith(".1.out")
    logs = list((folder / "logs").iterdir())
    assert len(logs) == 1
    assert "hello from call 5" in logs[0].read_text()
    assert len(list((folder / "chunks").iterdir())) == 1
    assert tmp_leftovers(folder) == []


# -- the forms of storage= --------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "pathlike", "file-url", "fs-and-root"])
def test_storage_forms(tmp_path, form):
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "runs"
    storage = {
        "path": str(root),
        "pathlike": root,
        "file-url": f"file://{root}",
        "fs-and-root": (LocalFileSystem(), str(root)),
    }[form]
    with BatchPoolExecutor(max_workers=1, storage=storage, cleanup_bucket=False) as ex:
        assert ex.submit(abs, -4).result() == 4
        assert ex.run_url.startswith(str(root) + "/")
    assert len(list(root.glob("*/results/*.out"))) == 1


@pytest.mark.parametrize(
    "storage, error, words",
    [
        ("", ValueError, "names no place"),
        (42, TypeError, r"got 42 \(int\)"),
        (("not a filesystem", "root"), TypeError, "fsspec filesystem, root"),
        ("nosuchprotocol://bucket/x", ValueError, "cannot be opened with fsspec"),
    ],
)
def test_bad_storage_is_refused_clearly(storage, error, words):
    with pytest.raises(error, match=words):
        BatchPoolExecutor(storage=storage)


def test_memory_storage_is_refused_because_workers_cannot_see_it():
    with pytest.raises(ValueError, match="lives inside this process"):
        BatchPoolExecutor(storage="memory://batchpool")
