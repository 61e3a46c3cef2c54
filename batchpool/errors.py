"""The exceptions batchpool raises, and the carrier of a remote traceback."""

from __future__ import annotations

import pickle


class BatchPoolError(Exception):
    """Base class of the errors batchpool raises itself."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a job, chained as its ``__cause__``.

    Printing the exception then shows where it was raised on the worker, as the
    stdlib's ``ProcessPoolExecutor`` does with its ``_RemoteTraceback``.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


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


class WorkerLostError(BatchPoolError):
    """A job ended without writing a result, as many times as it was allowed to try."""


class SerializationError(pickle.PicklingError, BatchPoolError):
    """A call, a result or an exception could not be pickled."""


class IntegrityError(BatchPoolError):
    """An object in storage does not carry a valid signature of this run."""


class EnvironmentMismatchError(BatchPoolError):
    """The worker's Python or serializer cannot read what the client wrote."""


class BackendError(BatchPoolError):
    """A backend could not start, submit or query jobs."""
