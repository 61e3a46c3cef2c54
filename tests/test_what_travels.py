"""What travels to the worker: shared data stored once, put(), the worker's blob cache,
version checks and missing modules. Counts of bytes and reads, never times."""

from __future__ import annotations

import os
import pickle
import secrets
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem

from batchpool import BatchPoolExecutor, BlobRef, EnvironmentMismatchError, IntegrityError
from batchpool.serialization import (
    client_versions,
    decode_outcome,
    encode_chunk,
    get_serializer,
    outcome_values,
    seal,
    unseal,
)
from batchpool.store import STORE_ENV, Store
from batchpool.worker import SECRET_ENV

SIZE = 20 * 2**20  # a 20 MiB argument
READ_LOG = "BATCHPOOL_TEST_BLOB_READ_LOG"
SERIALIZERS = ["cloudpickle", "dill"]


class CountingFS(LocalFileSystem):
    """The real local filesystem, counting the bytes this process writes and logging
    every blob read (from any process) to the file named by $BATCHPOOL_TEST_BLOB_READ_LOG."""

    written = 0

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        CountingFS.written += len(value)
        super().pipe_file(path, value, *args, **kwargs)

    def cat_file(self, path: str, *args: Any, **kwargs: Any) -> bytes:
        log = os.environ.get(READ_LOG)
        if log and "/blobs/" in str(path):
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {path}\n")
        return bytes(super().cat_file(path, *args, **kwargs))


def size_plus(data: Any, i: int = 0) -> int:
    return len(data) + i


def nested_size(cfg: dict[str, Any]) -> int:
    return len(cfg["data"]) + cfg["n"]


def identity_of(data: Any, _: int = 0) -> int:
    return id(data)


@pytest.fixture
def counting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path]:
    log = tmp_path / "blob-reads.log"
    monkeypatch.setenv(READ_LOG, str(log))  # set before the workers start: they inherit it
    CountingFS.written = 0
    return (CountingFS(), str(tmp_path / "runs")), log


def blob_reads(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_one_object_passed_to_100_calls_is_written_once(
    counting: tuple[Any, Path], serializer: str
) -> None:
    storage, _ = counting
    big = os.urandom(SIZE)
    with BatchPoolExecutor(max_workers=2, storage=storage, serializer=serializer) as ex:
        futures = [ex.submit(size_plus, big, i) for i in range(100)]
        assert [f.result() for f in futures] == [SIZE + i for i in range(100)]
        blobs = list(Path(ex.run_url, "blobs").iterdir())
    assert len(blobs) == 1
    assert CountingFS.written < 1.1 * SIZE, f"wrote {CountingFS.written:,} bytes"


def test_client_memory_does_not_grow_with_the_calls(tmp_path: Path) -> None:
    script = tmp_path / "rss.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, resource
            from batchpool import BatchPoolExecutor

            def size(data, i):
                return len(data) + i

            big = os.urandom({SIZE})
            with BatchPoolExecutor(max_workers=2, storage={str(tmp_path / "runs")!r}) as ex:
                ex.submit(size, b"warm", 0).result()
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                futures = [ex.submit(size, big, i) for i in range(100)]
                assert [f.result() for f in futures] == [{SIZE} + i for i in range(100)]
                after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(after - before)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    growth = int(done.stdout.split()[-1])
    assert growth < 3 * SIZE, f"peak RSS grew by {growth:,} bytes for a {SIZE:,}-byte argument"


def test_a_chunk_of_1000_calls_loads_the_shared_argument_once(
    counting: tuple[Any, Path],
) -> None:
    storage, log = counting
    big = os.urandom(SIZE)
    with BatchPoolExecutor(max_workers=2, storage=storage) as ex:
        total = sum(ex.map(size_plus, [big] * 1000, range(1000), chunksize=1000))
        assert total == 1000 * SIZE + sum(range(1000))
        assert blob_reads(log) == 1
        # Later chunks on the same workers find it in their cache: at most one read each.
        assert sum(ex.map(size_plus, [big] * 40, range(40), chunksize=4)) == 40 * SIZE + 780
        assert blob_reads(log) <= 2


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_put_returns_a_handle_that_any_call_can_take(tmp_path: Path, serializer: str) -> None:
    data = os.urandom(3 * 2**20)
    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), serializer=serializer) as ex:
        ref = ex.put(data)
        assert isinstance(ref, BlobRef) and ref.type_name == "bytes"
        assert len(pickle.dumps(ref)) < 500  # the handle is small, whatever it holds
        assert ex.submit(size_plus, ref, 1).result() == len(data) + 1
        assert list(ex.map(size_plus, [ref] * 3, range(3))) == [len(data) + i for i in range(3)]
        # Anywhere inside an argument.
        assert ex.submit(nested_size, {"data": ref, "n": 2}).result() == len(data) + 2
        # A small object works too, and put() of the same content writes nothing new.
        assert ex.submit(size_plus, ex.put([1, 2, 3])).result() == 3
        ex.put(data)
        assert len(list(Path(ex.run_url, "blobs").iterdir())) == 2


