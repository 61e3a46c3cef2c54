"""Shipping the user's own code by value, proved with real workers that cannot import it.

A package written to a temporary folder is imported here (the client) only. Its
calls are written as signed chunks and run by ``python -m batchpool.worker`` in
another folder, with an environment that has batchpool and nothing of the
user's: a worker that cannot ``import userpkg`` still runs its functions.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import dill
import pytest
from fsspec.implementations.local import LocalFileSystem

import batchpool
import batchpool.serialization
import batchpool.worker
from batchpool import codeship
from batchpool.codeship import is_user_module, ship_user_code
from batchpool.serialization import (
    ERROR,
    OK,
    SECRET_ENV,
    VALUES,
    Entry,
    Serializer,
    client_versions,
    decode_outcome,
    encode_chunk,
    entry_outcome,
    get_serializer,
    seal,
    unseal,
)
from batchpool.store import STORE_ENV, Store

pytestmark = pytest.mark.timeout(60)

#: The folder that holds the batchpool package: all a worker gets on its path.
BATCHPOOL_HOME = Path(batchpool.__file__).resolve().parent.parent
SERIALIZERS = ["cloudpickle", "dill"]

USERPKG = {
    "__init__.py": '''
        """A user's package: on the client's sys.path only, never installed."""
        from userpkg.shapes import Point

        SCALE = 3
    ''',
    "shapes.py": """
        class Point:
            def __init__(self, x, y, label=""):
                self.x, self.y, self.label = x, y, label

            def scaled(self, k):
                return Point(self.x * k, self.y * k, self.label)  # the class uses itself
    """,
    "helpers.py": """
        import json

        import userpkg
        from userpkg import shapes  # a module of the package, as a global
        from userpkg.shapes import Point  # a class of the package, as a global

        OFFSET = 10  # a module-level constant


        def _label(point):  # a helper function of the package
            return json.dumps([point.x, point.y])


        def move(point, k, *, dx=0):
            moved = shapes.Point(point.x + OFFSET + dx, point.y, point.label)
            moved = moved.scaled(k * userpkg.SCALE)
            moved.label = _label(moved)
            return moved


        def origin():
            return Point(0, 0, "origin")
    """,
}


def write_package(folder: Path, name: str, files: dict[str, str]) -> None:
    package = folder / name
    package.mkdir(parents=True)
    for filename, text in files.items():
        (package / filename).write_text(textwrap.dedent(text))


def drop_modules(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def fresh_codeship() -> Iterator[None]:
    """Each test starts and ends with nothing registered by codeship in this process."""
    codeship._forget()
    yield
    codeship._forget()


@pytest.fixture
def on_path(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Put folders on this process's sys.path for the test; forget what was imported."""
    added: list[str] = []

    def add(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(folder))
        added.append(str(folder))
        importlib.invalidate_caches()
        return folder

    yield add
    for folder in added:
        sys.path.remove(folder)
    for prefix in ("userpkg", "otherpkg", "lonely_module", "fakeinstalled"):
        drop_modules(prefix)


@pytest.fixture
def userpkg(on_path: Callable[[str], Path]) -> types.ModuleType:
    """``userpkg.helpers``, imported from ``<tmp>/src`` in this process only."""
    write_package(on_path("src"), "userpkg", USERPKG)
    return importlib.import_module("userpkg.helpers")


@dataclass
class HandWorker:
    """A store, a run secret and ``python -m batchpool.worker`` in a bare environment."""

    store: Store
    secret: bytes
    env: dict[str, str]
    cwd: Path

    def run(self, serializer: Serializer, fn: Any, calls: list[tuple[Any, Any]]) -> list[Entry]:
        chunk_id = uuid.uuid4().hex
        key = self.store.chunk_key(chunk_id)
        body = encode_chunk(
            client_versions(serializer), [(len(calls), serializer.dumps((fn, calls)), ())]
        )
        self.store.put(key, seal(self.secret, key, body))
        done = self.python("-m", "batchpool.worker", "--chunk", chunk_id, "--attempt", "1")
        assert done.returncode == 0, done.stdout + done.stderr
        result_key = self.store.result_key(chunk_id, 1)
        _, entries = decode_outcome(unseal(self.secret, result_key, self.store.get(result_key)))
        return per_call(entries, serializer)

    def python(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def worker(tmp_path: Path) -> HandWorker:
    store = Store(LocalFileSystem(), str(tmp_path / "run"))
    store.create()
    secret = secrets.token_bytes(32)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        STORE_ENV: store.spec(),
        SECRET_ENV: secret.hex(),
        "PYTHONPATH": str(BATCHPOOL_HOME),
    }
    return HandWorker(store, secret, env, elsewhere)


def assert_cannot_import(worker: HandWorker, name: str) -> None:
    done = worker.python("-c", f"import {name}")
    assert done.returncode != 0, f"the worker's environment can import {name}"
    assert f"No module named '{name}'" in done.stderr


# -- what is a user module ------------------------------------------------------------------


