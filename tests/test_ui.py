"""The web page over HTTP (`batchpool ui`, ``bpe.ui()``): every route, the token, the
POST-only actions and their same-origin checks, escaping, traversal attempts, and a
store that cannot be read. A real server on 127.0.0.1 serves real runs of the local
backend (tests/ui_runs.py); requests talks to it as a browser would."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from ui_runs import FAILING, ITEMS, SCRIPT, EndedRun, ended_run, live_run, ui_command

from batchpool import BatchPoolExecutor
from batchpool.ui import UIServer
from batchpool.ui.views import PAGE_SIZE

pytest.importorskip("flask")


@pytest.fixture(scope="module")
def ended(tmp_path_factory: pytest.TempPathFactory) -> EndedRun:
    return ended_run(tmp_path_factory.mktemp("ui") / "runs")


@pytest.fixture(scope="module")
def server(ended: EndedRun) -> Iterator[UIServer]:
    with UIServer(str(ended.storage)) as ui:
        yield ui


def signed_in(server: UIServer) -> requests.Session:
    """A session holding the server's cookie, as a browser has after opening its URL."""
    session = requests.Session()
    response = session.get(server.url, allow_redirects=False, timeout=30)
    assert response.status_code == 303
    assert "token=" not in response.headers["Location"]
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session.cookies.set(f"batchpool_ui_{server.port}", server.token)
    return session


def api(session: requests.Session, server: UIServer, path: str, **params: Any) -> Any:
    response = session.get(server.base_url + path, params=params, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


# -- the token ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/api/runs", "/runs/nightly", "/runs/nightly/delete", "/api/runs/nightly"]
)
def test_every_page_needs_the_token(server: UIServer, path: str) -> None:
    response = requests.get(server.base_url + path, timeout=30)
    assert response.status_code == 403
    assert "token" in response.text and "Traceback" not in response.text
    wrong = requests.get(server.base_url + path, params={"token": "nope"}, timeout=30)
    assert wrong.status_code == 403


def test_the_token_in_the_url_becomes_a_cookie(server: UIServer) -> None:
    session = signed_in(server)
    page = session.get(server.base_url + "/", timeout=30)
    assert page.status_code == 200 and "nightly" in page.text
    header = requests.get(
        server.base_url + "/api/runs", headers={"X-BatchPool-Token": server.token}, timeout=30
    )
    assert header.status_code == 200


def test_static_files_and_security_headers(server: UIServer) -> None:
    css = requests.get(server.base_url + "/static/ui.css", timeout=30)
    js = requests.get(server.base_url + "/static/ui.js", timeout=30)
    assert css.status_code == js.status_code == 200  # the package's own files, no token
    page = signed_in(server).get(server.base_url + "/", timeout=30)
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "same-origin"
    assert "http://" not in page.text.replace(server.base_url, "")  # nothing from the internet


def test_a_foreign_host_header_is_refused(server: UIServer) -> None:
    response = requests.get(
        server.base_url + "/api/runs",
        headers={"Host": "evil.example:80", "X-BatchPool-Token": server.token},
        timeout=30,
    )
    assert response.status_code == 400
    assert "evil.example" in response.json()["error"]


# -- what the pages show --------------------------------------------------------------------


def test_runs_page_and_its_json(server: UIServer, ended: EndedRun) -> None:
    session = signed_in(server)
    runs = api(session, server, "/api/runs")["runs"]
    assert [r["folder"] for r in runs] == [ended.folder]
    run = runs[0]
    assert run["state"] == "closed" and run["n_calls"] == len(ITEMS)
    assert run["calls"]["Failed"] == len(FAILING)
    assert run["calls"].get("Error", 0) >= 1  # the killed job's calls
    assert run["wall"] != "-" and run["cost"] is not None and run["size_bytes"] > 0
    html = session.get(server.base_url + "/", timeout=30).text
    assert f'href="/runs/{ended.folder}"' in html and "Failed" in html