def test_calls_in_one_worker_share_the_loaded_object(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path)) as ex:
        ref = ex.put(bytearray(10))
        ids = set(ex.map(identity_of, [ref] * 20, range(20), chunksize=5))
    assert len(ids) == 1  # loaded once by the one worker, then shared: treat it as read-only


def test_small_arguments_stay_inline(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path), cleanup_bucket=False) as ex:
        assert ex.submit(size_plus, b"x" * 1000).result() == 1000
        assert not list(Path(ex.run_url, "blobs").iterdir())


def test_blob_threshold_is_settable(tmp_path: Path) -> None:
    with BatchPoolExecutor(
        max_workers=1, storage=str(tmp_path), blob_threshold=10_000, cleanup_bucket=False
    ) as ex:
        assert ex.submit(size_plus, b"x" * 20_000).result() == 20_000
        assert len(list(Path(ex.run_url, "blobs").iterdir())) == 1
    with pytest.raises(ValueError, match="blob_threshold"):
        BatchPoolExecutor(storage=str(tmp_path), blob_threshold=0)


def test_a_large_function_closure_travels_once(tmp_path: Path) -> None:
    table = os.urandom(2 * 2**20)

    def lookup(i: int) -> int:
        return table[i]

    with BatchPoolExecutor(max_workers=2, storage=str(tmp_path), cleanup_bucket=False) as ex:
        assert list(ex.map(lookup, range(100), chunksize=10)) == list(table[:100])
        run = Path(ex.run_url)
    assert len(list((run / "blobs").iterdir())) == 1
    assert sum(p.stat().st_size for p in (run / "chunks").iterdir()) < 100_000


def test_a_very_large_argument_is_named_in_a_warning(tmp_path: Path) -> None:
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path), payload_warning=50_000) as ex:
        with pytest.warns(UserWarning, match=r"kwargs\['data'\] of the call to size_plus\(\)"):
            future = ex.submit(size_plus, data=b"x" * 100_000)
        assert future.result() == 100_000


def test_a_blob_changed_in_storage_is_refused_before_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path / "runs")) as ex:
        ref = ex.put(b"honest data")
        Path(ex.run_url, "blobs", ref.digest).write_bytes(pickle.dumps(Evil()))
        with pytest.raises(IntegrityError, match="does not hold the content its name promises"):
            ex.submit(size_plus, ref).result()
    assert not marker.exists()


# -- client and worker agree, or say why not -------------------------------------------------


