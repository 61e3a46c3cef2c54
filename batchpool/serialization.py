"""What travels through storage: serializers, signed frames, chunk and outcome envelopes.

A chunk's input and a chunk's outcome are each one object in storage. Both are a
signed *frame* around an *envelope* pickled with the stdlib's pickle and holding
only plain data (dicts, lists, str, bytes), so a worker can read the header and
check versions before it touches anything the user's serializer produced.

- Chunk input envelope: ``(header, groups)``. ``header`` names the client's
  Python, serializer and batchpool versions. Each group is
  ``(n_calls, payload, skip)`` where ``payload`` unpickles (with the serializer
  named in the header) to ``(fn, [(args, kwargs), ...])``: one ``submit`` is a
  group of one call, one ``map`` chunk is a group of many calls sharing ``fn``; a
  ``map`` chunk's payload may be ``(fn, [args, ...], None)`` instead, positional
  arguments only.
  ``skip`` holds the indices of calls cancelled before the chunk was written.
- Outcome envelope: ``(meta, entries)`` with one entry per call, in order:
  ``(OK, payload)``, ``(ERROR, payload_or_None, type_name, message, traceback)``
  or ``(SKIPPED,)``; or, for a whole group of calls, ``(VALUES, payload, n_calls,
  special)``: ``payload`` unpickles to the list of the group's return values, and
  ``special`` maps the index of each call that raised or was skipped to its own
  entry (its place in the list holds None). One pickle for a group's results is
  what lets a million-call map cost a few hundred pickles, not a million.

A frame is ``MAGIC + HMAC-SHA256(secret, key + NUL + body) + body``. The key is
part of the signed text, so a valid object copied to another key is refused too.
"""

from __future__ import annotations

import collections
import copyreg
import functools
import hashlib
import hmac
import importlib
import io
import linecache
import pickle
import re
import sys
import traceback
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchpool.errors import IntegrityError, RemoteError, RemoteTraceback, SerializationError

#: The job environment variable that carries the run secret (hex); never written to storage.
SECRET_ENV = "BATCHPOOL_RUN_SECRET"

MAGIC = b"BPF1"
_DIGEST_SIZE = hashlib.sha256().digest_size
ENVELOPE_PROTOCOL = 5

OK = "ok"
ERROR = "error"
SKIPPED = "skipped"
VALUES = "values"

Entry = tuple[Any, ...]
Group = tuple[int, bytes, tuple[int, ...]]


@dataclass(frozen=True)
class Serializer:
    """A pickling library: its name, version and functions."""

    name: str
    version: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]

    @property
    def major(self) -> str:
        return self.version.split(".")[0]


SERIALIZERS = ("cloudpickle", "dill")