def test_run_page_header_jobs_errors_and_filter(server: UIServer, ended: EndedRun) -> None:
    session = signed_in(server)
    page = api(session, server, f"/api/runs/{ended.folder}")
    assert page["shown"] == page["n_jobs"] == len(page["rows"])
    labels = [label for label, _ in page["header"]]
    assert labels[:5] == ["run", "name", "created", "backend", "state"]
    failed = [e for e in page["errors"] if e["state"] == "Failed"]
    assert failed and "ValueError: shard" in failed[0]["errors"][0]
    assert "Traceback (most recent call last)" in failed[0]["tracebacks"][0]
    assert any(e["state"] == "Error" for e in page["errors"])  # the killed job
    only = api(session, server, f"/api/runs/{ended.folder}", state="Failed")
    assert only["rows"] and {r["state"] for r in only["rows"]} == {"Failed"}
    html = session.get(server.base_url + f"/runs/{ended.folder}", timeout=30).text
    assert "Traceback (most recent call last)" in html and 'id="timeline"' in html
    bad = session.get(server.base_url + f"/runs/{ended.folder}?state=Exploded", timeout=30)
    assert bad.status_code == 400 and "not a job state" in bad.text
    bad_page = session.get(server.base_url + f"/runs/{ended.folder}?page=x", timeout=30)
    assert bad_page.status_code == 400
    timeline = api(session, server, f"/api/runs/{ended.folder}/timeline")
    assert timeline["lanes"] and len(timeline["bars"]) == page["n_jobs"]


def test_job_page_shows_each_attempt_log_escaped(server: UIServer, ended: EndedRun) -> None:
    session = signed_in(server)
    chunk = ended.chunks[0]
    job = api(session, server, f"/api/runs/{ended.folder}/jobs/{chunk}")
    assert job["job"]["chunk"] == chunk and job["attempts"][0]["log"]["text"]
    assert SCRIPT in job["attempts"][0]["log"]["text"]
    html = session.get(server.base_url + f"/runs/{ended.folder}/jobs/{chunk}", timeout=30).text
    assert "<script>document.title" not in html and "<img src=x" not in html
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in html
    assert "processing shard 0" in html


def test_traversal_and_unknown_names_are_404(server: UIServer, ended: EndedRun) -> None:
    # http.client sends the paths as written (requests would normalise the dots away)
    for path in [
        "/runs/..",
        "/runs/../../etc/passwd",
        "/runs/..%2F..%2Fetc",
        "/runs/%2e%2e/jobs/x",
        f"/runs/{ended.folder}/jobs/..%2Fmanifest.json",
        f"/runs/{ended.folder}/jobs/../manifest.json",
        f"/runs/{ended.folder}/jobs/{ended.chunks[0]}%2F..%2F..",
        f"/api/runs/{ended.folder}/jobs/00000001-000000000000",
        "/api/runs/nosuchrun",
    ]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", path, headers={"X-BatchPool-Token": server.token})
        response = connection.getresponse()
        body = response.read().decode()
        connection.close()
        assert response.status == 404, (path, response.status)
        assert "Traceback" not in body and "root:" not in body


# -- actions ------------------------------------------------------------------------------


def form(session: requests.Session, server: UIServer, path: str, **fields: str) -> Any:
    return session.post(server.base_url + path, data=fields, allow_redirects=False, timeout=60)


