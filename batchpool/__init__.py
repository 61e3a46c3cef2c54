"""batchpool: a concurrent.futures.Executor that runs Python calls as batch jobs."""

__version__ = "0.1.0"

from batchpool.backends import Backend, JobSpec, JobState, LocalBackend, register_backend
from batchpool.billing import Estimate
from batchpool.errors import (
    BackendError,
    BatchPoolError,
    EnvironmentMismatchError,
    FailureBudgetExceeded,
    InitializerError,
    IntegrityError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerLostError,
)
from batchpool.executor import BatchPoolExecutor
from batchpool.future import BatchPoolFuture
from batchpool.serialization import BlobRef
from batchpool.store import StorageError

__all__ = [
    "Backend",
    "BackendError",
    "BatchPoolError",
    "BatchPoolExecutor",
    "BatchPoolFuture",
    "BlobRef",
    "EnvironmentMismatchError",
    "Estimate",
    "FailureBudgetExceeded",
    "InitializerError",
    "IntegrityError",
    "JobSpec",
    "JobState",
    "LocalBackend",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "StorageError",
    "WorkerLostError",
    "__version__",
    "register_backend",
]