@functools.cache  # one per name and process: a worker asks for it every chunk
def get_serializer(name: str) -> Serializer:
    """The serializer called ``name``; a clear error when it is unknown or not installed."""
    if name not in SERIALIZERS:
        raise ValueError(
            f"serializer={name!r} is not one batchpool knows; use one of {', '.join(SERIALIZERS)}"
        )
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"serializer={name!r} needs the {name} package: pip install 'batchpool[{name}]'"
        ) from exc
    if name == "dill":

        def dumps(obj: Any) -> bytes:
            return bytes(module.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True))

    else:
        pickler = _cloudpickler(module)

        def dumps(obj: Any) -> bytes:
            with io.BytesIO() as file:
                pickler(file, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
                return file.getvalue()

    return Serializer(name, str(module.__version__), dumps, module.loads)


def dumps_with_reducers(
    serializer: Serializer, obj: Any, reducers: Mapping[type, Callable[[Any], Any]]
) -> bytes:
    """``serializer.dumps(obj)``, where ``reducers`` say how objects of their types pickle,
    before the serializer's own rules."""
    module = importlib.import_module(serializer.name)
    options: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    if serializer.name == "dill":
        base, options["recurse"] = module.Pickler, True
        # dill saves some types (locks) itself, before any reducer is asked: not these
        dispatch = type(base.dispatch)(base.dispatch)  # dill's own type: it knows metaclasses
        for kind in reducers:
            dispatch.pop(kind, None)
        attributes["dispatch"] = dispatch
    else:
        base = _cloudpickler(module)
    default = getattr(base, "dispatch_table", copyreg.dispatch_table)
    attributes["dispatch_table"] = collections.ChainMap(dict(reducers), default)
    pickler = type("Pickler", (base,), attributes)
    with io.BytesIO() as file:
        pickler(file, protocol=pickle.HIGHEST_PROTOCOL, **options).dump(obj)
        return file.getvalue()


_DYNAMIC_CODE = "<dynamic-code>"


def _cloudpickler(module: Any) -> type:
    """cloudpickle's Pickler, except that code pickled by value keeps its file name.

    cloudpickle 3 names such code ``<dynamic-code>``, so a call that raised in a
    function of the user's script showed ``File "<dynamic-code>", line 10`` and no
    source, where ``ProcessPoolExecutor`` shows the real file and line.
    """
    base = module.Pickler
    code_reduce = base.dispatch_table.get(types.CodeType)
    if code_reduce is None:  # a cloudpickle that keeps file names itself
        return base

    def reduce_code(code: types.CodeType) -> Any:
        constructor, args = code_reduce(code)
        named = tuple(code.co_filename if arg == _DYNAMIC_CODE else arg for arg in args)
        return constructor, named

    table = collections.ChainMap({types.CodeType: reduce_code}, base.dispatch_table)
    return type("Pickler", (base,), {"dispatch_table": table})


# -- blobs: objects stored once, referenced from any number of calls ------------------------


@dataclass(frozen=True)
class BlobRef:
    """A handle to an object stored once in the run's ``blobs/``, by content.

    Pass it to any call, as an argument or inside one: in the job it is replaced
    by the object, loaded once per worker process and then shared by every call
    that worker runs (treat it as read-only). ``BatchPoolExecutor.put`` makes
    one; arguments that pickle larger than the executor's ``blob_threshold``
    become one automatically.
    """

    digest: str
    size: int
    type_name: str

    def __repr__(self) -> str:
        return f"<batchpool blob: {self.type_name}, {self.size:,} bytes, {self.digest[:12]}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_resolve_blob, (self.digest, self.size, self.type_name))


#: Set by the worker while it runs a chunk: turns a BlobRef into its object.
blob_resolver: Callable[[BlobRef], Any] | None = None


def _resolve_blob(digest: str, size: int, type_name: str) -> Any:
    ref = BlobRef(digest, size, type_name)
    return ref if blob_resolver is None else blob_resolver(ref)


def blob_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_callable(fn: Any) -> str:
    """``fn``'s name as in messages: ``f()``, or its type's name when it has none."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{name}()"


def describe_type(obj: Any) -> str:
    """``obj``'s class as ``module.Name`` (just ``Name`` for builtins)."""
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


# -- frames -------------------------------------------------------------------------------


def _mac(secret: bytes, key: str, body: bytes | memoryview) -> bytes:
    mac = hmac.new(secret, key.encode() + b"\0", hashlib.sha256)
    mac.update(body)
    return mac.digest()


def seal(secret: bytes, key: str, body: bytes) -> bytes:
    """The frame stored at ``key``: ``body`` signed with the run's secret."""
    return MAGIC + _mac(secret, key, body) + body


def unseal(secret: bytes, key: str, frame: bytes) -> bytes:
    """The body of a frame read from ``key``, after its signature is checked.

    Raises IntegrityError before anything is unpickled when the frame was not
    written by a holder of this run's secret for this very key.
    """
    head = len(MAGIC) + _DIGEST_SIZE
    if len(frame) < head or not frame.startswith(MAGIC):
        raise IntegrityError(
            f"{key} is not a batchpool object (bad header); it was written by something else "
            "or truncated, and was not unpickled"
        )
    body = memoryview(frame)[head:]
    if not hmac.compare_digest(frame[len(MAGIC) : head], _mac(secret, key, body)):
        raise IntegrityError(
            f"{key} does not carry this run's signature: it was changed or written by someone "
            "without the run secret, and was not unpickled. If you started this worker by hand, "
            "give it the run's BATCHPOOL_RUN_SECRET"
        )
    return bytes(body)


# -- chunk input --------------------------------------------------------------------------


def client_versions(serializer: Serializer) -> dict[str, str]:
    """The versions a worker must match to read what this process pickles."""
    from batchpool import __version__

    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "serializer": serializer.name,
        "serializer_version": serializer.version,
        "batchpool": __version__,
    }


def encode_chunk(header: dict[str, Any], groups: list[Group]) -> bytes:
    return pickle.dumps((header, groups), protocol=ENVELOPE_PROTOCOL)


def decode_chunk(body: bytes) -> tuple[dict[str, Any], list[Group]]:
    header, groups = pickle.loads(body)
    return header, groups


# -- outcomes -----------------------------------------------------------------------------


def encode_outcome(meta: dict[str, Any], entries: list[Entry]) -> bytes:
    return pickle.dumps((meta, entries), protocol=ENVELOPE_PROTOCOL)


def decode_outcome(body: bytes) -> tuple[dict[str, Any], list[Entry]]:
    meta, entries = pickle.loads(body)
    return meta, entries


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as err:  # a broken __str__ must not lose the outcome
        return f"<str() of the exception failed: {err!r}>"


