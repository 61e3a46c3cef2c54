"""What travels: a call's function and arguments as the bytes of a chunk's payload.

Calls are pickled in the caller's thread, so a pickling problem is raised where it was
made, with the object that failed named (``diagnostics.explain_pickling_error``). Large
arguments are stored once per run as blobs (``blobs/``, by content) and travel as
``BlobRef``s; an object passed to many calls of one group is pickled once. The
initializer travels with its ``initargs`` as a forked child inherits them
(``inheritance.py``). With ``ship_code``, the modules of the user's code that a worker
could not import travel by value (``codeship.py``).
"""

from __future__ import annotations

import itertools
import operator
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from batchpool.codeship import ship_user_code
from batchpool.diagnostics import explain_pickling_error
from batchpool.inheritance import InheritedLocks
from batchpool.serialization import (
    BlobRef,
    Serializer,
    blob_digest,
    describe_callable,
    describe_type,
    dumps_with_reducers,
)
from batchpool.store import Store

#: One call's arguments, as pickled: ``(args, kwargs)``.
Call = tuple[tuple[Any, ...], dict[str, Any]]


class Payloads:
    """Pickles an executor's calls. The initializer is pickled before the run exists (a
    failure leaves no run behind); blobs are written once it does (``use_store``)."""

    def __init__(
        self,
        serializer: Serializer,
        *,
        ship_code: bool,
        blob_threshold: int,
        payload_warning: int,
    ) -> None:
        self._serializer = serializer
        self._ship_code = ship_code
        self._blob_threshold = blob_threshold
        self._payload_warning = payload_warning
        self._store: Store | None = None
        self._blob_lock = threading.Lock()
        self._blobs_written: set[str] = set()
        # The named twins of fork-context locks in initargs: kept as long as the
        # executor, while workers may start and open them.
        self._inherited_locks = InheritedLocks()

    def use_store(self, store: Store) -> None:
        self._store = store

    def put(self, obj: Any) -> BlobRef:
        """``obj`` stored once in the run's ``blobs/``, as a handle (``executor.put``)."""
        if self._ship_code:
            ship_user_code(self._serializer.name, [obj])
        try:
            data = self._dumps(obj)
        except _PickleFailed as failed:
            dumps = self._serializer.dumps
            error = explain_pickling_error("put(obj)", _put, [((obj,), {})], dumps, failed.error)
        else:
            return self.store_blob(obj, data)
        raise error

    def initializer(
        self, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]
    ) -> bytes | None:
        """``(initializer, initargs)`` pickled, or None; a SerializationError naming the
        culprit when they cannot be."""
        if initializer is None:
            return None
        initargs = tuple(initargs)
        if self._ship_code:
            ship_user_code(self._serializer.name, [initializer, *initargs])
        # initargs travel as a forked child inherits them: locks included (inheritance.py)
        reducers = self._inherited_locks.reducers()

        def dumps(obj: Any) -> bytes:
            return dumps_with_reducers(self._serializer, obj, reducers)

        try:
            return dumps((initializer, initargs))
        except Exception as exc:
            label = f"the initializer {describe_callable(initializer)}"
            calls: list[Call] = [(initargs, {})]
            error = explain_pickling_error(label, initializer, calls, dumps, exc)
        raise error

    def _dumps(self, obj: Any) -> bytes:
        try:
            return self._serializer.dumps(obj)
        except Exception as exc:
            raise _PickleFailed(exc) from exc

    def group(self, fn: Callable[..., Any], calls: list[Call], call: str = "") -> bytes:
        """The payload of calls sharing ``fn``; a SerializationError naming the culprit
        when something in them cannot be pickled."""
        if self._ship_code:
            ship_user_code(self._serializer.name, [fn, *(part for c in calls[:1] for part in c)])
        try:
            return self._lean(fn, calls)
        except _PickleFailed as failed:
            label = call or describe_callable(fn)
            dumps = self._serializer.dumps
            error = explain_pickling_error(label, fn, calls, dumps, failed.error)
        raise error  # outside the except block: the culprit is the cause, not a context

    def positional(
        self, fn: Callable[..., Any], items: list[Any], call: str, *, single: bool = False
    ) -> bytes:
        """The payload of a map chunk: ``(fn, [args, ...], None)``, the calls' positional
        arguments only (no pair and no dict per call: a chunk has thousands of calls),
        or for a map over one iterable (``single``) ``(fn, [arg, ...], None, 1)``, the
        arguments themselves; ``group``'s when an argument is large or something
        cannot be pickled."""
        limit = min(self._blob_threshold, self._payload_warning)
        arg_tuples = [(item,) for item in items[:1]] if single else items[:1]
        if self._ship_code:
            ship_user_code(self._serializer.name, [fn, *(a for args in arg_tuples for a in args)])
        # A glance at a few items (a map's items are alike): when they are small the
        # chunk is pickled whole, and a payload over the limit is done again argument
        # by argument, with blobs, as _lean does.
        sample = [items[i] for i in {0, len(items) // 2, len(items) - 1}]
        arguments = sample if single else [a for args in sample for a in args]
        if max(map(sys.getsizeof, arguments), default=0) <= limit:
            try:
                payload = self._dumps((fn, items, None, 1) if single else (fn, items, None))
            except _PickleFailed:
                payload = b""  # explained below, call by call
            if payload and len(payload) <= limit:
                return payload
        no_kwargs: dict[str, Any] = {}
        calls: list[Call] = [((item,) if single else item, no_kwargs) for item in items]
        return self.group(fn, calls, call)

    def _lean(self, fn: Callable[..., Any], calls: list[Call]) -> bytes:
        """The payload of calls sharing ``fn``; large arguments travel as blobs.

        Small calls are pickled once, whole. When that is large, or an argument is
        large at a glance (``sys.getsizeof``: arrays, bytes, strings), each argument
        is pickled on its own and the large ones are replaced by blob references.
        An object passed to many calls of one group is pickled once.
        """
        limit = min(self._blob_threshold, self._payload_warning)
        # In C loops: a map chunk has thousands of calls.
        arguments = itertools.chain(
            itertools.chain.from_iterable(map(operator.itemgetter(0), calls)),
            itertools.chain.from_iterable(kwargs.values() for _, kwargs in calls if kwargs),
        )
        if max(map(sys.getsizeof, arguments), default=0) <= limit:
            payload = self._dumps((fn, calls))
            if len(payload) <= limit:
                return payload
            del payload
        label = describe_callable(fn)
        seen: dict[int, Any] = {}  # id -> what replaces it; every object here stays alive

        def lean(obj: Any, where: str) -> Any:
            if id(obj) not in seen:
                seen[id(obj)] = self._maybe_blob(obj, where, label)
            return seen[id(obj)]

        fn = lean(fn, "the function")
        lean_calls: list[Call] = []
        for i, (args, kwargs) in enumerate(calls):
            item = f"item {i}: " if len(calls) > 1 else ""
            lean_args = tuple(lean(a, f"{item}args[{j}]") for j, a in enumerate(args))
            lean_kwargs = {k: lean(v, f"{item}kwargs[{k!r}]") for k, v in kwargs.items()}
            lean_calls.append((lean_args, lean_kwargs))
        return self._dumps((fn, lean_calls))

    def _maybe_blob(self, obj: Any, where: str, label: str) -> Any:
        """``obj``, or a BlobRef to it when it pickles larger than the blob threshold."""
        if isinstance(obj, BlobRef):
            return obj
        data = self._dumps(obj)
        if len(data) > self._payload_warning:
            warnings.warn(
                f"{where} of the call to {label} pickles to {len(data) / 1e6:,.0f} MB "
                f"(a {describe_type(obj)}); it is stored once per run, but consider passing "
                "a path and loading it in the job",
                stacklevel=6,
            )
        if len(data) <= self._blob_threshold:
            return obj
        return self.store_blob(obj, data)

    def store_blob(self, obj: Any, data: bytes) -> BlobRef:
        """Write ``data`` (``obj`` pickled) to ``blobs/`` unless this run already has it."""
        ref = BlobRef(blob_digest(data), len(data), describe_type(obj))
        assert self._store is not None, "use_store() comes before the first blob"
        with self._blob_lock:
            known = ref.digest in self._blobs_written
        if not known:
            self._store.put(self._store.blob_key(ref.digest), data)
            with self._blob_lock:
                self._blobs_written.add(ref.digest)
        return ref


class _PickleFailed(Exception):
    """Carries a serializer's error out of the pickling code to the diagnosis."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _put(obj: Any) -> Any:
    """What ``put`` is described as, for diagnostics: a call taking the object."""
    return obj
