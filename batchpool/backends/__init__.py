"""Engines that run jobs: the contract, the registry and the embedded local pool."""

from batchpool.backends.base import (
    Backend,
    JobEvent,
    JobSpec,
    JobState,
    Resources,
    available_backends,
    backend_class,
    make_backend,
    register_backend,
)
from batchpool.backends.local import LocalBackend

__all__ = [
    "Backend",
    "JobEvent",
    "JobSpec",
    "JobState",
    "LocalBackend",
    "Resources",
    "available_backends",
    "backend_class",
    "make_backend",
    "register_backend",
]
