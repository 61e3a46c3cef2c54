"""explain_pickling_error: the message walks from the call to the object that cannot be pickled.

Every case is checked with both serializers, except where the serializer can in
fact pickle the object (dill pickles locks, threads, open files and weakrefs).
Functions defined inside the tests are pickled by value by both serializers, so
their globals, closure variables and defaults are pickled too.
"""

from __future__ import annotations

import functools
import pickle
import socket
import sqlite3
import sys
import threading
import types
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool import SerializationError, diagnostics
from batchpool.diagnostics import _article, explain_pickling_error
from batchpool.serialization import get_serializer

SERIALIZERS = ["cloudpickle", "dill"]
Calls = list[tuple[tuple[Any, ...], dict[str, Any]]]

GLOBAL_HINT = "hint: import or create it inside the function, or pass a path and load it there"
ARGUMENT_HINT = (
    "hint: pass something picklable (a path, or the settings to rebuild it) and create the "
    "object inside the function"
)
PROXY_ERROR = "NotImplementedError: object proxy must define __reduce_ex__()"
PROXY = "(an ObjectProxy, module mymod)"

# A module standing for a third-party one, with a proxy class like wrapt's ObjectProxy.
MYMOD_SOURCE = '''
class ObjectProxy:
    """Like wrapt.ObjectProxy: refuses to be pickled."""

    def __init__(self, wrapped=None):
        self.__wrapped__ = wrapped

    def __reduce_ex__(self, protocol):
        raise NotImplementedError("object proxy must define __reduce_ex__()")

    def __call__(self, *args):
        return self.__wrapped__(*args)


CLIENT_PROXY = ObjectProxy()


def uses_proxy():
    return CLIENT_PROXY.__wrapped__
'''


def _make_mymod() -> types.ModuleType:
    module = types.ModuleType("mymod")
    exec(compile(MYMOD_SOURCE, "mymod.py", "exec"), module.__dict__)
    return module


mymod: types.ModuleType = sys.modules.setdefault("mymod", _make_mymod())
ObjectProxy: type = mymod.ObjectProxy

# Module globals the functions below use.
PROXY_GLOBAL = ObjectProxy()


class Config:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.name = "config"


CONFIG = Config(ObjectProxy())


def _make_helper() -> Callable[[], Any]:
    def helper() -> Any:  # defined in a function: pickled by value, with its globals
        return PROXY_GLOBAL

    return helper


HELPER = _make_helper()


class Service:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.retries = 3

    def run(self, x: int) -> int:
        return x


class Caller:
    def __init__(self, client: Any) -> None:
        self.label = "caller"
        self.client = client

    def __call__(self, x: int) -> int:
        return x


class Slotted:
    __slots__ = ("client", "size")

    def __init__(self, client: Any) -> None:
        self.size = 1
        self.client = client


Pair = namedtuple("Pair", ["name", "client"])


def target(*args: Any, **kwargs: Any) -> None:
    """An importable function: pickled by reference, so only the arguments can fail."""


def explain(
    serializer: str,
    fn: Callable[..., Any],
    calls: Calls | None = None,
    call: str = "f()",
) -> SerializationError:
    """Pickle the call as the executor does; explain the failure it must raise."""
    dumps = get_serializer(serializer).dumps
    calls = [((), {})] if calls is None else calls
    try:
        dumps((fn, calls))
    except Exception as exc:
        error: BaseException = exc
    else:
        raise AssertionError(f"the call pickled with {serializer}")
    result = explain_pickling_error(call, fn, calls, dumps, error)
    assert isinstance(result, SerializationError)
    assert isinstance(result, pickle.PicklingError)
    return result


def assert_proxy_cause(err: SerializationError) -> None:
    assert type(err.__cause__) is NotImplementedError
    assert str(err.__cause__) == "object proxy must define __reduce_ex__()"


