"""The web page in a real browser: headless Chromium from Debian (tests/browser.py) loads
the pages of a real run (two calls raise, one job's worker is killed), checks what a
person sees there, and cancels a live run with its button. Screenshots go to the test's
temporary folder, and to $BATCHPOOL_SCREENSHOTS when set (the README's come from there:
``BATCHPOOL_SCREENSHOTS=docs python -m pytest tests/test_ui_browser.py``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import screenshot
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from ui_runs import EndedRun, ended_run, live_run, ui_command

from batchpool.ui import UIServer

pytest.importorskip("flask")

WAIT = 60  # seconds: a hang guard, not a measure


@pytest.fixture(scope="module")
def ended(tmp_path_factory: pytest.TempPathFactory) -> EndedRun:
    return ended_run(tmp_path_factory.mktemp("ui-browser") / "runs")


@pytest.fixture(scope="module")
def server(ended: EndedRun) -> Iterator[UIServer]:
    with UIServer(str(ended.storage)) as ui:
        yield ui


def keep(driver: WebDriver, tmp_path: Path, name: str) -> Path:
    path = screenshot(driver, tmp_path / f"{name}.png")
    wanted = os.environ.get("BATCHPOOL_SCREENSHOTS")
    if wanted:
        Path(wanted).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(wanted) / f"ui-{name}.png")
    return path


def wait_for(driver: WebDriver, css: str) -> None:
    WebDriverWait(driver, WAIT).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def texts(driver: WebDriver, css: str) -> list[str]:
    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, css)]


def test_runs_run_and_job_pages_as_a_person_sees_them(
    browser: WebDriver, server: UIServer, ended: EndedRun, tmp_path: Path
) -> None:
    browser.get(server.url)
    wait_for(browser, "table#runs tr.run-row")
    assert "token=" not in browser.current_url  # moved into a cookie
    row = browser.find_element(By.CSS_SELECTOR, "tr.run-row").text
    assert "closed" in row and "Failed" in row and "Error" in row
    keep(browser, tmp_path, "runs")

    browser.find_element(By.LINK_TEXT, ended.folder).click()
    wait_for(browser, "table#jobs tr.job-row")
    calls = browser.find_element(By.CSS_SELECTOR, 'dd[data-field="calls"]').text
    assert "2 Failed" in calls and "Error" in calls and "Success" in calls
    errors = browser.find_element(By.ID, "errors").text
    assert "ValueError: shard 3 is corrupt" in errors
    # the timeline was drawn: the canvas is not blank
    painted = browser.execute_script(
        "const c = document.getElementById('timeline');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;"
    )
    assert painted > 100
    keep(browser, tmp_path, "run")

    browser.find_element(By.CSS_SELECTOR, 'a.chip[data-state="Failed"]').click()
    wait_for(browser, "table#jobs tr.job-row")
    assert set(texts(browser, "tr.job-row td:nth-child(2)")) == {"Failed"}
    browser.find_element(By.CSS_SELECTOR, "tr.job-row td a").click()
    wait_for(browser, "pre.log")
    log = browser.find_element(By.CSS_SELECTOR, "pre.log").text
    assert "checksum mismatch in block 17" in log
    keep(browser, tmp_path, "job")


def test_what_a_job_printed_is_shown_not_run(
    browser: WebDriver, server: UIServer, ended: EndedRun
) -> None:
    browser.get(server.url_for(f"/runs/{ended.folder}/jobs/{ended.chunks[0]}"))
    wait_for(browser, "pre.log")
    assert (
        "<script>document.title='pwned'</script>"
        in browser.find_element(By.CSS_SELECTOR, "pre.log").text
    )
    assert browser.title != "pwned"
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []


def test_the_cancel_button_cancels_a_live_run(browser: WebDriver, tmp_path: Path) -> None:
    with live_run(tmp_path) as live:
        browser.get(live.server.run_url(live.folder))
        # the page refreshes itself: the Running chip appears without a reload
        WebDriverWait(browser, WAIT).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, 'a.chip[data-state="Running"]')
        )
        keep(browser, tmp_path, "live")
        browser.find_element(By.ID, "cancel-run").click()
        wait_for(browser, "#confirm-cancel")
        browser.find_element(By.ID, "confirm-cancel").click()
        WebDriverWait(browser, WAIT).until(
            lambda d: "cancel requested" in d.find_element(By.TAG_NAME, "body").text
        )
        deadline = time.monotonic() + WAIT
        for future in live.futures:
            assert future.exception(timeout=max(1.0, deadline - time.monotonic())) is not None
    assert (live.storage / live.folder / "cancel.json").exists()


def test_batchpool_ui_shows_the_runs_of_examples_operate(
    browser: WebDriver, tmp_path: Path
) -> None:
    """The README's promise: `batchpool ui STORAGE` shows the run examples/operate.py made."""
    storage = tmp_path / "runs"
    example = Path(__file__).resolve().parent.parent / "examples" / "operate.py"
    made = subprocess.run(
        [sys.executable, str(example), str(storage)], capture_output=True, text=True, timeout=300
    )
    assert made.returncode == 0, made.stderr
    with ui_command(str(storage)) as command:
        browser.get(command.url)
        wait_for(browser, "tr.run-row")
        row = browser.find_element(By.CSS_SELECTOR, "tr.run-row").text
        assert "nightly" in row and "2 Failed" in row
        browser.find_element(By.CSS_SELECTOR, "tr.run-row td a").click()
        wait_for(browser, "table#jobs tr.job-row")
        calls = browser.find_element(By.CSS_SELECTOR, 'dd[data-field="calls"]').text
        assert calls == "6 Success, 2 Failed"
        assert "shard-3.txt is corrupt" in browser.find_element(By.ID, "errors").text
        keep(browser, tmp_path, "operate")
