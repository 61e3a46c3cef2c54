"""Initializer arguments travel to workers as a forked child inherits them.

``ProcessPoolExecutor`` hands ``initargs`` to its workers as it starts them: with the
``fork`` start method the child inherits them, with ``spawn`` they are pickled while the
process is spawning, the one moment multiprocessing lets its locks be pickled. So code
passes locks there, ``tqdm.contrib.concurrent`` first among it (its process helpers
pass ``initializer=tqdm.set_lock, initargs=(tqdm.get_lock(),)``, a lock made of a
multiprocessing ``RLock`` and a threading ``RLock``).

batchpool's workers are fresh interpreters that a backend starts, so batchpool pickles
``initargs`` itself, with these reductions on top of the serializer's own:

- A multiprocessing ``Lock``, ``RLock``, ``Semaphore`` or ``BoundedSemaphore`` (and so a
  ``Condition`` or ``Event``, which are made of them) travels by the name of its POSIX
  semaphore: every worker on this host opens the same semaphore, and excludes the others,
  and the client, as a forked child would.
- One made in a ``fork`` context has no name: multiprocessing unlinks it as it makes it.
  For such a lock the executor makes a named twin once (same kind, its current value), and
  the workers share the twin among themselves. The client's holders of the original are
  not excluded by it: a lock made with ``multiprocessing.get_context("spawn")`` is shared
  with the client too.
- A threading ``Lock`` or ``RLock`` becomes a new, free lock in each worker: a forked
  child's copy is its own too (and one the client held would stay held for ever).

A worker on another host cannot open this host's semaphores; it fails its initializer
with an error that says so.
"""

from __future__ import annotations

import _thread
import multiprocessing
import socket
import threading
from collections.abc import Callable
from multiprocessing import synchronize
from typing import Any

Reducer = Callable[[Any], tuple[Any, ...]]

# multiprocessing's synchronization types built on one semaphore each
_SEMLOCK_TYPES: tuple[type[synchronize.SemLock], ...] = (
    synchronize.Lock,
    synchronize.RLock,
    synchronize.Semaphore,
    synchronize.BoundedSemaphore,
)
_LOCKS = (synchronize.Lock, synchronize.RLock)


class InheritedLocks:
    """The reductions above, and the named twins made for fork-context locks.

    The executor keeps one for as long as its workers may start: a twin's semaphore is
    unlinked when the twin is garbage collected, after which a new worker could not
    open it.
    """

    def __init__(self) -> None:
        self._twins: dict[int, tuple[synchronize.SemLock, synchronize.SemLock]] = {}
        self._lock = threading.Lock()

    def reducers(self) -> dict[type, Reducer]:
        table: dict[type, Reducer] = {kind: self._reduce_semlock for kind in _SEMLOCK_TYPES}
        table[synchronize.Condition] = _reduce_condition
        table[_thread.LockType] = _reduce_thread_lock
        table[_thread.RLock] = _reduce_thread_rlock
        return table

    def _reduce_semlock(self, lock: synchronize.SemLock) -> tuple[Any, ...]:
        if lock._semlock.name is None:  # type: ignore[attr-defined]
            lock = self._twin(lock)
        semlock = lock._semlock  # type: ignore[attr-defined]
        state = (semlock.handle, semlock.kind, semlock.maxvalue, semlock.name)
        return _rebuild_semlock, (type(lock), state, socket.gethostname())

    def _twin(self, lock: synchronize.SemLock) -> synchronize.SemLock:
        """The named semaphore that stands for ``lock`` (made in a fork context) in workers."""
        with self._lock:
            held = self._twins.get(id(lock))
            if held is not None and held[0] is lock:
                return held[1]
            semlock = lock._semlock  # type: ignore[attr-defined]
            # a lock the client holds is not held by anyone in the workers: its twin is free
            value = 1 if isinstance(lock, _LOCKS) else semlock._get_value()
            twin = type(lock).__new__(type(lock))
            spawn = multiprocessing.get_context("spawn")  # spawn: a semaphore with a name
            synchronize.SemLock.__init__(twin, semlock.kind, value, semlock.maxvalue, ctx=spawn)
            self._twins[id(lock)] = (lock, twin)  # the original too: its id stays its own
            return twin


def _rebuild_semlock(
    kind: type[synchronize.SemLock], state: tuple[Any, ...], host: str
) -> synchronize.SemLock:
    lock = kind.__new__(kind)
    try:
        lock.__setstate__(state)  # type: ignore[attr-defined]  # opens it by its name
    except FileNotFoundError:
        raise RuntimeError(
            f"the multiprocessing {kind.__name__} passed in initargs is a semaphore of host "
            f"{host!r}; this worker runs on {socket.gethostname()!r}, where it does not exist. "
            "Pass a lock that travels (multiprocessing.Manager().Lock(), reachable from "
            "the workers), or make the lock in the initializer"
        ) from None
    return lock


def _reduce_condition(condition: synchronize.Condition) -> tuple[Any, ...]:
    state = (
        condition._lock,  # type: ignore[attr-defined]
        condition._sleeping_count,  # type: ignore[attr-defined]
        condition._woken_count,  # type: ignore[attr-defined]
        condition._wait_semaphore,  # type: ignore[attr-defined]
    )
    return _rebuild_condition, (type(condition), state)


def _rebuild_condition(
    kind: type[synchronize.Condition], state: tuple[Any, ...]
) -> synchronize.Condition:
    condition = kind.__new__(kind)
    condition.__setstate__(state)  # type: ignore[attr-defined]
    return condition


def _reduce_thread_lock(lock: Any) -> tuple[Any, ...]:
    # no thread of the client is in the worker to release it: each worker's lock is free
    return threading.Lock, ()


def _reduce_thread_rlock(lock: Any) -> tuple[Any, ...]:
    return threading.RLock, ()
