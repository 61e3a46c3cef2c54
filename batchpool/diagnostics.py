"""Why a call could not be pickled: the walk from the call down to the object to blame.

``submit`` and ``map`` pickle a call at once, in the caller's thread. When that
fails, the serializer's own message rarely says *which* object failed: "cannot
pickle '_thread.lock' object" does not say that the lock sits in
``kwargs['cfg'].client._lock``, or in a module global the function uses.

:func:`explain_pickling_error` finds out by pickling the call's parts one by one,
the way the serializer reaches them, and descending into a part while one of its
own parts also fails. The culprit is the deepest failing object: a failing
object none of whose parts fail (or one that is opaque, such as a lock, a socket
or an open file). The walk is bounded (depth, number of pickling attempts, time)
and never raises: at worst the message names the call and the original error.

Parts of a call, in the order they are tried:

- the function: for a plain function (when the serializer copies it by value)
  the module globals its code uses, its closure variables, its defaults and its
  attributes; for a bound method its function and ``self``; for a
  ``functools.partial`` its ``func``, ``args`` and ``keywords``; for a callable
  object its state, read as pickle reads it (``__reduce_ex__``);
- each call's positional and keyword arguments (``item N:`` names the call
  within a ``map`` chunk);
- inside any of them: items of lists, tuples, sets and dicts, an object's state
  (``__dict__``, ``__slots__``, ``__getstate__``), functions and classes found
  along the way.
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
import socket
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchpool.errors import SerializationError

__all__ = ["explain_pickling_error"]

#: How many steps the walk descends below the call at most.
MAX_DEPTH = 10
#: How many times the walk calls ``dumps`` at most.
MAX_PROBES = 10_000
#: How many parts of one object the walk considers at most.
MAX_CHILDREN = 100_000
#: How long the walk may take, in seconds, before it reports what it found so far.
TIME_BUDGET = 5.0

_PROTOCOL = pickle.HIGHEST_PROTOCOL

# Where a culprit was reached from: the kind of its closest named ancestor.
_FUNCTION = "function"  # a global, closure variable, default or attribute of a function
_ARGUMENT = "argument"  # an argument of the call (or of a partial)
_SELF = "self"  # the state of the object whose method (or __call__) is the function

_HINTS = {
    _FUNCTION: "import or create it inside the function, or pass a path and load it there",
    _ARGUMENT: (
        "pass something picklable (a path, or the settings to rebuild it) and create the "
        "object inside the function"
    ),
    _SELF: (
        "create it inside the method, or leave it out of the object's pickled state "
        "(__getstate__/__setstate__) and rebuild it on first use"
    ),
}
_FUNCTION_HINT = (
    "submit a plain function defined with def in your script or an importable module, "
    "and call this from inside it"
)
_FALLBACK_HINT = (
    "pass plain data (numbers, strings, lists, dicts, paths) and create other objects "
    "inside the function"
)

_SKIPPED_CLASS_ATTRIBUTES = frozenset(
    {"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "__slots__"}
)
_SKIPPED_MODULE_ATTRIBUTES = frozenset({"__builtins__", "__loader__", "__spec__"})
_LITERAL_TYPES = (str, bytes, int, float, bool, complex, type(None))


# -- paths --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One step of a path from the call to an object.

    A *named* step starts a new segment of the rendered path: it is described by
    ``phrase`` (``"global 'CFG'"``), or, without one, by the expression ``base``
    (``"args[0]"``). Plain steps are accessors (``".client"``, ``"[2]"``)
    appended to the expression of the current segment.
    """

    text: str
    named: bool = False
    phrase: str | None = None
    kind: str | None = None


def _named(base: str, phrase: str | None = None, kind: str | None = None) -> _Step:
    return _Step(base, True, phrase, kind)


def _access(text: str) -> _Step:
    return _Step(text)


Path = tuple[_Step, ...]
Parts = list[tuple[Path, Any]]