def run_worker_on(tmp_path: Path, header: dict[str, str], calls: int = 2) -> list[Any]:
    """Write a chunk with ``header`` and run ``python -m batchpool.worker`` on it by hand."""
    store = Store(LocalFileSystem(), str(tmp_path / "run"))
    store.create()
    secret = secrets.token_bytes(32)
    serializer = get_serializer("cloudpickle")
    chunk_id = uuid.uuid4().hex
    key = store.chunk_key(chunk_id)
    payload = serializer.dumps((abs, [((-i,), {}) for i in range(calls)]))
    store.put(key, seal(secret, key, encode_chunk(header, [(calls, payload, ())])))
    env = dict(os.environ, **{STORE_ENV: store.spec(), SECRET_ENV: secret.hex()})
    done = subprocess.run(
        [sys.executable, "-m", "batchpool.worker", "--chunk", chunk_id, "--attempt", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result_key = store.result_key(chunk_id, 1)
    _, entries = decode_outcome(unseal(secret, result_key, store.get(result_key)))
    values, errors = outcome_values(entries, serializer, lambda first, n: True)
    return [(False, errors[i]) if i in errors else (True, v) for i, v in enumerate(values)]


def test_a_worker_on_another_python_fails_the_calls_saying_both_versions(tmp_path: Path) -> None:
    header = {**client_versions(get_serializer("cloudpickle")), "python": "3.99.1"}
    outcomes = run_worker_on(tmp_path, header)
    assert len(outcomes) == 2
    for ok, error in outcomes:
        assert not ok and isinstance(error, EnvironmentMismatchError)
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        assert "Python 3.99.1" in str(error) and f"Python {here}" in str(error)
        assert "image=" in str(error)


def test_a_worker_with_another_serializer_major_fails_the_calls(tmp_path: Path) -> None:
    header = {**client_versions(get_serializer("cloudpickle")), "serializer_version": "99.0"}
    [(ok, error), _] = run_worker_on(tmp_path, header)
    assert not ok and isinstance(error, EnvironmentMismatchError)
    assert "cloudpickle 99.0" in str(error)


def test_a_matching_worker_runs_the_calls(tmp_path: Path) -> None:
    outcomes = run_worker_on(tmp_path, client_versions(get_serializer("cloudpickle")), 3)
    assert outcomes == [(True, 0), (True, 1), (True, 2)]


def test_a_module_missing_on_the_worker_is_named_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "vanishing_mod.py").write_text("def hello():\n    return 'hi'\n")
    monkeypatch.syspath_prepend(str(folder))
    import vanishing_mod  # type: ignore[import-not-found]

    (folder / "vanishing_mod.py").unlink()  # the workers, started after this, cannot import it
    try:
        with (
            BatchPoolExecutor(max_workers=1, storage=str(tmp_path / "runs")) as ex,
            pytest.raises(ModuleNotFoundError) as info,
        ):
            ex.submit(vanishing_mod.hello).result()
    finally:
        sys.modules.pop("vanishing_mod", None)
    assert info.value.name == "vanishing_mod"
    assert "the worker cannot import 'vanishing_mod'" in str(info.value)
    assert "install it in the worker's environment" in str(info.value)


# -- a pickling problem is named at submit time ------------------------------------------------

GLOBAL_LOCK = __import__("threading").Lock()


class Settings:
    def __init__(self) -> None:
        import threading

        self.client = threading.Lock()


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_pickling_errors_are_raised_at_once_naming_the_culprit(
    tmp_path: Path, serializer: str
) -> None:
    import asyncio
    import threading

    from batchpool import SerializationError

    def uses_global(x: int) -> int:
        with GLOBAL_LOCK:
            return x

    uses_global.__module__ = "__main__"  # pickled by value, as a script's function is
    bad = threading.Lock() if serializer == "cloudpickle" else ProxyLike()
    with BatchPoolExecutor(max_workers=1, storage=str(tmp_path), serializer=serializer) as ex:
        with pytest.raises(SerializationError, match=r"kwargs\['cfg'\]"):
            ex.submit(size_plus, b"", cfg={"x": bad})
        with pytest.raises(SerializationError, match=r"chunk of items 2 to 3\): item 1: args\[0\]"):
            ex.map(size_plus, [b"a", b"b", b"c", bad], chunksize=2)
        with pytest.raises(SerializationError, match=r"put\(obj\): args\[0\]\['a'\]\[1\]"):
            ex.put({"a": [1, bad]})

        async def via_asyncio() -> None:
            with pytest.raises(SerializationError, match=r"args\[0\]"):
                await ex.async_submit(size_plus, bad)

        asyncio.run(via_asyncio())
        if serializer == "cloudpickle":
            with pytest.raises(SerializationError, match="global 'GLOBAL_LOCK'") as info:
                ex.submit(uses_global, 1)
            assert isinstance(info.value.__cause__, TypeError)
            with pytest.raises(SerializationError, match=r"self\.client|args\[0\]\.client"):
                ex.submit(size_plus, Settings())
        assert ex.submit(size_plus, b"still works").result() == 11  # nothing was queued


class ProxyLike:
    """Like wrapt's ObjectProxy: refuses every pickler, dill included."""

    def __reduce_ex__(self, protocol: int) -> Any:
        raise NotImplementedError("object proxy must define __reduce_ex__()")


# -- the user's own code runs where it cannot be imported ---------------------------------------


def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    """A package of the user's that only this process can import; returns its ``shapes``.

    Shipping by value is registered process-wide, so each test uses its own name."""
    folder = tmp_path / "src" / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("from .shapes import Point\nSCALE = 3\n")
    (folder / "shapes.py").write_text(
        textwrap.dedent(
            f"""
            from dataclasses import dataclass

            import {name}

            @dataclass
            class Point:
                x: int
                y: int

                def scaled(self):
                    return Point(self.x * {name}.SCALE, self.y * {name}.SCALE)

            def norm1(p):
                return abs(p.x) + abs(p.y)

            def make(x):
                return Point(x, -x).scaled()
            """
        )
    )
    monkeypatch.syspath_prepend(str(folder.parent))
    import importlib

    return importlib.import_module(f"{name}.shapes")


@pytest.fixture(autouse=True)
def _forget_user_packages() -> Any:
    yield
    for module in [m for m in sys.modules if m.startswith("userpkg_")]:
        del sys.modules[module]


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_user_code_runs_on_workers_that_cannot_import_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serializer: str
) -> None:
    from foreign import ForeignProcessBackend

    name = f"userpkg_{serializer}"
    shapes = user_package(tmp_path, monkeypatch, name)
    backend = ForeignProcessBackend()
    can_import = subprocess.run(
        [sys.executable, "-c", f"import {name}"],
        cwd=backend.folder,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).parent.parent)},
        capture_output=True,
    )
    assert can_import.returncode != 0  # the workers' environment has no user package
    try:
        with BatchPoolExecutor(backend=backend, storage=str(tmp_path), serializer=serializer) as ex:
            assert ex.submit(shapes.norm1, shapes.Point(2, -5)).result() == 7
            made = list(ex.map(shapes.make, [1, 2]))
            assert [(p.x, p.y) for p in made] == [(3, -3), (6, -6)]
            if serializer == "cloudpickle":  # dill returns a rebuilt copy of the class
                assert all(isinstance(p, shapes.Point) for p in made)
    finally:
        backend.close()