def test_a_module_of_the_project_is_a_user_module(on_path: Callable[[str], Path]) -> None:
    (on_path("project") / "lonely_module.py").write_text("VALUE = 1\n")
    assert is_user_module(importlib.import_module("lonely_module"))


def test_main_is_a_user_module(tmp_path: Path, worker: HandWorker) -> None:
    assert is_user_module(types.ModuleType("__main__"))  # -c code, a REPL, a notebook
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from batchpool.codeship import is_user_module\n"
        "print(is_user_module(sys.modules['__main__']))\n"
    )
    done = worker.python(str(script))
    assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr


@pytest.mark.parametrize(
    "module",
    [json, pytest, cloudpickle, dill, sys, os, batchpool, batchpool.worker, codeship],
    ids=lambda m: m.__name__,
)
def test_libraries_and_batchpool_are_not_user_modules(module: types.ModuleType) -> None:
    assert not is_user_module(module)


def test_batchpool_is_excluded_by_name_even_from_a_source_checkout() -> None:
    if "site-packages" in batchpool.__file__ or "dist-packages" in batchpool.__file__:
        pytest.skip("batchpool is installed, not a source checkout")
    # By its place alone this checkout would be user code; its name keeps it out.
    assert codeship._is_user_location(batchpool.__file__, "batchpool")
    assert not is_user_module(batchpool)


def test_a_package_in_a_site_packages_folder_is_not_a_user_module(
    on_path: Callable[[str], Path],
) -> None:
    folder = on_path("venv/lib/python3/site-packages")
    write_package(folder, "fakeinstalled", {"__init__.py": "VALUE = 1\n"})
    assert not is_user_module(importlib.import_module("fakeinstalled"))


# -- the decisive test: a worker that cannot import the user's code runs it ------------------


@pytest.mark.parametrize("name", SERIALIZERS)
def test_user_code_runs_on_a_worker_that_cannot_import_it(
    name: str, userpkg: types.ModuleType, worker: HandWorker
) -> None:
    from userpkg.shapes import Point

    serializer = get_serializer(name)
    calls = [((Point(1, 2, "a"), 2), {"dx": 5}), ((Point(0, 1), 1), {})]
    ship_user_code(name, [userpkg.move, calls[0][0], calls[0][1]])
    assert_cannot_import(worker, "userpkg")

    entries = worker.run(serializer, userpkg.move, calls)

    outcomes = [entry_outcome(entry, serializer) for entry in entries]
    assert [ok for ok, _ in outcomes] == [True, True], outcomes
    moved = [value for _, value in outcomes]
    # x: (1 + OFFSET + dx) * k * SCALE; y: 2 * k * SCALE; the label from the helper.
    assert [(p.x, p.y, p.label) for p in moved] == [(96, 12, "[96, 12]"), (30, 3, "[30, 3]")]
    assert [(type(p).__module__, type(p).__qualname__) for p in moved] == [
        ("userpkg.shapes", "Point")
    ] * 2
    assert moved[0].scaled(2).x == 192  # the class came with its methods
    if name == "cloudpickle":  # cloudpickle gives back the client's own class
        assert all(type(p) is Point for p in moved)


@pytest.mark.parametrize("name", SERIALIZERS)
def test_without_shipping_the_worker_cannot_find_the_user_module(
    name: str, userpkg: types.ModuleType, worker: HandWorker
) -> None:
    """The control: the same call, not shipped, fails on the same worker."""
    from userpkg.shapes import Point

    serializer = get_serializer(name)
    entries = worker.run(serializer, userpkg.move, [((Point(1, 2), 2), {})])

    [entry] = entries
    assert entry[0] == ERROR
    assert entry[2] == "ModuleNotFoundError"
    assert "'userpkg'" in entry[3]
    ok, error = entry_outcome(entry, serializer)
    assert not ok
    assert isinstance(error, ModuleNotFoundError)
    assert error.name == "userpkg"


@pytest.mark.parametrize("name", SERIALIZERS)
def test_a_user_class_given_as_an_argument_is_shipped(
    name: str, userpkg: types.ModuleType, worker: HandWorker
) -> None:
    """A user's object reaches the worker inside a stdlib function's arguments."""
    from userpkg.shapes import Point

    serializer = get_serializer(name)
    point = Point(4, 5, "arg")
    ship_user_code(name, [getattr, (point, "label")])
    entries = worker.run(serializer, getattr, [((point, "label"), {}), ((point, "scaled"), {})])
    (ok, label), (ok2, method) = (entry_outcome(entry, serializer) for entry in entries)
    assert ok and label == "arg"
    assert ok2 and method(3).x == 12


# -- what stays by reference ----------------------------------------------------------------


def _dumps(name: str, obj: Any) -> bytes:
    return get_serializer(name).dumps(obj)