def _then(path: Path, step: _Step) -> Path:
    return (*path, step)


def _render(path: Path) -> str:
    """``args[0] -> closure variable 'cfg' -> cfg.client`` for a path; "the function" for ()."""
    segments: list[str] = []
    phrase: str | None = None
    expr = ""
    accessed = False

    def close() -> None:
        if phrase is None:
            segments.append(expr)
        elif accessed:
            segments.append(f"{phrase} -> {expr}")
        else:
            segments.append(phrase)

    started = False
    for step in path:
        if step.named:
            if started:
                close()
            phrase, expr, accessed, started = step.phrase, step.text, False, True
        else:
            if not started:  # an accessor on the function itself
                phrase, expr, accessed, started = "the function", "fn", False, True
            expr += step.text
            accessed = True
    if not started:
        return "the function"
    close()
    return " -> ".join(segments)


def _path_kind(path: Path) -> str | None:
    for step in reversed(path):
        if step.kind is not None:
            return step.kind
    return None


def _item_step(key: Any) -> _Step:
    """The path step to a mapping's value: ``['key']``, or a description of an odd key."""
    text = _key_text(key)
    if text is not None:
        return _access(f"[{text}]")
    return _named("key", f"the value of a {_type_name(type(key))} key")


def _key_text(key: Any) -> str | None:
    """``'name'`` or ``3``: a dict key written as Python, when that is short and exact."""
    literal = type(key) in _LITERAL_TYPES or (
        type(key) is tuple and all(type(k) in _LITERAL_TYPES for k in key)
    )
    if not literal:
        return None
    text = repr(key)
    return text if len(text) <= 80 else None


def _attribute(name: Any, via: str = "__dict__") -> _Step:
    if isinstance(name, str) and name.isidentifier():
        return _access(f".{name}")
    return _access(f".{via}[{name!r}]")


# -- what an object is ------------------------------------------------------------------------


def _type_name(cls: type) -> str:
    name = str(getattr(cls, "__qualname__", None) or getattr(cls, "__name__", "object"))
    if "<locals>" in name:
        name = str(cls.__name__)
    return name


def _article(name: str) -> str:
    """The article for a class name: an ObjectProxy, a lock, an SSLSocket, a UUID."""
    if not name:
        return "a"
    letters = name.lstrip("_")
    if not letters:
        return "a"
    if len(letters) > 1 and letters[0].isupper() and letters[1].isupper():
        # An acronym is read letter by letter: an SSLSocket, an HTTPResponse, a URL.
        return "an" if letters[0] in "AEFHILMNORSX" else "a"
    lower = letters.lower()
    if lower.startswith(("uni", "use", "usa", "uti", "one", "eu")):
        return "a"
    if lower.startswith(("hour", "honest", "honor", "honour")):
        return "an"
    return "an" if lower[0] in "aeiou" else "a"


def _describe(obj: Any) -> str:
    """``(an ObjectProxy, module mymod)``: the class and module of an object."""
    cls = type(obj)
    name = _type_name(cls)
    module = getattr(cls, "__module__", None)
    if not module or module == "builtins":
        return f"({_article(name)} {name})"
    return f"({_article(name)} {name}, module {module})"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as err:
        return f"<str() of the exception failed: {err!r}>"


def _exception_text(exc: BaseException) -> str:
    name = type(exc).__name__
    text = _safe_str(exc)
    return f"{name}: {text}" if text else name


def _is_lock(obj: Any) -> bool:
    cls = type(obj)
    module = str(getattr(cls, "__module__", None) or "")
    name = _type_name(cls).lower()
    return module.startswith(("_thread", "threading", "multiprocessing")) and any(
        word in name for word in ("lock", "semaphore", "condition", "event", "barrier")
    )


def _is_db_connection(obj: Any) -> bool:
    """A database connection, or something like one: it hands out cursors."""
    return callable(getattr(type(obj), "cursor", None))