def test_actions_are_post_only_with_the_token_from_this_site(
    server: UIServer, ended: EndedRun
) -> None:
    session = signed_in(server)
    confirm = session.get(server.base_url + f"/runs/{ended.folder}/delete", timeout=30)
    assert confirm.status_code == 200 and "Yes, delete the run" in confirm.text
    assert (ended.storage / ended.folder / "manifest.json").exists()  # a GET does nothing
    assert form(session, server, f"/runs/{ended.folder}/delete").status_code == 403  # no token
    cross = session.post(
        server.base_url + f"/runs/{ended.folder}/delete",
        data={"token": server.token},
        headers={"Origin": "http://evil.example"},
        allow_redirects=False,
        timeout=30,
    )
    assert cross.status_code == 403 and "evil.example" in cross.text
    site = session.post(
        server.base_url + f"/runs/{ended.folder}/cancel",
        data={"token": server.token},
        headers={"Sec-Fetch-Site": "cross-site"},
        allow_redirects=False,
        timeout=30,
    )
    assert site.status_code == 403
    cookieless = requests.post(
        server.base_url + f"/runs/{ended.folder}/delete", data={"token": server.token}, timeout=30
    )
    assert cookieless.status_code == 403  # the form's token alone is not enough
    assert (ended.storage / ended.folder / "manifest.json").exists()
    assert not (ended.storage / ended.folder / "cancel.json").exists()


def test_cancel_a_live_run_then_delete_it(tmp_path: Path) -> None:
    with live_run(tmp_path) as live:
        server, folder, storage = live.server, live.folder, live.storage
        session = signed_in(server)
        deadline = time.monotonic() + 60
        while api(session, server, f"/api/runs/{folder}")["jobs"].get("Running", 0) < 1:
            assert time.monotonic() < deadline, "no job started"
            time.sleep(0.2)
        # a live run is not deleted without the tick
        refused = form(session, server, f"/runs/{folder}/delete", token=server.token)
        assert refused.status_code == 303
        notice = session.get(server.base_url + refused.headers["Location"], timeout=30).text
        assert "not deleted" in notice and "running" in notice
        done = form(session, server, f"/runs/{folder}/cancel", token=server.token)
        assert done.status_code == 303
        notice = session.get(server.base_url + done.headers["Location"], timeout=30).text
        assert "cancel requested" in notice
        for future in live.futures:  # no future waits forever: each ends, cancelled or failed
            assert future.exception(timeout=120) is not None or future.cancelled()
    assert (storage / folder / "cancel.json").exists()
    with UIServer(str(storage)) as server:
        session = signed_in(server)
        gone = form(session, server, f"/runs/{folder}/delete", token=server.token)
        assert gone.status_code == 303 and gone.headers["Location"].startswith("/?notice=")
        assert not (storage / folder).exists()
        assert api(session, server, "/api/runs")["runs"] == []


def test_delete_of_a_live_run_when_ticked(tmp_path: Path) -> None:
    with live_run(tmp_path, "doomed", calls=1) as live:
        session = signed_in(live.server)
        response = form(
            session,
            live.server,
            f"/runs/{live.folder}/delete",
            token=live.server.token,
            force="yes",
        )
        assert response.status_code == 303
        assert not (live.storage / live.folder / "manifest.json").exists()
    live.futures[0].exception(timeout=120)  # it ended (its store is gone): no hang


# -- a store that cannot be read ------------------------------------------------------------


def test_a_half_deleted_run_and_a_missing_store_say_so(tmp_path: Path) -> None:
    made = ended_run(tmp_path / "runs", name="half")
    with UIServer(str(made.storage)) as server:
        session = signed_in(server)
        assert api(session, server, "/api/runs")["runs"]
        (made.storage / made.folder / "manifest.json").unlink()  # deleted under the page
        server.storage.forget(made.folder)
        for path in [f"/runs/{made.folder}", f"/api/runs/{made.folder}"]:
            response = session.get(server.base_url + path, timeout=30)
            assert response.status_code == 404
            assert "is gone" in response.text or "no run" in response.text
            assert "Traceback" not in response.text
        shutil.rmtree(made.storage)
        server.storage.cache.forget("")
        response = session.get(server.base_url + "/", timeout=30)
        assert response.status_code == 503 and "does not exist" in response.text
        assert "Traceback" not in response.text


# -- a run of many jobs is paged ------------------------------------------------------------