@pytest.mark.parametrize("name", SERIALIZERS)
def test_installed_and_batchpool_functions_stay_pickled_by_reference(
    name: str, userpkg: types.ModuleType
) -> None:
    seal_fn = batchpool.serialization.seal
    ship_user_code(name, [userpkg.move, json.dumps, cloudpickle.dumps, dill.dumps, seal_fn])

    for fn, module in [
        (json.dumps, b"json"),
        (cloudpickle.dumps, b"cloudpickle"),
        (dill.dumps, b"dill"),
        (pytest.raises, b"_pytest"),
        (seal_fn, b"batchpool.serialization"),
        (batchpool.worker.run_chunk, b"batchpool.worker"),
    ]:
        data = _dumps(name, fn)
        assert module in data
        assert len(data) < 120, (fn, len(data))  # a name, not code
    assert len(_dumps(name, userpkg.move)) > 500  # while the user's function is code

    if name == "cloudpickle":
        shipped = cloudpickle.list_registry_pickle_by_value()
    else:
        shipped = set(codeship._hooks["dill"].packages)
    assert "userpkg" in shipped
    assert "userpkg.helpers" not in shipped  # the package is registered, not each module
    assert not {n for n in shipped if n.partition(".")[0] in {"batchpool", "json", "pytest"}}
    assert not {n for n in shipped if n.partition(".")[0] in {"_pytest", "cloudpickle", "dill"}}


def test_a_module_named_before_it_is_imported_is_shipped_once_it_is(
    on_path: Callable[[str], Path],
) -> None:
    early = type("Early", (), {"__module__": "otherpkg"})  # made before otherpkg exists
    ship_user_code("cloudpickle", [early])
    assert "otherpkg" not in cloudpickle.list_registry_pickle_by_value()

    write_package(on_path("later"), "otherpkg", {"__init__.py": "VALUE = 1\n"})
    importlib.import_module("otherpkg")
    ship_user_code("cloudpickle", [early])
    assert "otherpkg" in cloudpickle.list_registry_pickle_by_value()


@pytest.mark.parametrize("name", SERIALIZERS)
def test_a_script_rerun_by_multiprocessing_is_shipped(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawned child runs the script as ``__mp_main__``, which both serializers
    would pickle by reference (unlike ``__main__``)."""
    script = tmp_path / "script.py"
    script.write_text("def work(x):\n    return x + 1\n")
    module = types.ModuleType("__mp_main__")
    module.__file__ = str(script)
    exec(compile(script.read_text(), str(script), "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "__mp_main__", module)
    by_reference = _dumps(name, module.work)
    assert len(by_reference) < 120

    ship_user_code(name, [module.work])

    assert "__mp_main__" in codeship._hooks[name].packages
    by_value = _dumps(name, module.work)
    assert len(by_value) > len(by_reference) + 100  # code, not a name
    monkeypatch.delitem(sys.modules, "__mp_main__")  # as on a worker: nothing to import
    assert get_serializer(name).loads(by_value)(1) == 2


def test_unknown_serializer_is_refused() -> None:
    with pytest.raises(ValueError, match="pickle"):
        ship_user_code("pickle", [len])


# -- cost -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERIALIZERS)
def test_shipping_again_costs_no_new_decision_or_registration(
    name: str,
    userpkg: types.ModuleType,
    on_path: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts = {"register": 0, "sweep": 0, "decide": 0}
    registered: list[str] = []

    def counting(key: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            counts[key] += 1
            return real(*args)

        return wrapper

    real_register = cloudpickle.register_pickle_by_value
    real_dill_register = codeship._DillHook.register

    def cloudpickle_register(module: types.ModuleType) -> None:
        counts["register"] += 1
        registered.append(module.__name__)
        real_register(module)

    def dill_register(hook: codeship._DillHook, module: types.ModuleType) -> None:
        counts["register"] += 1
        registered.append(module.__name__)
        real_dill_register(hook, module)

    monkeypatch.setattr(cloudpickle, "register_pickle_by_value", cloudpickle_register)
    monkeypatch.setattr(codeship._DillHook, "register", dill_register)
    monkeypatch.setattr(codeship, "_sweep", counting("sweep", codeship._sweep))
    monkeypatch.setattr(codeship, "is_user_module", counting("decide", codeship.is_user_module))

    from userpkg.shapes import Point

    roots = [userpkg.move, (Point(1, 2), 3), {"dx": 1}]
    ship_user_code(name, roots)
    assert "userpkg" in registered
    first = dict(counts)
    assert first["sweep"] == 1

    for _ in range(10_000):
        ship_user_code(name, roots)
    assert counts == first
    assert registered.count("userpkg") == 1

    # A user module imported later is found by the next call, and registered once.
    write_package(on_path("later"), "otherpkg", {"__init__.py": "def f():\n    return 1\n"})
    importlib.import_module("otherpkg")
    for _ in range(3):
        ship_user_code(name, roots)
    assert counts["sweep"] == first["sweep"] + 1
    assert counts["register"] == first["register"] + 1
    assert registered[-1] == "otherpkg"


def per_call(entries: list[Any], serializer: Serializer) -> list[Any]:
    """An outcome's entries one per call: a group's ``VALUES`` entry is spread out."""
    spread: list[Any] = []
    for entry in entries:
        if entry[0] != VALUES:
            spread.append(entry)
            continue
        values = serializer.loads(entry[1])
        for i, value in enumerate(values):
            spread.append(entry[3].get(i) or (OK, serializer.dumps(value)))
    return spread