def _specific_hint(obj: Any) -> str | None:
    """The hint for an object of a kind that can never travel to another process."""
    cls = type(obj)
    if issubclass(cls, threading.Thread):
        return (
            "threads cannot travel to another process: start the thread inside the function, "
            "or pass what it works on"
        )
    if _is_lock(obj):
        return (
            "locks cannot travel to another process (each process has its own): "
            "create the lock inside the function"
        )
    if issubclass(cls, socket.socket):
        return "sockets cannot travel: pass the address and connect inside the function"
    if issubclass(cls, io.IOBase):
        return "open files cannot travel: pass the path and open it inside the function"
    if issubclass(cls, types.GeneratorType | types.AsyncGeneratorType):
        return (
            "generators cannot be pickled: pass its items (list(gen)) or what it is made "
            "from, and iterate inside the function"
        )
    if issubclass(cls, types.CoroutineType):
        return (
            "coroutines cannot travel: submit a plain function that runs the coroutine "
            "(asyncio.run) inside the job"
        )
    if _is_db_connection(obj):
        return (
            "database connections cannot travel: pass the connection settings (a URL or a "
            "path) and connect inside the function"
        )
    return None


def _is_opaque(obj: Any) -> bool:
    """Objects whose insides mean nothing to the user: the walk stops at them."""
    return _specific_hint(obj) is not None


# -- the parts of an object -------------------------------------------------------------------


def _code_names(code: types.CodeType) -> list[str]:
    """Names the code (and code nested in it: lambdas, comprehensions, functions) uses."""
    names: dict[str, None] = {}
    stack = [code]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for name in current.co_names:
            names.setdefault(name, None)
        stack.extend(
            const for const in reversed(current.co_consts) if isinstance(const, types.CodeType)
        )
    return list(names)


