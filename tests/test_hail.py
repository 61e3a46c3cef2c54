"""The Hail Batch backend with hailtop's real client.

- hailtop's real ``LocalBackend`` runs the jobs (plain bash, no image) end to end.
- The service cannot run here. The service calls (``run(wait=False)``, ``jobs()``,
  ``cancel``, ``from_batch_id``, ``get_job``/``get_job_log``) go through hailtop's
  real ``ServiceBackend`` and batch client over HTTP to a small local server that
  answers with the JSON bodies in ``tests/data/hail/``. Those bodies are written
  after hailtop 0.2.139's own response types (``hailtop/batch_client/types.py``)
  and the fields its client reads; they were NOT captured from a real Hail Batch
  service. The server records every request, so the tests check what hailtop
  sent (the job specs, the cancel) as well as what the backend made of the answers.

hailtop is installed on first use into a cache folder (``services/hail.py``);
without it the tests skip, or fail when ``CI`` is set.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from batchpool import BatchPoolExecutor, WorkerLostError
from batchpool.backends.base import JobSpec, JobState, Resources, backend_class

pytestmark = pytest.mark.hail

DATA = Path(__file__).parent / "data" / "hail"
BATCH_ID = 4711
TOKEN = "batchpool-test-token"
#: An Azure path: hailtop checks only gs:// folders against the cloud when a backend is made,
#: and these tests write nothing there (no input files).
REMOTE_TMPDIR = "https://batchpooltest.blob.core.windows.net/tmp/batch"


@pytest.fixture(scope="module")
def hb() -> Any:
    from services.hail import HailtopUnavailable, ensure_hailtop

    try:
        ensure_hailtop()
    except HailtopUnavailable as exc:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI is set but hailtop cannot be installed: {exc}") from None
        pytest.skip(f"hailtop cannot be installed: {exc}")
    import hailtop.batch

    return hailtop.batch


# -- hailtop's LocalBackend, for real -------------------------------------------------------


def crash(x: int) -> int:
    raise KeyError(f"no {x}")


def die(x: int) -> int:
    os.kill(os.getpid(), 9)
    return x


def read_env(name: str) -> str | None:
    return os.environ.get(name)


def root_fs() -> tuple[int, int]:
    """Which filesystem ``/`` is: another one in a container."""
    st = os.stat("/")
    return st.st_dev, st.st_ino


@pytest.fixture
def local_ex(hb: Any, tmp_path: Path) -> Iterator[BatchPoolExecutor]:
    from batchpool.backends.hail import HailBatchBackend

    backend = HailBatchBackend(hb.LocalBackend(tmp_dir=str(tmp_path / "hail")))
    with BatchPoolExecutor(backend=backend, storage=str(tmp_path / "store"), max_attempts=2) as ex:
        yield ex


def test_the_name_is_registered(hb: Any) -> None:
    from batchpool.backends.hail import HailBatchBackend

    assert backend_class("hail") is HailBatchBackend


def test_map_runs_in_order_through_hailtops_local_backend(local_ex: BatchPoolExecutor) -> None:
    assert list(local_ex.map(abs, range(-10, 10), chunksize=4, timeout=100)) == [
        abs(x) for x in range(-10, 10)
    ]


def test_an_exception_comes_back_as_its_own_type(local_ex: BatchPoolExecutor) -> None:
    with pytest.raises(KeyError, match="no 3"):
        local_ex.submit(crash, 3).result(timeout=100)


def test_a_killed_worker_is_lost_after_max_attempts(local_ex: BatchPoolExecutor) -> None:
    with pytest.raises(WorkerLostError) as info:
        local_ex.submit(die, 1).result(timeout=100)
    text = str(info.value)
    assert "2 attempts" in text, text
    assert "137" in text or "SIGKILL" in text, text


def test_an_env_value_with_spaces_and_quotes_arrives_intact(local_ex: BatchPoolExecutor) -> None:
    value = "two words, 'single' \"double\" $HOME `x` \\ end"
    view = local_ex.options(env={"HAIL_TEST_VALUE": value})
    assert view.submit(read_env, "HAIL_TEST_VALUE").result(timeout=100) == value


def test_local_events_are_pushed_and_cancel_stops_queued_and_running_jobs(
    hb: Any, tmp_path: Path
) -> None:
    from batchpool.backends.hail import HailBatchBackend

    backend = HailBatchBackend(hb.LocalBackend(tmp_dir=str(tmp_path / "hail")))
    assert backend.notifies and backend.bounded and not backend.job_ids_outlive_client
    assert backend.describe() == {"name": "hail", "options": {"backend": "local"}}
    events: list[Any] = []
    done = threading.Event()

    def notify(event: Any) -> None:
        events.append(event)
        if len(events) == 3:
            done.set()

    # Sleeps an hour: it ends only by being stopped.
    res = Resources(python=(sys.executable, "-c", "import time; time.sleep(3600)", "--"))
    jobs = [JobSpec(name=f"sleep-{n}", args=("x",), resources=res) for n in range(2)]
    jobs.append(
        JobSpec(
            name="fail",
            args=(),
            resources=Resources(python=(sys.executable, "-c", "raise SystemExit(3)")),
        )
    )
    # The first job sleeps; the second waits behind it (one runner); the third fails.
    try:
        ids = backend.submit(jobs, notify)
        for job_id in ids:
            HailBatchBackend.check_job_id(job_id)
        deadline = time.monotonic() + 60
        while backend.status(ids[:1])[ids[0]] is not JobState.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        backend.cancel(ids[:2])
        assert done.wait(60), events  # the sleeper was stopped, not waited for (an hour)
        by_id = {e.job_id: e for e in events}
        assert by_id[ids[0]].state is JobState.CANCELLED
        assert by_id[ids[1]].state is JobState.CANCELLED
        assert by_id[ids[2]].state is JobState.FAILED and by_id[ids[2]].exit_code == 3
        assert "exit code 3" in backend.explain(ids[2])
        assert backend.status(ids) == {
            ids[0]: JobState.CANCELLED,
            ids[1]: JobState.CANCELLED,
            ids[2]: JobState.FAILED,
        }
    finally:
        backend.close()


# -- the service: hailtop's real client against recorded answers ----------------------------


class _Recorded(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        self.server.requests.append(
            {
                "method": method,
                "path": url.path,
                "query": parse_qs(url.query),
                "auth": self.headers.get("Authorization"),
                "body": json.loads(body) if body else None,
            }
        )
        name = self.server.route(method, url.path)
        if name is None:
            self.send_response(404)
            self.end_headers()
            return
        payload = (DATA / name).read_bytes() if name.endswith(".json") else name.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_PATCH(self) -> None:
        self._answer("PATCH")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Recorded)
        self.requests: list[dict[str, Any]] = []
        self.jobs_answer = "jobs-mixed.json"

    def route(self, method: str, path: str) -> str | None:
        base = f"/api/v1alpha/batches/{BATCH_ID}"
        routes = {
            ("POST", "/api/v1alpha/batches/create-fast"): "create-fast.json",
            ("GET", base): "batch.json",
            ("GET", f"{base}/job-groups/0/jobs"): self.jobs_answer,
            ("PATCH", f"{base}/job-groups/0/cancel"): "{}",
        }
        if method == "GET" and re.fullmatch(rf"{base}/jobs/\d+", path):
            return "job-failed.json"
        if method == "GET" and re.fullmatch(rf"{base}/jobs/\d+/log", path):
            return "job-log.json"
        return routes.get((method, path))


@pytest.fixture
def service(hb: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    """A local server that hailtop's batch client reaches as the Batch service."""
    import hailtop.auth.tokens
    import hailtop.config.deploy_config

    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    deploy = tmp_path / "deploy-config.json"
    # location "gce" speaks plain http; HAIL_TERRA's deploy config uses the domain as it is.
    deploy.write_text(
        json.dumps({"location": "gce", "default_namespace": "default", "domain": f"{host}:{port}"})
    )
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"default": TOKEN}))
    monkeypatch.setenv("HAIL_DEPLOY_CONFIG_FILE", str(deploy))
    monkeypatch.setenv("HAIL_TERRA", "1")
    monkeypatch.setenv("HAIL_TOKENS_FILE", str(tokens))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user config, no identity
    monkeypatch.delenv("HAIL_IDENTITY_PROVIDER_JSON", raising=False)
    monkeypatch.setattr(hailtop.config.deploy_config, "deploy_config", None)
    monkeypatch.setattr(hailtop.auth.tokens, "default_tokens", None)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _service_backend(hb: Any, tmp_path: Path) -> Any:
    from batchpool.backends.hail import HailBatchBackend

    return HailBatchBackend(
        billing_project="batchpool-test",
        remote_tmpdir=REMOTE_TMPDIR,
        regions=["us-central1"],
        name="batchpool-test",
    )


