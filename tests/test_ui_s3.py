"""`batchpool ui` on an object store: a run kept in S3 (moto's real server, as the other
S3 tests use), served by the command with --storage-option, read and deleted over HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from calls import divide
from ui_runs import ui_command

from batchpool import BatchPoolExecutor

pytest.importorskip("flask")
pytestmark = pytest.mark.s3


def test_batchpool_ui_serves_a_run_in_s3(s3_storage: dict[str, Any]) -> None:
    with BatchPoolExecutor(**s3_storage, cleanup_bucket=False, max_workers=2, name="remote") as bpe:
        good, bad = bpe.submit(divide, 2), bpe.submit(divide, 0)
        assert good.result(timeout=60) == 0.5 and bad.exception(timeout=60) is not None
        folder = bpe.run_url.rsplit("/", 1)[-1]
    options = [
        f"--storage-option={key}={json.dumps(value)}"
        for key, value in s3_storage["storage_options"].items()
    ]
    with ui_command(s3_storage["storage"], *options) as command:
        assert s3_storage["storage"] in command.said, command.said
        url = command.url
        base = url.split("/?token=")[0]
        session = requests.Session()
        assert session.get(url, timeout=60).status_code == 200  # sets the cookie
        runs = session.get(base + "/api/runs", timeout=60).json()["runs"]
        assert [(r["folder"], r["name"]) for r in runs] == [(folder, "remote")]
        assert runs[0]["calls"] == {"Success": 1, "Failed": 1}
        run = session.get(f"{base}/api/runs/{folder}", timeout=60).json()
        assert "ZeroDivisionError" in run["errors"][0]["errors"][0]
        assert run["header"][0] == ["run", f"{s3_storage['storage']}/{folder}"]
        token = url.split("token=")[1]
        deleted = session.post(
            f"{base}/runs/{folder}/delete", data={"token": token}, allow_redirects=False, timeout=60
        )
        assert deleted.status_code == 303 and deleted.headers["Location"].startswith("/?notice=")
        assert session.get(base + "/api/runs", timeout=60).json()["runs"] == []