def _function_parts(fn: types.FunctionType, path: Path) -> Parts:
    parts: Parts = []
    code = fn.__code__
    fn_globals = fn.__globals__
    for name in _code_names(code):
        if name in fn_globals:
            parts.append(
                (_then(path, _named(name, f"global '{name}'", _FUNCTION)), fn_globals[name])
            )
    closure = fn.__closure__ or ()
    for name, cell in zip(code.co_freevars, closure, strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        parts.append((_then(path, _named(name, f"closure variable '{name}'", _FUNCTION)), value))
    defaults = fn.__defaults__ or ()
    positional = code.co_varnames[: code.co_argcount]
    for name, value in zip(positional[len(positional) - len(defaults) :], defaults, strict=False):
        parts.append((_then(path, _named(name, f"default of argument '{name}'", _FUNCTION)), value))
    for name, value in (fn.__kwdefaults__ or {}).items():
        parts.append((_then(path, _named(name, f"default of argument '{name}'", _FUNCTION)), value))
    for name, value in vars(fn).items():
        phrase = f"attribute '{name}' of the function"
        parts.append((_then(path, _named(str(name), phrase, _FUNCTION)), value))
    return parts


def _class_parts(cls: type, path: Path) -> Parts:
    parts: Parts = []
    for name, value in list(vars(cls).items()):
        if name in _SKIPPED_CLASS_ATTRIBUTES or isinstance(
            value, types.MemberDescriptorType | types.GetSetDescriptorType
        ):
            continue
        parts.append((_then(path, _attribute(name)), value))
    for i, base in enumerate(cls.__bases__):
        if base is not object:
            parts.append((_then(path, _access(f".__bases__[{i}]")), base))
    return parts


def _container_parts(obj: Any, path: Path) -> Parts | None:
    """The items of a list, tuple, dict, set or frozenset (or of a subclass); None otherwise."""
    cls = type(obj)
    parts: Parts = []
    fields = getattr(cls, "_fields", None) if issubclass(cls, tuple) else None
    if isinstance(fields, tuple) and len(fields) == len(obj):  # a namedtuple: by field name
        for name, item in zip(fields, obj, strict=False):
            parts.append((_then(path, _attribute(name)), item))
    elif issubclass(cls, list | tuple):
        for i, item in enumerate(obj[:MAX_CHILDREN]):
            parts.append((_then(path, _access(f"[{i}]")), item))
    elif issubclass(cls, dict):
        keys: list[Any] = []
        for i, (key, value) in enumerate(dict.items(obj)):
            if i >= MAX_CHILDREN:
                break
            parts.append((_then(path, _item_step(key)), value))
            keys.append(key)
        parts.extend((_then(path, _named("key", "a key of the dict")), key) for key in keys)
    elif issubclass(cls, set | frozenset):
        for i, item in enumerate(obj):
            if i >= MAX_CHILDREN:
                break
            parts.append((_then(path, _named("item", "an item of the set")), item))
    else:
        return None
    if cls not in (list, tuple, dict, set, frozenset):
        for name, value in getattr(obj, "__dict__", {}).items():
            parts.append((_then(path, _attribute(name)), value))
    return parts


def _reduce(obj: Any) -> Any:
    """What pickle reduces a plain object to; raises what reducing it raises."""
    cls = type(obj)
    reducer = copyreg.dispatch_table.get(cls)
    if reducer is not None:
        return reducer(obj)
    reduce_ex: Any = cls.__reduce_ex__
    return reduce_ex(obj, _PROTOCOL)


def _state_parts(obj: Any, path: Path) -> Parts | None:
    """An object's parts as pickle sees them: its state, items and constructor arguments.

    None when the object cannot even be reduced: then nothing below it is to blame.
    """
    try:
        reduced = _reduce(obj)
    except Exception:
        return None
    if not isinstance(reduced, tuple) or len(reduced) < 2:
        return []  # pickled by name
    rv = tuple(reduced) + (None,) * (6 - len(reduced))
    constructor, args, state, listitems, dictitems = rv[:5]
    parts: Parts = []
    if state is not None:
        dict_state: Any = state
        slot_state: Any = None
        if type(state) is tuple and len(state) == 2:
            dict_state, slot_state = state
        if isinstance(dict_state, dict) or isinstance(slot_state, dict):
            for mapping in (dict_state, slot_state):
                if isinstance(mapping, dict):
                    parts.extend(
                        (_then(path, _attribute(name)), value) for name, value in mapping.items()
                    )
        else:
            parts.append((_then(path, _access(".__getstate__()")), state))
    if listitems is not None:
        for i, item in enumerate(listitems):
            if i >= MAX_CHILDREN:
                break
            parts.append((_then(path, _access(f"[{i}]")), item))
    if dictitems is not None:
        for i, (key, value) in enumerate(dictitems):
            if i >= MAX_CHILDREN:
                break
            parts.append((_then(path, _item_step(key)), value))
    if isinstance(args, tuple):
        start = 1 if getattr(constructor, "__name__", "") in ("__newobj__", "__newobj_ex__") else 0
        for i, arg in enumerate(args[start:MAX_CHILDREN], start):
            if isinstance(arg, type) and arg is type(obj):
                continue
            parts.append((_then(path, _access(f".__reduce_ex__({_PROTOCOL})[1][{i}]")), arg))
    return parts


def _parts(obj: Any, path: Path, top: bool = False) -> Parts:
    """The objects pickling ``obj`` pickles in turn, each with its path.

    ``top`` marks the submitted function: its parts are then named as the user
    reads them in the function's code (``self.client``, ``partial.args[0]``).
    """
    cls = type(obj)
    if issubclass(cls, types.FunctionType):
        return _function_parts(obj, path)
    if issubclass(cls, types.MethodType):
        func_path = path if top else _then(path, _access(".__func__"))
        self_path = (_named("self", kind=_SELF),) if top else _then(path, _access(".__self__"))
        return [(func_path, obj.__func__), (self_path, obj.__self__)]
    if issubclass(cls, types.BuiltinMethodType | types.MethodWrapperType):
        owner = getattr(obj, "__self__", None)
        if owner is None or isinstance(owner, types.ModuleType):
            return []
        self_path = (_named("self", kind=_SELF),) if top else _then(path, _access(".__self__"))
        return [(self_path, owner)]
    if issubclass(cls, functools.partial):
        if top:
            func_step = _named("partial.func", kind=_FUNCTION)
            parts: Parts = [((func_step,), obj.func)]
            parts.extend(
                ((_named(f"partial.args[{i}]", kind=_ARGUMENT),), arg)
                for i, arg in enumerate(obj.args)
            )
            parts.extend(
                ((_named(f"partial.keywords[{key!r}]", kind=_ARGUMENT),), value)
                for key, value in obj.keywords.items()
            )
            return parts
        nested: Parts = [(_then(path, _access(".func")), obj.func)]
        nested.extend((_then(path, _access(f".args[{i}]")), arg) for i, arg in enumerate(obj.args))
        nested.extend(
            (_then(path, _access(f".keywords[{key!r}]")), value)
            for key, value in obj.keywords.items()
        )
        return nested
    if issubclass(cls, staticmethod | classmethod):
        return [(_then(path, _access(".__func__")), obj.__func__)]
    if issubclass(cls, property):
        return [
            (_then(path, _access(f".{name}")), getattr(obj, name))
            for name in ("fget", "fset", "fdel")
            if getattr(obj, name) is not None
        ]
    if issubclass(cls, type):
        return _class_parts(obj, path)
    if issubclass(cls, types.ModuleType):
        # Only a module pickled by value fails (dill copies modules that are not installed).
        return [
            (_then(path, _attribute(name)), value)
            for name, value in list(vars(obj).items())
            if name not in _SKIPPED_MODULE_ATTRIBUTES
        ]
    if issubclass(cls, types.CodeType):
        return []
    if _is_opaque(obj):
        return []
    base = (_named("self", kind=_SELF),) if top else path
    container = _container_parts(obj, base)
    if container is not None:
        return container
    state = _state_parts(obj, base)
    if state is None:
        return []
    # A class defined in a script or a function is pickled by value, methods and all.
    name = _type_name(cls)
    state.append((_then(path, _named(name, f"class {name}", _FUNCTION)), cls))
    return state


# -- the walk ---------------------------------------------------------------------------------


@dataclass
class _Found:
    path: Path
    obj: Any
    error: BaseException
    item: int | None = None
    stopped: bool = False  # the walk was cut short here: the culprit may be inside


@dataclass
class _Walker:
    dumps: Callable[[Any], bytes]
    deadline: float
    probes: int = 0
    keep: list[Any] = field(default_factory=list)  # keeps ids unique while the walk runs

    def exhausted(self) -> bool:
        return self.probes >= MAX_PROBES or time.monotonic() > self.deadline

    def probe(self, obj: Any) -> BaseException | None:
        """The error pickling ``obj`` alone raises, or None when it pickles."""
        self.probes += 1
        try:
            self.dumps(obj)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit from a __reduce__ is a failure to pickle
            return exc
        return None

    def first_failing(
        self, parts: Sequence[tuple[Any, Any]]
    ) -> tuple[Any, Any, BaseException] | None:
        """The first of ``(label, obj)`` parts whose object fails to pickle alone."""
        if not parts or self.exhausted():
            return None
        if len(parts) > 8:
            # Halve the range known to fail: a few dumps even for a long list.
            values = [obj for _, obj in parts]
            self.keep.append(values)
            if self.probe(values) is None:
                return None
            lo, hi = 0, len(values)
            while hi - lo > 1 and not self.exhausted():
                mid = (lo + hi) // 2
                if self.probe(values[lo:mid]) is not None:
                    hi = mid
                else:
                    lo = mid
            if hi - lo == 1:
                error = self.probe(values[lo])
                if error is not None:
                    return parts[lo][0], parts[lo][1], error
        for label, obj in parts:
            if self.exhausted():
                return None
            error = self.probe(obj)
            if error is not None:
                return label, obj, error
        return None

    def descend(self, found: _Found, top: bool = False) -> _Found:
        """Go down from a failing object while one of its parts fails too."""
        ancestors = {id(found.obj)}
        self.keep.append(found.obj)
        depth = 0
        while True:
            if self.exhausted():
                found.stopped = True
                return found
            try:
                parts = _parts(found.obj, found.path, top=top)
            except Exception:
                return found
            top = False
            parts = [(path, obj) for path, obj in parts if id(obj) not in ancestors]
            self.keep.append(parts)
            hit = self.first_failing(parts)
            if hit is None:
                found.stopped = self.exhausted()
                return found
            if depth >= MAX_DEPTH:  # one of its parts fails too, but the walk goes no deeper
                found.stopped = True
                return found
            path, obj, error = hit
            found = _Found(path, obj, error, found.item)
            ancestors.add(id(obj))
            depth += 1

    def walk(
        self, fn: Any, calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]
    ) -> _Found | None:
        error = self.probe(fn)
        if error is not None:
            return self.descend(_Found((), fn, error), top=True)
        calls = list(calls)
        hit = self.first_failing([(i, call) for i, call in enumerate(calls)])
        if hit is None:
            return None
        index, call, error = hit
        item = index if len(calls) > 1 else None
        args, kwargs = call
        parts: Parts = [
            ((_named(f"args[{j}]", kind=_ARGUMENT),), arg) for j, arg in enumerate(args)
        ]
        parts.extend(
            ((_named(f"kwargs[{key!r}]", kind=_ARGUMENT),), value) for key, value in kwargs.items()
        )
        arg_hit = self.first_failing(parts)
        if arg_hit is None:
            return _Found((_named("the arguments", "the arguments", _ARGUMENT),), call, error, item)
        path, obj, error = arg_hit
        return self.descend(_Found(path, obj, error, item))


