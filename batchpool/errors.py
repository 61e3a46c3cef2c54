"""The exceptions batchpool raises, the carrier of a remote traceback, and the check
of the count arguments (``max_workers``, ``chunksize``, ...) whose errors it names."""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from typing import Any


def check_positive_int(name: str, value: Any) -> int:
    """``value`` when it is an int greater than 0; else a TypeError or ValueError naming
    ``name``, as ``ProcessPoolExecutor`` words them."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0")
    return value


class BatchPoolError(Exception):
    """Base class of the errors batchpool raises itself."""


#: The traceback of an exception raised in a job, chained as its ``__cause__``: the
#: stdlib's own ``concurrent.futures.process._RemoteTraceback``, as ProcessPoolExecutor
#: chains it, so code that checks for that type finds it. Its ``tb`` is the text.
RemoteTraceback = _RemoteTraceback


class RemoteError(BatchPoolError):
    """An exception raised in a job that could not travel back as itself.

    It could not be pickled on the worker, or not unpickled here. It carries what
    could be kept: the qualified type name, the message and the traceback text.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str, why: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        self.why = why
        text = f"{type_name}: {message}" if message else type_name
        if why:
            text += f" ({why})"
        super().__init__(text)

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:
        return (type(self), (self.type_name, self.message, self.traceback_text, self.why))


class WorkerLostError(BatchPoolError, BrokenProcessPool):
    """A job ended without writing a result, as many times as it was allowed to try.

    It is a ``BrokenProcessPool``, as the stdlib raises when a worker dies, so
    ``except BrokenProcessPool:`` written for ``ProcessPoolExecutor`` catches it.
    Unlike the stdlib's pool, the executor is not broken: other calls go on, and
    this one was retried (``max_attempts``) before it failed.
    """


class InitializerError(BatchPoolError, BrokenProcessPool):
    """The executor's ``initializer`` raised in a worker.

    The calls that worker would have run fail with it, and so does every later
    call: the executor is broken, as the stdlib's is. Its ``__cause__`` is the
    initializer's traceback on the worker.
    """


class FailureBudgetExceeded(BatchPoolError):
    """More calls failed than ``max_failures`` allows: the calls not yet run were
    stopped with this error, and their jobs queued on the engine cancelled."""


class SerializationError(pickle.PicklingError, BatchPoolError):
    """A call, a result or an exception could not be pickled."""


class IntegrityError(BatchPoolError):
    """An object in storage does not carry a valid signature of this run."""


class EnvironmentMismatchError(BatchPoolError):
    """The worker's Python or serializer cannot read what the client wrote."""


class BackendError(BatchPoolError):
    """A backend could not start, submit or query jobs.

    ``transient`` is True when the engine could not be reached (its controller is
    down, a command timed out): the same command may work later, and the executor
    tries again within ``engine_outage_grace``. False for what the engine refused.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_backend_error, (type(self), str(self), self.transient))


class StorageError(BatchPoolError):
    """A storage operation failed in a way that retrying does not mend.

    ``transient`` is True when it kept failing in a way that passes (a network error)
    until the retry deadline: later, the same operation may succeed. False for what
    will not pass by itself: a full or read-only filesystem, a denied permission, a
    missing bucket or run folder.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:
        return (_storage_error, (str(self), self.transient))


def _storage_error(message: str, transient: bool) -> StorageError:
    return StorageError(message, transient=transient)


class UnsafePathError(StorageError):
    """An object of a run on a local disk is reached through a symbolic link, or is not a
    regular file: batchpool neither reads nor writes it."""


#: The exit status of a one-job worker that failed in a way no retry can mend
#: (``is_fatal``): a backend that learns it sets ``JobEvent.fatal``, and the executor
#: then fails the job's calls at once instead of running them again.
FATAL_EXIT_CODE = 78  # EX_CONFIG in sysexits.h

#: The errors that end a chunk at once, by the name a worker reports them with.
_FATAL_TYPES: dict[str, type[BatchPoolError]] = {
    "StorageError": StorageError,
    "IntegrityError": IntegrityError,
    "EnvironmentMismatchError": EnvironmentMismatchError,
}


def is_fatal(exc: BaseException) -> bool:
    """Whether a worker's own failure would happen again on a retry: its chunk refused
    for its signature, a Python or serializer it cannot read, or a storage error that
    does not pass (a full or read-only filesystem, a denied permission, a deleted run).
    Retries are for jobs that died."""
    if isinstance(exc, StorageError):
        return not exc.transient
    return isinstance(exc, (IntegrityError, EnvironmentMismatchError))


def fatal_error(text: str) -> BatchPoolError:
    """The error a worker reported as ``"<Type>: <message>"``, as its own type when it is
    one of the fatal ones (a StorageError, IntegrityError, ...), else a BatchPoolError."""
    type_name, sep, message = text.partition(": ")
    cls = _FATAL_TYPES.get(type_name) if sep else None
    return cls(message) if cls is not None else BatchPoolError(text)


def _rebuild_backend_error(cls: type[BackendError], message: str, transient: bool) -> BackendError:
    return cls(message, transient=transient)