@pytest.fixture(params=SERIALIZERS)
def serializer(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    s = socket.socket()
    yield s
    s.close()


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    yield conn
    conn.close()


# -- the exact message ------------------------------------------------------------------------


def test_message_shape_for_a_global_of_a_module_pickled_by_value() -> None:
    cloudpickle.register_pickle_by_value(mymod)
    try:
        err = explain("cloudpickle", mymod.uses_proxy, call="uses_proxy()")
    finally:
        cloudpickle.unregister_pickle_by_value(mymod)
    assert str(err) == (
        "cannot pickle the call to uses_proxy(): global 'CLIENT_PROXY' (an ObjectProxy, "
        "module mymod) failed:\n"
        "NotImplementedError: object proxy must define __reduce_ex__()\n"
        "hint: import or create it inside the function, or pass a path and load it there"
    )
    assert_proxy_cause(err)
    assert err.__cause__ is not None and err.__cause__.__traceback__ is not None


# -- what the function carries ------------------------------------------------------------------


def test_global(serializer: str) -> None:
    def f() -> Any:
        return PROXY_GLOBAL

    err = explain(serializer, f)
    assert f"cannot pickle the call to f(): global 'PROXY_GLOBAL' {PROXY} failed:\n" in str(err)
    assert PROXY_ERROR in str(err)
    assert str(err).endswith(GLOBAL_HINT)
    assert_proxy_cause(err)


def _in_comprehension() -> Any:
    return [PROXY_GLOBAL for _ in range(2)]


def _in_lambda() -> Any:
    return lambda: PROXY_GLOBAL


def _in_nested_def() -> Any:
    def inner() -> Any:
        return {k: PROXY_GLOBAL for k in "ab"}

    return inner


@pytest.mark.parametrize("uses", [_in_comprehension, _in_lambda, _in_nested_def])
def test_global_used_by_nested_code(serializer: str, uses: Callable[[], Any]) -> None:
    # A copy of the function, made in this test: pickled by value by both serializers.
    fn = types.FunctionType(uses.__code__, uses.__globals__, "uses")
    fn.__qualname__ = "test.<locals>.uses"
    err = explain(serializer, fn, call="uses()")
    assert f"uses(): global 'PROXY_GLOBAL' {PROXY} failed:" in str(err)
    assert_proxy_cause(err)


def test_global_path_descends_into_attributes(serializer: str) -> None:
    def f() -> Any:
        return CONFIG.client

    err = explain(serializer, f)
    assert f"f(): global 'CONFIG' -> CONFIG.client {PROXY} failed:" in str(err)
    assert str(err).endswith(GLOBAL_HINT)
    assert_proxy_cause(err)


def test_global_function_using_a_global(serializer: str) -> None:
    def f() -> Any:
        return HELPER()

    err = explain(serializer, f)
    assert f"f(): global 'HELPER' -> global 'PROXY_GLOBAL' {PROXY} failed:" in str(err)
    assert_proxy_cause(err)


def test_closure_variable(serializer: str, sock: socket.socket) -> None:
    def f() -> Any:
        return sock.fileno()

    err = explain(serializer, f)
    text = str(err)
    assert "f(): closure variable 'sock' (a socket, module socket) failed:\n" in text
    assert "TypeError: cannot pickle 'socket' object" in text
    assert text.endswith(
        "hint: sockets cannot travel: pass the address and connect inside the function"
    )
    assert type(err.__cause__) is TypeError


def test_closure_variable_holding_an_object(serializer: str) -> None:
    cfg = Config(ObjectProxy())

    def f() -> Any:
        return cfg

    err = explain(serializer, f)
    assert f"f(): closure variable 'cfg' -> cfg.client {PROXY} failed:" in str(err)
    assert str(err).endswith(GLOBAL_HINT)
    assert_proxy_cause(err)


def test_default_of_positional_argument(serializer: str) -> None:
    proxy = ObjectProxy()

    def f(x: int, conn: Any = proxy) -> Any:
        return x

    err = explain(serializer, f)
    assert f"f(): default of argument 'conn' {PROXY} failed:" in str(err)
    assert str(err).endswith(GLOBAL_HINT)
    assert_proxy_cause(err)


def test_default_of_keyword_only_argument(serializer: str, db: sqlite3.Connection) -> None:
    def f(x: int, *, conn: Any = db) -> Any:
        return x

    err = explain(serializer, f)
    text = str(err)
    assert "f(): default of argument 'conn' (a Connection, module sqlite3) failed:" in text
    assert text.endswith(
        "hint: database connections cannot travel: pass the connection settings (a URL or a "
        "path) and connect inside the function"
    )
    assert type(err.__cause__) is TypeError


def test_bound_method_names_self_attribute(serializer: str) -> None:
    err = explain(serializer, Service(ObjectProxy()).run, [((1,), {})], call="Service.run()")
    text = str(err)
    assert f"Service.run(): self.client {PROXY} failed:" in text
    assert "hint: create it inside the method" in text
    assert_proxy_cause(err)


def test_callable_object_names_its_attribute(serializer: str, db: sqlite3.Connection) -> None:
    err = explain(serializer, Caller(db), [((1,), {})], call="Caller()")
    assert "Caller(): self.client (a Connection, module sqlite3) failed:" in str(err)
    assert "database connections cannot travel" in str(err)
    assert type(err.__cause__) is TypeError


def test_callable_object_of_a_class_defined_in_a_function(serializer: str) -> None:
    class Local:
        def __call__(self) -> Any:
            return PROXY_GLOBAL

    err = explain(serializer, Local())
    assert f"class Local -> Local.__call__ -> global 'PROXY_GLOBAL' {PROXY} failed:" in str(err)
    assert str(err).endswith(GLOBAL_HINT)
    assert_proxy_cause(err)


def test_partial_argument(serializer: str) -> None:
    fn = functools.partial(target, 1, ObjectProxy())
    err = explain(serializer, fn, call="target()")
    assert f"target(): partial.args[1] {PROXY} failed:" in str(err)
    assert str(err).endswith(ARGUMENT_HINT)
    assert_proxy_cause(err)


def test_partial_keyword(serializer: str) -> None:
    fn = functools.partial(target, cfg=Config(ObjectProxy()))
    err = explain(serializer, fn, call="target()")
    assert f"target(): partial.keywords['cfg'].client {PROXY} failed:" in str(err)
    assert_proxy_cause(err)


def test_partial_func_global(serializer: str) -> None:
    def f(x: int) -> Any:
        return PROXY_GLOBAL

    err = explain(serializer, functools.partial(f, 1))
    assert f"f(): partial.func -> global 'PROXY_GLOBAL' {PROXY} failed:" in str(err)
    assert str(err).endswith(GLOBAL_HINT)


def test_the_function_itself(serializer: str) -> None:
    fn = ObjectProxy(print)  # a callable that refuses to be pickled, with nothing inside to blame
    err = explain(serializer, fn, [(("x",), {})])
    text = str(err)
    assert f"f(): the function {PROXY} failed:\n{PROXY_ERROR}\nhint: " in text
    assert "defined with def" in text
    assert_proxy_cause(err)


def test_the_function_itself_a_c_builtin() -> None:
    owner = Config(None)
    fn = weakref.ref(owner)  # callable, written in C, and cloudpickle cannot pickle it
    err = explain("cloudpickle", fn)
    assert "f(): the function (a ReferenceType, module weakref) failed:" in str(err)
    assert type(err.__cause__) is TypeError


# -- the arguments ------------------------------------------------------------------------------


def test_positional_argument(serializer: str) -> None:
    err = explain(serializer, target, [((1, ObjectProxy()), {})], call="target()")
    text = str(err)
    assert text.startswith(f"cannot pickle the call to target(): args[1] {PROXY} failed:\n")
    assert text.endswith(ARGUMENT_HINT)
    assert_proxy_cause(err)


def test_keyword_argument_attribute(serializer: str) -> None:
    calls = [((1,), {"retries": 2, "cfg": Config(ObjectProxy())})]
    err = explain(serializer, target, calls)
    assert f"f(): kwargs['cfg'].client {PROXY} failed:" in str(err)
    assert str(err).endswith(ARGUMENT_HINT)
    assert_proxy_cause(err)


def test_items_of_lists_and_dicts(serializer: str) -> None:
    calls: Calls = [(([0, 1, ObjectProxy()],), {})]
    assert f"f(): args[0][2] {PROXY} failed:" in str(explain(serializer, target, calls))
    calls = [((0, {"a": 1, "key": ObjectProxy()}), {})]
    assert f"f(): args[1]['key'] {PROXY} failed:" in str(explain(serializer, target, calls))
    calls = [(((1, (2, [ObjectProxy()])),), {})]
    assert f"f(): args[0][1][1][0] {PROXY} failed:" in str(explain(serializer, target, calls))
    calls = [(({3: {"x": Config(ObjectProxy())}},), {})]
    assert f"f(): args[0][3]['x'].client {PROXY} failed:" in str(explain(serializer, target, calls))


def test_set_item_and_dict_key(serializer: str) -> None:
    calls: Calls = [(({1, 2, ObjectProxy()},), {})]
    err = explain(serializer, target, calls)
    assert f"f(): args[0] -> an item of the set {PROXY} failed:" in str(err)
    assert_proxy_cause(err)
    calls = [(({ObjectProxy(): 1},), {})]
    err = explain(serializer, target, calls)
    assert f"f(): args[0] -> a key of the dict {PROXY} failed:" in str(err)


def test_slots_and_namedtuple_fields(serializer: str) -> None:
    err = explain(serializer, target, [((Slotted(ObjectProxy()),), {})])
    assert f"f(): args[0].client {PROXY} failed:" in str(err)
    assert_proxy_cause(err)
    err = explain(serializer, target, [((), {"pair": Pair("p", ObjectProxy())})])
    assert f"f(): kwargs['pair'].client {PROXY} failed:" in str(err)


def test_function_passed_as_argument(serializer: str) -> None:
    proxy = ObjectProxy()
    calls: Calls = [((lambda: proxy,), {})]
    err = explain(serializer, target, calls)
    assert f"f(): args[0] -> closure variable 'proxy' {PROXY} failed:" in str(err)
    assert str(err).endswith(GLOBAL_HINT)


def test_map_chunk_names_the_item(serializer: str) -> None:
    calls: Calls = [((i,), {}) for i in range(6)]
    calls[3] = (([1, ObjectProxy()],), {})
    err = explain(serializer, target, calls, call="target() in map")
    assert f"target() in map: item 3: args[0][1] {PROXY} failed:" in str(err)
    assert_proxy_cause(err)


def test_long_map_chunk_and_long_list(serializer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by the walk, however slow the machine: the walk's time budget (a second here
    # with dill on a loaded machine) is not what this test is about.
    monkeypatch.setattr(diagnostics, "TIME_BUDGET", 600.0)
    calls: Calls = [((i,), {}) for i in range(5000)]
    big = list(range(20_000))
    big[12_345] = ObjectProxy()
    calls[4321] = ((big,), {})
    err = explain(serializer, target, calls)
    assert f"f(): item 4321: args[0][12345] {PROXY} failed:" in str(err)


def test_single_call_has_no_item_prefix(serializer: str) -> None:
    err = explain(serializer, target, [((ObjectProxy(),), {})])
    assert "item" not in str(err)


# -- objects that can never travel --------------------------------------------------------------


def _open_for_writing(tmp_path: Path) -> Any:
    return open(tmp_path / "out.bin", "wb")  # closed by the test


def _generator() -> Iterator[int]:
    yield 1


KINDS: list[tuple[str, Callable[[Path], Any], str, str, tuple[str, ...]]] = [
    # name, factory, type description, hint, serializers that cannot pickle it
    (
        "lock",
        lambda _: threading.Lock(),
        "(a lock, module _thread)",
        "hint: locks cannot travel to another process",
        ("cloudpickle",),
    ),
    (
        "rlock",
        lambda _: threading.RLock(),
        "(an RLock, module _thread)",
        "hint: locks cannot travel to another process",
        ("cloudpickle",),
    ),
    (
        "thread",
        lambda _: threading.Thread(target=print),
        "(a Thread, module threading)",
        "hint: threads cannot travel to another process",
        ("cloudpickle",),
    ),
    (
        "socket",
        lambda _: socket.socket(),
        "(a socket, module socket)",
        "hint: sockets cannot travel: pass the address and connect inside the function",
        ("cloudpickle", "dill"),
    ),
    (
        "file",
        _open_for_writing,
        "(a BufferedWriter, module _io)",
        "hint: open files cannot travel: pass the path and open it inside the function",
        ("cloudpickle",),
    ),
    (
        "generator",
        lambda _: _generator(),
        "(a generator)",
        "hint: generators cannot be pickled: pass its items (list(gen))",
        ("cloudpickle", "dill"),
    ),
    (
        "database",
        lambda _: sqlite3.connect(":memory:"),
        "(a Connection, module sqlite3)",
        "hint: database connections cannot travel",
        ("cloudpickle", "dill"),
    ),
]


@pytest.mark.parametrize(
    ("serializer", "kind"),
    [(s, kind) for kind in KINDS for s in kind[4]],
    ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_specific_hints(
    serializer: str,
    kind: tuple[str, Callable[[Path], Any], str, str, tuple[str, ...]],
    tmp_path: Path,
) -> None:
    _, factory, description, hint, _ = kind
    obj = factory(tmp_path)
    try:
        err = explain(serializer, target, [((1,), {"cfg": Config(obj)})])
        text = str(err)
        assert f"f(): kwargs['cfg'].client {description} failed:\n" in text
        assert text.splitlines()[-1].startswith(hint)
        assert err.__cause__ is not None
        assert text.splitlines()[1] == f"{type(err.__cause__).__name__}: {err.__cause__}"

        def f() -> Any:
            return obj

        err = explain(serializer, f)
        assert f"f(): closure variable 'obj' {description} failed:\n" in str(err)
        assert str(err).splitlines()[-1].startswith(hint)
    finally:
        close = getattr(obj, "close", None)
        if close is not None:
            close()


# -- the walk is bounded and never raises ---------------------------------------------------------


def test_deep_nesting_is_cut_at_the_depth_bound(serializer: str) -> None:
    nested: Any = ObjectProxy()
    for _ in range(40):
        nested = [nested]
    err = explain(serializer, target, [((nested,), {})])
    text = str(err)
    assert text.startswith(f"cannot pickle the call to f(): args[0]{'[0]' * 10} (a list) failed:\n")
    assert "\n(the search stopped at this object; what cannot be pickled is inside it)\n" in text
    assert_proxy_cause(err)


def test_cycles(serializer: str) -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    loop.append({"me": loop, "bad": ObjectProxy()})
    err = explain(serializer, target, [((loop,), {})])
    assert f"f(): args[0][2]['bad'] {PROXY} failed:" in str(err)


def test_falls_back_to_the_original_error_when_nothing_alone_fails() -> None:
    def dumps(obj: Any) -> bytes:  # fails only on the whole call
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] is target:
            raise RuntimeError("only together")
        return pickle.dumps(obj)

    error = RuntimeError("the original error")
    err = explain_pickling_error("target()", target, [((1,), {})], dumps, error)
    assert isinstance(err, SerializationError)
    assert str(err).startswith(
        "cannot pickle the call to target(): RuntimeError: the original error\nhint: "
    )
    assert err.__cause__ is error


class Hostile:
    """Every attribute lookup and reduction blows up."""

    def __getattribute__(self, name: str) -> Any:
        raise RuntimeError(f"no {name}")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise RuntimeError("no reduce")


class OddReduce:
    def __reduce_ex__(self, protocol: Any) -> Any:
        return (Config, "not a tuple", object(), 42, "nope")


@pytest.mark.parametrize(
    "calls",
    [
        [None],
        [((Hostile(),), {})],
        [((OddReduce(),), {})],
        [((1,), {"x": Hostile()}), ((OddReduce(),), {})],
        "not calls",
    ],
    ids=["none", "hostile", "odd-reduce", "mixed", "string"],
)
def test_never_raises(serializer: str, calls: Any) -> None:
    dumps = get_serializer(serializer).dumps
    error = ValueError("original")
    err = explain_pickling_error("target()", target, calls, dumps, error)
    assert isinstance(err, SerializationError)
    assert str(err).startswith("cannot pickle the call to target(): ")
    assert err.__cause__ is not None


def test_never_raises_when_dumps_always_fails() -> None:
    def dumps(obj: Any) -> bytes:
        raise MemoryError("no memory")

    err = explain_pickling_error("f()", target, [((1, [2]), {})], dumps, MemoryError("x"))
    assert str(err).startswith("cannot pickle the call to f(): the function (a function) failed:")
    assert type(err.__cause__) is MemoryError


def test_articles() -> None:
    assert _article("ObjectProxy") == "an"
    assert _article("lock") == "a"
    assert _article("Connection") == "a"
    assert _article("RLock") == "an"
    assert _article("SSLSocket") == "an"
    assert _article("URLOpener") == "a"
    assert _article("_UnixSelectorEventLoop") == "a"
    assert _article("_Event") == "an"
    assert _article("IOBase") == "an"
    assert _article("UserDict") == "a"


# -- one bad leaf anywhere: the message names its exact path ---------------------------------------

KEYS = st.integers(-5, 50) | st.text(max_size=4)
PLAIN = st.recursive(
    st.integers() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(KEYS, inner, max_size=3)
    ),
    max_leaves=8,
)
BAD_LEAF = {"cloudpickle": threading.Lock(), "dill": ObjectProxy()}


@st.composite
def holding(draw: st.DrawFn, leaf: Any, depth: int = 4) -> tuple[Any, str]:
    """A structure holding ``leaf`` once, and the path from the structure to it."""
    kind = draw(st.sampled_from(["leaf", "list", "tuple", "dict"])) if depth > 0 else "leaf"
    if kind == "leaf":
        return leaf, ""
    inner, path = draw(holding(leaf, depth - 1))
    if kind in ("list", "tuple"):
        items = draw(st.lists(PLAIN, max_size=3))
        index = draw(st.integers(0, len(items)))
        items.insert(index, inner)
        return (items if kind == "list" else tuple(items)), f"[{index}]{path}"
    entries = list(draw(st.dictionaries(KEYS, PLAIN, max_size=3)).items())
    key = draw(KEYS.filter(lambda k: k not in dict(entries)))
    entries.insert(draw(st.integers(0, len(entries))), (key, inner))
    return dict(entries), f"[{key!r}]{path}"


@pytest.mark.parametrize("serializer", SERIALIZERS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_path_to_one_bad_leaf(serializer: str, data: st.DataObject) -> None:
    leaf = BAD_LEAF[serializer]
    structure, path = data.draw(holding(leaf))
    others = data.draw(st.lists(PLAIN, max_size=2))
    if data.draw(st.booleans()):
        position = data.draw(st.integers(0, len(others)))
        args = [*others[:position], structure, *others[position:]]
        calls: Calls = [(tuple(args), {})]
        expected = f"args[{position}]{path}"
    else:
        name = data.draw(st.sampled_from(["cfg", "data", "x"]))
        calls = [(tuple(others), {name: structure})]
        expected = f"kwargs[{name!r}]{path}"
    n_calls = data.draw(st.integers(1, 3))
    if n_calls > 1:
        at = data.draw(st.integers(0, n_calls - 1))
        filler: Calls = [((i,), {}) for i in range(n_calls)]
        filler[at] = calls[0]
        calls = filler
        expected = f"item {at}: {expected}"
    dumps = get_serializer(serializer).dumps
    try:
        dumps((target, calls))
    except Exception as exc:
        err = explain_pickling_error("target()", target, calls, dumps, exc)
    else:
        raise AssertionError("a structure holding the bad leaf pickled")
    description = "(a lock, module _thread)" if serializer == "cloudpickle" else PROXY
    assert f"cannot pickle the call to target(): {expected} {description} failed:\n" in str(err)
    assert type(err.__cause__) in (TypeError, NotImplementedError)


def test_depth_bound_does_not_flag_a_leaf_at_the_bound(serializer: str) -> None:
    nested: Any = ObjectProxy()
    for _ in range(10):
        nested = [nested]
    err = explain(serializer, target, [((nested,), {})])
    assert f"f(): args[0]{'[0]' * 10} {PROXY} failed:" in str(err)
    assert "search stopped" not in str(err)


def test_module_copied_by_value_names_its_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    # dill copies a module that is not installed (here: one with a file of its own), dict and all.
    usermod = types.ModuleType("usermod")
    usermod.__file__ = "/nonexistent/usermod.py"
    vars(usermod).update(N=3, CLIENT=ObjectProxy())
    monkeypatch.setitem(sys.modules, "usermod", usermod)

    def f() -> Any:
        return usermod.N

    err = explain("dill", f)
    assert f"f(): closure variable 'usermod' -> usermod.CLIENT {PROXY} failed:" in str(err)
    assert_proxy_cause(err)
