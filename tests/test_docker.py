"""The docker backend against a real dockerd (started by ci/docker.sh) and images built here.

The worker image comes from ``batchpool.images.build_image`` on a Debian base made
with debootstrap (no registry is reachable here): see tests/containers.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from containers import ContainerEngine

from batchpool import BackendError, BatchPoolExecutor, WorkerLostError
from batchpool.backends.base import JobEvent, JobSpec, JobState, Resources, make_backend
from batchpool.backends.docker import DockerBackend

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent


def square(x: int) -> int:
    return x * x


class Boom(ValueError):
    pass


def boom(x: int) -> int:
    print(f"boom is coming for {x}", flush=True)
    raise Boom(f"boom {x}")


def where() -> tuple[int, str, str | None]:
    with open("/etc/os-release") as f:
        first = f.readline().strip()
    return os.getuid(), first, os.environ.get("BATCHPOOL_TEST_MARK")


def hog(megabytes: int) -> int:
    print("allocating", flush=True)
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block)


def die(x: int) -> int:
    print(f"about to die with {x}", flush=True)
    os.kill(os.getpid(), 9)
    return x


def uses_six() -> str:
    import six

    return str(six.__version__)


@pytest.fixture
def backend(container_engine: ContainerEngine, tmp_path: Path) -> DockerBackend:
    return DockerBackend(engine=container_engine.docker, log_dir=str(tmp_path / "engine-logs"))


def test_map_runs_in_containers_of_the_image_in_order(
    backend: DockerBackend, worker_image: str, tmp_path: Path
) -> None:
    with BatchPoolExecutor(backend=backend, image=worker_image, storage=str(tmp_path)) as ex:
        assert list(ex.map(square, range(20), chunksize=4)) == [x * x for x in range(20)]
        uid, system, mark = ex.submit(where).result(timeout=60)
    assert uid == os.getuid()  # --user: what it writes in the store is the user's
    assert "Debian GNU/Linux 12" in system  # the image's system, not this machine's
    assert mark is None
    assert backend.commands["run"] == 6  # one container per chunk, one for the submit
    assert backend.commands["image"] == 1  # the image is checked once
    # every container was removed once its outcome was read
    out = subprocess.run(
        [backend.engine, "ps", "-a", "-q", "--filter", f"label=batchpool.backend={backend._token}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == ""


def test_errors_keep_their_type_and_logs_reach_the_store(
    backend: DockerBackend, worker_image: str, tmp_path: Path
) -> None:
    with BatchPoolExecutor(backend=backend, image=worker_image, storage=str(tmp_path)) as ex:
        with pytest.raises(Boom, match="boom 3") as info:
            ex.submit(boom, 3).result(timeout=60)
        assert "boom" in str(info.value.__cause__)
        logs = list(Path(ex.run_url).rglob("logs/*.log"))
        assert any(b"boom is coming for 3" in p.read_bytes() for p in logs), logs


def test_a_container_past_its_memory_limit_is_oomkilled_and_retried(
    backend: DockerBackend, worker_image: str, tmp_path: Path
) -> None:
    with BatchPoolExecutor(
        backend=backend, image=worker_image, storage=str(tmp_path), max_attempts=2
    ) as ex:
        future = ex.options(memory="64M").submit(hog, 400)
        with pytest.raises(WorkerLostError) as info:
            future.result(timeout=100)
    text = str(info.value)
    assert "2 attempts" in text, text
    assert "OOMKilled" in text and "exit code 137" in text, text
    # where the container's own output is (the calls' output was captured by the
    # worker, and dies with it)
    assert "the container's output" in text, text
    assert backend.commands["run"] == 2


def test_other_deaths_name_the_signal(
    backend: DockerBackend, worker_image: str, tmp_path: Path
) -> None:
    with (
        BatchPoolExecutor(
            backend=backend, image=worker_image, storage=str(tmp_path), max_attempts=1
        ) as ex,
        pytest.raises(WorkerLostError) as info,
    ):
        ex.submit(die, 1).result(timeout=60)
    text = str(info.value)
    assert "exit code 137" in text and "killed by SIGKILL" in text, text
    assert "OOMKilled" not in text, text


def test_image_per_group_with_options(
    container_engine: ContainerEngine, backend: DockerBackend, worker_image: str, tmp_path: Path
) -> None:
    marked = f"{worker_image}-marked"
    context = tmp_path / "marked"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {worker_image}\nENV BATCHPOOL_TEST_MARK=two\n")
    subprocess.run(
        [container_engine.docker, "build", "-q", "-t", marked, str(context)],
        check=True,
        capture_output=True,
    )
    with BatchPoolExecutor(backend=backend, image=worker_image, storage=str(tmp_path)) as ex:
        assert ex.submit(where).result(timeout=60)[2] is None
        assert ex.options(image=marked).submit(where).result(timeout=60)[2] == "two"


def test_a_missing_image_fails_clearly_and_pulls_nothing(
    backend: DockerBackend, tmp_path: Path
) -> None:
    missing = "localhost/no-such:image"
    with BatchPoolExecutor(backend=backend, image=missing, storage=str(tmp_path)) as ex:
        future = ex.submit(square, 2)
        with pytest.raises(Exception, match="batchpool image build") as info:
            future.result(timeout=60)
    assert "localhost/no-such:image" in str(info.value)
    assert "run" not in backend.commands


def test_no_image_at_all_is_refused_with_the_way_to_give_one(
    backend: DockerBackend, tmp_path: Path
) -> None:
    with (
        BatchPoolExecutor(backend=backend, storage=str(tmp_path)) as ex,
        pytest.raises(Exception, match=r"names no image.*image="),
    ):
        ex.submit(square, 2).result(timeout=60)


def test_a_store_no_container_reaches_is_refused_at_construction(
    backend: DockerBackend, tmp_path: Path
) -> None:
    folder = fsspec.filesystem("dir", path=str(tmp_path), fs=fsspec.filesystem("file"))
    with pytest.raises(ValueError, match="dir:// store cannot be reached from a container"):
        BatchPoolExecutor(backend=backend, image="x", storage=folder)


def test_queued_jobs_wait_for_a_slot_and_cancel_finds_running_containers(
    container_engine: ContainerEngine, worker_image: str, tmp_path: Path
) -> None:
    backend = DockerBackend(
        engine=container_engine.docker, parallel=1, log_dir=str(tmp_path / "logs")
    )
    events: list[JobEvent] = []
    # ``bash -c 'sleep 600' --`` swallows the worker's argv: containers that just run,
    # until killed below (still running, however long the waits before took).
    sleeper = Resources(image=worker_image, python=("bash", "-c", "sleep 600", "--"))
    specs = [
        JobSpec(name=f"sleep-{i}", args=("--chunk", str(i)), resources=sleeper) for i in range(2)
    ]
    first, second = backend.submit(specs, events.append)
    deadline = time.monotonic() + 30
    while backend.status([first])[first] is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert backend.status([second])[second] is JobState.PENDING  # one slot: it waits
    # another process (attach, `batchpool cancel`) knows the container by its name
    other = make_backend("docker", engine=container_engine.docker)
    deadline = time.monotonic() + 30
    while other.status([first])[first] is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    backend.cancel([second])  # queued: dropped, never started
    other.cancel([first])  # running: docker kill by name
    deadline = time.monotonic() + 30
    while len([e for e in events if e.state.is_final]) < 2:
        assert time.monotonic() < deadline, events
        time.sleep(0.1)
    ended = {e.job_id: e for e in events if e.state.is_final}
    assert ended[second].state is JobState.CANCELLED
    assert ended[first].state is JobState.FAILED and ended[first].exit_code == 137
    assert backend.commands["run"] == 1
    backend.close()


def test_future_cancel_drops_a_call_queued_behind_a_busy_slot(
    container_engine: ContainerEngine, worker_image: str, tmp_path: Path
) -> None:
    backend = DockerBackend(engine=container_engine.docker, parallel=1)
    with BatchPoolExecutor(
        backend=backend, image=worker_image, storage=str(tmp_path), max_workers=1
    ) as ex:
        slow = ex.submit(time.sleep, 3)
        queued = [ex.submit(square, i) for i in range(3)]
        assert queued[-1].cancel()
        assert slow.result(timeout=60) is None
        assert [f.result(timeout=60) for f in queued[:-1]] == [0, 1]
        with pytest.raises(cf.CancelledError):
            queued[-1].result()


def test_image_build_installs_requirements_and_the_example_runs_unchanged(
    container_engine: ContainerEngine, worker_image: str, tmp_path: Path
) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("six\n")
    tag = f"{worker_image}-six"
    env = {**os.environ, "PATH": f"{os.path.dirname(container_engine.docker)}:{os.environ['PATH']}"}
    built = subprocess.run(
        [
            sys.executable, "-m", "batchpool", "image", "build",
            "--base", worker_image, "-r", str(requirements), "-t", tag,
            "--engine", container_engine.docker,
        ],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    backend = DockerBackend(engine=container_engine.docker)
    with BatchPoolExecutor(backend=backend, image=tag, storage=str(tmp_path / "store")) as ex:
        assert ex.submit(uses_six).result(timeout=60)
    example = subprocess.run(
        [
            sys.executable, str(ROOT / "examples" / "anywhere.py"), "--backend", "docker",
            "--image", tag, "--storage", str(tmp_path / "anywhere"), "--blocks", "4",
        ],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert example.returncode == 0, example.stderr[-3000:]
    assert "primes below" in example.stdout


def test_an_engine_that_is_not_there_is_named() -> None:
    with pytest.raises(BackendError, match="'no-such-engine' is not on the PATH"):
        DockerBackend(engine="no-such-engine")