def error_entry(exc: BaseException, serializer: Serializer) -> Entry:
    """The outcome of a call that raised ``exc``.

    The exception is kept as itself when it survives a pickle round trip here on
    the worker (exceptions with custom ``__init__`` signatures often do not);
    its type name, message and traceback text are always kept.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    payload: bytes | None
    try:
        payload = serializer.dumps(exc)
        serializer.loads(payload)
    except BaseException:
        payload = None
    return (ERROR, payload, describe_type(exc), _safe_str(exc), tb)


def value_entry(value: Any, serializer: Serializer, call: str) -> Entry:
    """The outcome of a call that returned ``value``; an error entry if it cannot be pickled."""
    try:
        return (OK, serializer.dumps(value))
    except BaseException as exc:
        error = SerializationError(
            f"the result of {call} (a {describe_type(value)}) "
            f"could not be pickled on the worker: {type(exc).__name__}: {_safe_str(exc)}; "
            "return something picklable (plain data, or a path to what the job wrote)"
        )
        error.__cause__ = exc
        return error_entry(error, serializer)


def group_values_entry(
    values: list[Any], special: dict[int, Entry], serializer: Serializer
) -> Entry | None:
    """One entry for a group's outcomes (``VALUES``), or None when a value cannot be
    pickled with the others (each call then gets its own entry, and only the call
    whose value cannot be pickled fails)."""
    try:
        return (VALUES, serializer.dumps(values), len(values), special)
    except BaseException:
        return None


def calls_in(entries: list[Entry]) -> int:
    """How many calls an outcome's entries stand for."""
    return sum(entry[2] if entry[0] == VALUES else 1 for entry in entries)


def per_call_entries(entries: list[Entry]) -> list[Entry]:
    """The entries that are not values (errors, skips), across the chunk, in order."""
    found: list[Entry] = []
    for entry in entries:
        if entry[0] == VALUES:
            found.extend(entry[3][i] for i in sorted(entry[3]))
        else:
            found.append(entry)
    return found


def outcome_values(
    entries: list[Entry], serializer: Serializer, wanted: Callable[[int, int], bool]
) -> tuple[list[Any], dict[int, BaseException]]:
    """Every call's value (None where it raised or was skipped), and the exception of
    each call that raised, by its index in the chunk. ``wanted(first, n)`` says
    whether the calls ``first`` to ``first + n - 1`` are still wanted: the results of
    a group whose calls were all cancelled are not unpickled."""
    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    for entry in entries:
        first = len(values)
        if entry[0] == VALUES:
            n = entry[2]
            loaded: Any = None
            if wanted(first, n):
                ok, loaded = entry_outcome((OK, entry[1]), serializer)
                if not ok:  # the list could not be unpickled: every call fails with it
                    errors.update(dict.fromkeys(range(first, first + n), loaded))
                    loaded = None
            values.extend(loaded if loaded is not None else [None] * n)
            for i, special in entry[3].items():
                values[first + i] = None
                if special[0] == ERROR:
                    errors[first + i] = entry_outcome(special, serializer)[1]
        elif entry[0] == SKIPPED or not wanted(first, 1):
            values.append(None)
        else:
            ok, value = entry_outcome(entry, serializer)
            values.append(value if ok else None)
            if not ok:
                errors[first] = value
    return values, errors


def entry_outcome(entry: Entry, serializer: Serializer) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, exception)`` for one call's outcome entry."""
    kind = entry[0]
    if kind == OK:
        try:
            return True, serializer.loads(entry[1])
        except BaseException as exc:
            error = SerializationError(
                f"the result of a call was pickled on the worker but could not be unpickled "
                f"here: {type(exc).__name__}: {_safe_str(exc)}; is the module defining it "
                "importable in this process?"
            )
            error.__cause__ = exc
            return False, error
    if kind == ERROR:
        _, payload, type_name, message, tb = entry
        remote: BaseException | None = None
        why = "it could not be pickled on the worker"
        if payload is not None:
            try:
                loaded = serializer.loads(payload)
            except BaseException as exc:
                why = f"it could not be unpickled here: {type(exc).__name__}: {_safe_str(exc)}"
            else:
                if isinstance(loaded, BaseException):
                    remote = loaded
                else:
                    why = f"it unpickled as a {type(loaded).__name__}, not an exception"
        if remote is None:
            remote = RemoteError(type_name, message, tb, why)
        # Framed in triple quotes, as ProcessPoolExecutor shows it. (typeshed calls the
        # argument a traceback object; the stdlib passes this text, as here.)
        text = f'\n"""\n{with_source_lines(tb)}"""'
        remote.__cause__ = RemoteTraceback(text)  # type: ignore[arg-type]
        return False, remote
    raise ValueError(f"unknown outcome entry kind {kind!r}")


_FRAME_LINE = re.compile(r'  File "(?P<file>[^"]+)", line (?P<line>\d+), in .*')


def with_source_lines(tb: str) -> str:
    """A remote traceback's text with the source line of each frame that lacks one,
    read here: a worker that runs the user's script by value has no copy of the file,
    but the client that submitted it does."""
    lines = tb.splitlines(keepends=True)
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        frame = _FRAME_LINE.fullmatch(line.rstrip("\n"))
        if frame is None:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.startswith("    "):  # the worker showed the source already
            continue
        source = linecache.getline(frame["file"], int(frame["line"])).strip()
        if source:
            out.append(f"    {source}\n")
    return "".join(out)