def _specs() -> list[JobSpec]:
    res = Resources(
        image="us-central1-docker.pkg.dev/batchpool-test/images/worker:1",
        cpus=2,
        memory="standard",
        walltime="00:10:00",
        env=(("USER_VALUE", "two words 'q'"),),
    )
    env = {"BATCHPOOL_STORE": '{"protocol": "gs"}', "BATCHPOOL_SECRET": "00" * 32}
    return [
        JobSpec(
            name=f"chunk-{n}", args=("--chunk", f"c{n}", "--attempt", "1"), env=env, resources=res
        )
        for n in (1, 2, 3)
    ]


def test_service_submit_sends_one_batch_of_jobs_and_returns_their_ids(
    hb: Any, service: _Server, tmp_path: Path
) -> None:
    backend = _service_backend(hb, tmp_path)
    try:
        assert not backend.notifies and backend.job_ids_outlive_client
        ids = backend.submit(_specs())
        assert ids == [f"{BATCH_ID}:1", f"{BATCH_ID}:2", f"{BATCH_ID}:3"]
        for job_id in ids:
            backend.check_job_id(job_id)
        created = [r for r in service.requests if r["path"].endswith("/create-fast")]
        assert len(created) == 1
        assert all(r["auth"] == f"Bearer {TOKEN}" for r in service.requests)
        body = created[0]["body"]
        assert body["batch"]["attributes"] == {"batchpool": "1", "name": "batchpool-test"}
        specs = body["bunch"]
        assert [s["attributes"]["name"] for s in specs] == ["chunk-1", "chunk-2", "chunk-3"]
        first = specs[0]
        assert first["n_max_attempts"] == 1
        assert (
            first["process"]["image"] == "us-central1-docker.pkg.dev/batchpool-test/images/worker:1"
        )
        assert first["resources"]["cpu"] == "2"
        assert first["resources"]["memory"] == "standard"
        assert first["timeout"] == 600
        assert first["regions"] == ["us-central1"]
        env = {e["name"]: e["value"] for e in first["env"]}
        assert env["USER_VALUE"] == "two words 'q'"  # the service takes values as data
        assert env["BATCHPOOL_SECRET"] == "00" * 32
        script = first["process"]["command"][-1]
        assert "python3 -m batchpool.worker --chunk c1 --attempt 1" in script
        assert backend.describe() == {
            "name": "hail",
            "options": {
                "billing_project": "batchpool-test",
                "remote_tmpdir": REMOTE_TMPDIR,
                "regions": ["us-central1"],
                "name": "batchpool-test",
            },
        }
    finally:
        backend.close()