def test_without_shipping_the_worker_names_the_missing_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from foreign import ForeignProcessBackend

    shapes = user_package(tmp_path, monkeypatch, "userpkg_unshipped")
    backend = ForeignProcessBackend()
    try:
        with BatchPoolExecutor(backend=backend, storage=str(tmp_path), ship_code=False) as ex:
            with pytest.raises(ModuleNotFoundError, match="cannot import 'userpkg_unshipped'") as e:
                ex.submit(shapes.norm1, shapes.Point(1, 1)).result()
            assert e.value.name == "userpkg_unshipped"
    finally:
        backend.close()


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_shared_data_and_put_on_workers_in_a_foreign_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serializer: str
) -> None:
    from foreign import ForeignProcessBackend

    shapes = user_package(tmp_path, monkeypatch, f"userpkg_blobs_{serializer}")
    big = os.urandom(2 * 2**20)
    backend = ForeignProcessBackend()
    try:
        with BatchPoolExecutor(
            backend=backend, storage=str(tmp_path / "runs"), serializer=serializer
        ) as ex:
            ref = ex.put([shapes.Point(1, 2), shapes.Point(3, 4)])
            assert ex.submit(lambda pts: sum(map(shapes.norm1, pts)), ref).result() == 10
            sizes = list(ex.map(size_plus, [big] * 6, range(6), chunksize=2))
            assert sizes == [len(big) + i for i in range(6)]
            assert len(list(Path(ex.run_url, "blobs").iterdir())) == 2
    finally:
        backend.close()


def test_a_worker_with_another_dill_major_fails_the_calls(tmp_path: Path) -> None:
    header = {**client_versions(get_serializer("dill")), "serializer_version": "99.1"}
    [(ok, error), _] = run_worker_on(tmp_path, header)
    assert not ok and isinstance(error, EnvironmentMismatchError)
    assert "dill 99.1" in str(error) and f"dill {get_serializer('dill').version}" in str(error)
