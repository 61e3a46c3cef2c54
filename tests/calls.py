"""Functions the tests run in worker processes (importable there by reference)."""

from __future__ import annotations

import os
import time
from typing import Any


def add(x: Any, y: Any) -> Any:
    return x + y


def mul(x: Any, y: Any) -> Any:
    return x * y


def triple(x: int) -> int:
    return x * 3


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def divide(x: float) -> float:
    return 1 / x


def wait_for(path: str, value: Any = None, started: str | None = None) -> Any:
    """Return ``value`` once ``path`` exists; touch ``started`` first if given."""
    if started:
        open(started, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
    return value


def pid_once(path: str, started: str) -> int:
    """Touch ``started``, then return this worker process's pid once ``path`` exists."""
    wait_for(path, started=started)
    return os.getpid()


def touch(path: str) -> str:
    open(path, "w").close()
    return path


def env(name: str) -> str | None:
    return os.environ.get(name)


def getpid(*_: Any) -> int:
    return os.getpid()


class Dummy:
    """A result that can be weakly referenced."""

    def __init__(self, value: int) -> None:
        self.value = value


def make_dummy(value: int) -> Dummy:
    return Dummy(value)


class Holder:
    def method(self) -> int:
        return 42


def touch_after(gate: str, path: str) -> str:
    wait_for(gate)
    return touch(path)


def die_leaving_a_child(pidfile: str) -> None:
    """Fork a child that outlives this worker (holding its pipes), then die. The child
    lives until the test kills it (10 minutes at most, should the test itself die)."""
    pid = os.fork()
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    with open(pidfile, "w") as f:
        f.write(str(pid))
    os._exit(5)


# -- initializers (tests/test_dropin.py, tests/test_slurm.py) --------------------------------

#: What the initializer of this worker process was given.
initialized_with: list[Any] = []


def remember_init(folder: str) -> None:
    """An initializer: note its argument, and leave a file per run of it in ``folder``."""
    import uuid

    initialized_with.append(folder)
    open(os.path.join(folder, f"init-{os.getpid()}-{uuid.uuid4().hex}"), "w").close()


def initialized(_: Any = None) -> tuple[int, list[Any]]:
    """This process's pid and what its initializer was given."""
    return os.getpid(), list(initialized_with)


def failing_init(folder: str) -> None:
    import uuid

    open(os.path.join(folder, f"init-{os.getpid()}-{uuid.uuid4().hex}"), "w").close()
    raise ValueError("error in initializer")


#: The lock this worker process's initializer was given (keep_lock).
kept_locks: list[Any] = []


def keep_lock(lock: Any) -> None:
    """An initializer: keep the lock, as ``tqdm.set_lock`` does."""
    kept_locks[:] = [lock]


def try_kept_lock(timeout: float) -> bool:
    """Whether the initializer's lock could be taken within ``timeout``; released again."""
    lock = kept_locks[0]
    if not lock.acquire(timeout=timeout):
        return False
    lock.release()
    return True


def hold_kept_lock(held: str, release: str) -> bool:
    """Take the initializer's lock, say so in the file ``held``, keep it until ``release``
    exists."""
    lock = kept_locks[0]
    with lock:
        open(held, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
    return True


def try_kept_lock_while_held(held: str, release: str) -> bool:
    """Once another call holds the lock (``held`` exists), try it; then let it go."""
    deadline = time.monotonic() + 60
    while not os.path.exists(held) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        return try_kept_lock(0.3)
    finally:
        open(release, "w").close()


def put_on(queue: Any, x: int) -> int:
    queue.put(x * 2)
    return x


def inc(x: int) -> int:
    return x + 1


def big_bytes(i: int) -> bytes:
    """A result of 3 MB: a chunk of many is pickled in parts, not held whole."""
    return bytes([i % 256]) * 3_000_000


def mark_and_fail_every(folder: str, x: int, every: int) -> int:
    """Leave a file per run of the call; raise for the multiples of ``every``."""
    open(os.path.join(folder, f"{x}-{os.getpid()}-{time.monotonic_ns()}"), "w").close()
    if x % every == 0:
        raise ValueError(f"item {x}")
    return x


def square(x: int) -> int:
    return x * x


class Oddity(ValueError):
    pass


def odd_fails(x: int) -> int:
    if x % 2:
        raise Oddity(f"{x} is odd")
    return x