def test_the_jobs_table_is_paged(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    n = PAGE_SIZE * 2 + 30
    with BatchPoolExecutor(
        name="many", storage=str(storage), max_workers=2, cleanup_bucket=False
    ) as bpe:
        assert list(bpe.map(abs, range(n), chunksize=1)) == list(range(n))
        folder = bpe.run_url.rsplit("/", 1)[-1]
    with UIServer(str(storage)) as server:
        session = signed_in(server)
        first = api(session, server, f"/api/runs/{folder}")
        assert (first["pages"], len(first["rows"]), first["n_jobs"]) == (3, PAGE_SIZE, n)
        last = api(session, server, f"/api/runs/{folder}", page=3)
        assert len(last["rows"]) == 30 and last["rows"][-1]["chunk"] > first["rows"][0]["chunk"]
        beyond = api(session, server, f"/api/runs/{folder}", page=99)
        assert beyond["page"] == 3
        html = session.get(server.base_url + f"/runs/{folder}?page=2", timeout=30).text
        assert html.count('class="job-row"') == PAGE_SIZE and 'rel="next"' in html


# -- a running job's log, as it prints ------------------------------------------------------


def test_a_running_jobs_log_is_shown_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHPOOL_LIVE_LOG_SECONDS", "0.3")  # the workers inherit it
    with live_run(tmp_path, "follow", calls=1) as live:
        server, folder = live.server, live.folder
        session = signed_in(server)
        deadline = time.monotonic() + 60
        text = None
        while text is None:
            assert time.monotonic() < deadline, "the running job's log never showed"
            server.storage.forget(folder)
            page = api(session, server, f"/api/runs/{folder}")
            if page["rows"] and page["rows"][0]["state"] == "Running":
                job = api(session, server, f"/api/runs/{folder}/jobs/{page['rows'][0]['chunk']}")
                text = job["attempts"][-1]["log"]["text"]
                assert job["live"] is True
            time.sleep(0.2)
        assert "holding 0" in text
    assert live.futures[0].result(timeout=60) == 0  # the gate opened as the block ended


# -- the command and bpe.ui() ---------------------------------------------------------------


def test_batchpool_ui_command_serves_and_refuses_a_public_address(ended: EndedRun) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "batchpool", "ui", str(ended.storage), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "batchpool", "ui", str(ended.storage / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    with ui_command(str(ended.storage)) as command:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]+", command.url), command.url
        assert ended.folder in requests.Session().get(command.url, timeout=30).text


def test_remote_binding_warns(ended: EndedRun) -> None:
    with ui_command(str(ended.storage), "--host", "0.0.0.0", "--allow-remote") as command:
        assert command.process.stderr is not None
        warning = command.process.stderr.readline()
        assert "warning" in warning and "0.0.0.0" in warning
        assert command.url.startswith("http://0.0.0.0:")
        port = command.url.split(":")[2].split("/")[0]
        token = command.url.split("token=")[1]
        # any Host is accepted there, the token still guards every page
        assert requests.get(f"http://127.0.0.1:{port}/api/runs", timeout=30).status_code == 403
        ok = requests.get(
            f"http://127.0.0.1:{port}/api/runs", headers={"X-BatchPool-Token": token}, timeout=30
        )
        assert ok.status_code == 200


def test_bpe_ui_serves_the_current_run(tmp_path: Path) -> None:
    with BatchPoolExecutor(
        name="notebook", storage=str(tmp_path / "runs"), max_workers=1, cleanup_bucket=False
    ) as bpe:
        assert bpe.submit(abs, -3).result(timeout=60) == 3
        url = bpe.ui(open_browser=False)
        assert url == bpe.ui(open_browser=False)  # one server per executor
        folder = bpe.run_url.rsplit("/", 1)[-1]
        assert f"/runs/{folder}?token=" in url
        page = requests.get(url, timeout=30)
        assert page.status_code == 200 and "notebook" in page.text


def test_serving_from_threads_at_once(server: UIServer, ended: EndedRun) -> None:
    session = signed_in(server)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(5):
                api(session, server, f"/api/runs/{ended.folder}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