def _message(call: str, found: _Found) -> str:
    where = _render(found.path)
    if found.item is not None:
        where = f"item {found.item}: {where}"
    hint = _specific_hint(found.obj)
    if hint is None:
        kind = _path_kind(found.path)
        hint = _HINTS[kind] if kind is not None else _FUNCTION_HINT if not found.path else None
    text = (
        f"cannot pickle the call to {call}: {where} {_describe(found.obj)} failed:\n"
        f"{_exception_text(found.error)}"
    )
    if found.stopped:
        text += "\n(the search stopped at this object; what cannot be pickled is inside it)"
    return f"{text}\nhint: {hint or _FALLBACK_HINT}"


def explain_pickling_error(
    call: str,
    fn: Callable[..., Any],
    calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
    dumps: Callable[[Any], bytes],
    error: BaseException,
) -> SerializationError:
    """A ``SerializationError`` naming the object that made pickling a call fail.

    ``call`` names the call in the message (``"uses_proxy()"``); ``fn`` and
    ``calls`` (one ``(args, kwargs)`` per call: one for ``submit``, many for a
    ``map`` chunk) are what was pickled; ``dumps`` is the serializer's, and
    ``error`` what pickling them all raised. The returned error's message walks
    to the deepest object that fails to pickle, with a hint on what to do
    instead, and its ``__cause__`` is that object's own error. It is returned,
    not raised; this function never raises (at worst the message names the call
    and ``error``).
    """
    try:
        walker = _Walker(dumps, time.monotonic() + TIME_BUDGET)
        found = walker.walk(fn, calls)
        if found is not None:
            result = SerializationError(_message(call, found))
            result.__cause__ = found.error
            return result
    except Exception:
        pass
    try:
        text = f"cannot pickle the call to {call}: {_exception_text(error)}\nhint: {_FALLBACK_HINT}"
    except Exception:
        text = "cannot pickle the call"
    result = SerializationError(text)
    result.__cause__ = error
    return result