def test_service_status_is_one_listing_per_batch(hb: Any, service: _Server, tmp_path: Path) -> None:
    backend = _service_backend(hb, tmp_path)
    try:
        ids = backend.submit(_specs())
        service.requests.clear()
        assert backend.status([*ids, f"{BATCH_ID}:9"]) == {
            ids[0]: JobState.SUCCEEDED,
            ids[1]: JobState.FAILED,
            ids[2]: JobState.RUNNING,
            f"{BATCH_ID}:9": JobState.LOST,
        }
        listings = [r for r in service.requests if r["path"].endswith("/jobs")]
        assert len(listings) == 1 and listings[0]["query"]["recursive"] == ["True"]
    finally:
        backend.close()


def test_service_attach_finds_the_batch_and_explains_a_failed_job(
    hb: Any, service: _Server, tmp_path: Path
) -> None:
    """A new backend (another process, after attach) knows the batch only by its id."""
    from batchpool.backends.hail import HailBatchBackend

    options = _service_backend(hb, tmp_path).describe()["options"]
    backend = HailBatchBackend(**options)
    try:
        assert backend.status([f"{BATCH_ID}:2"]) == {f"{BATCH_ID}:2": JobState.FAILED}
        assert ("GET", f"/api/v1alpha/batches/{BATCH_ID}") in {
            (r["method"], r["path"]) for r in service.requests
        }
        text = backend.explain(f"{BATCH_ID}:2")
        assert f"Hail Batch job {BATCH_ID}:2 ended Failed" in text, text
        assert "exit code 137 (killed by SIGKILL)" in text, text
        assert "Killed" in text, text  # the log's tail
    finally:
        backend.close()


def test_service_cancel_cancels_a_batch_only_when_all_its_unfinished_jobs_go(
    hb: Any, service: _Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = _service_backend(hb, tmp_path)
    try:
        ids = backend.submit(_specs())
        service.requests.clear()
        backend.cancel([ids[2]])  # the only unfinished job: the batch is cancelled
        cancels = [r for r in service.requests if r["method"] == "PATCH"]
        assert [r["path"] for r in cancels] == [
            f"/api/v1alpha/batches/{BATCH_ID}/job-groups/0/cancel"
        ]
        service.requests.clear()
        service.jobs_answer = "jobs-all-running.json"
        with caplog.at_level(logging.WARNING, logger="batchpool.backends.hail"):
            backend.cancel([ids[0]])
        assert not [r for r in service.requests if r["method"] == "PATCH"]
        assert "cancels whole batches only" in caplog.text, caplog.text
    finally:
        backend.close()


def test_service_refuses_jobs_without_an_image_and_local_stores(
    hb: Any, service: _Server, tmp_path: Path
) -> None:
    backend = _service_backend(hb, tmp_path)
    try:
        with pytest.raises(ValueError, match="need an image"):
            backend.submit([JobSpec(name="x", args=())])
        with pytest.raises(ValueError, match="cannot reach"):
            backend.check_store("file", str(tmp_path))
        assert not [r for r in service.requests if r["method"] == "POST"]
    finally:
        backend.close()


def test_an_executor_over_the_service_retries_a_failed_job_then_says_why(
    hb: Any, service: _Server, s3_storage: dict[str, Any]
) -> None:
    """The watcher's threads drive hailtop's client: submit, poll, explain; the service
    says job 1 Failed (exit 137) and no outcome appears, so the call is lost."""
    service.jobs_answer = "jobs-one-failed.json"
    backend = _service_backend(hb, Path("."))
    with BatchPoolExecutor(backend=backend, max_attempts=2, **s3_storage) as ex:
        view = ex.options(image="us-central1-docker.pkg.dev/batchpool-test/images/worker:1")
        with pytest.raises(WorkerLostError) as info:
            view.submit(abs, -1).result(timeout=60)
    text = str(info.value)
    assert "2 attempts" in text, text
    assert "exit code 137 (killed by SIGKILL)" in text, text
    created = [r for r in service.requests if r["path"].endswith("/create-fast")]
    assert len(created) == 2  # one batch per attempt
    assert "--attempt 2" in created[1]["body"]["bunch"][0]["process"]["command"][-1]


# -- hailtop's LocalBackend with an image: docker run through the test container engine -----


def test_image_jobs_run_in_containers_through_local_backends_docker_run(
    hb: Any,
    container_engine: Any,
    worker_image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batchpool.backends.hail import HailBatchBackend

    # LocalBackend runs `docker ...` from PATH, against DOCKER_HOST (set by the fixture).
    docker = shutil.which(container_engine.docker) or container_engine.docker
    monkeypatch.setenv("PATH", os.path.dirname(docker) + os.pathsep + os.environ["PATH"])
    store = tmp_path / "store"
    store.mkdir()
    flags = f" --rm --network host -v {store}:{store}"  # glued onto --entrypoint=''
    local = hb.LocalBackend(tmp_dir=str(tmp_path / "hail"), extra_docker_run_flags=flags)
    value = "two words, 'single' \"double\" $HOME"
    with BatchPoolExecutor(
        backend=HailBatchBackend(local), image=worker_image, storage=str(store)
    ) as ex:
        assert list(ex.map(abs, range(-4, 4), chunksize=2, timeout=100)) == [
            abs(x) for x in range(-4, 4)
        ]
        view = ex.options(env={"HAIL_TEST_VALUE": value})
        assert view.submit(read_env, "HAIL_TEST_VALUE").result(timeout=100) == value
        assert ex.submit(root_fs).result(timeout=100) != root_fs()  # it ran in a container


def test_the_example_runs_unchanged_on_hailtops_local_backend(hb: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    from services.hail import cache_dir

    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(cache_dir())) if p)
    example = subprocess.run(
        [
            sys.executable, str(root / "examples" / "anywhere.py"), "--backend", "hail",
            "--backend-option", "backend=local", "--storage", str(tmp_path / "runs"),
            "--blocks", "4",
        ],
        capture_output=True, text=True, timeout=200, check=False,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert example.returncode == 0, example.stderr[-3000:]
    assert "primes below" in example.stdout
