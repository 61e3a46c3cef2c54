"""Time to first paint of the web page for a run of 100,000 calls in 10,000 jobs.

Run from the repository root (needs the ``ui`` and ``test`` extras and headless Chromium,
which ``bash ci/chromium.sh`` installs)::

    python benchmarks/bench_ui.py                  # makes the run once, in /tmp/bench-ui
    python benchmarks/bench_ui.py --calls 100000 --chunksize 10 --repeat 3

The run is made by ``BatchPoolExecutor.map`` on the local backend and kept. Then, side
by side on the same store:

- ``batchpool status RUN --json`` (the terminal's view of the same run: it reads every
  marker), as the reference;
- the run page in headless Chromium, first-contentful-paint from the browser's own
  ``performance`` entries: **cold** (a new server: the page reads the store) and
  **warm** (the same server within its few seconds of cache);
- page 50 of the jobs table (rows 4,901-5,000), warm;
- the runs page, cold.

Each is measured ``--repeat`` times; the best is reported with its ratio to
``batchpool status``. A script, not a test: it checks what it loads, never asserts times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from batchpool import BatchPoolExecutor
from batchpool.ui import UIServer

CHROMIUM = os.environ.get("BATCHPOOL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BATCHPOOL_CHROMEDRIVER", "/usr/bin/chromedriver")


def make_run(storage: Path, calls: int, chunksize: int) -> str:
    name = f"bench-{calls}-{chunksize}"
    existing = sorted(storage.glob(f"{name}-*"))
    if existing:
        return existing[-1].name
    started = time.perf_counter()
    with BatchPoolExecutor(name=name, storage=str(storage), cleanup_bucket=False) as bpe:
        total = sum(bpe.map(abs, range(calls), chunksize=chunksize))
        folder = bpe.run_url.rsplit("/", 1)[-1]
    assert total == calls * (calls - 1) // 2
    print(
        f"made {folder}: {calls:,} calls in {calls // chunksize:,} jobs, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return folder


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tempfile.mkdtemp(prefix='bench-ui-')}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def first_paint(driver: webdriver.Chrome, url: str, expect: str) -> float:
    """Seconds from navigation start to first-contentful-paint of ``url``."""
    driver.get(url)
    driver.find_element(By.CSS_SELECTOR, expect)
    for _ in range(100):
        fcp = driver.execute_script(
            "const e = performance.getEntriesByName('first-contentful-paint');"
            "return e.length ? e[0].startTime : null;"
        )
        if fcp is not None:
            return float(fcp) / 1000
        time.sleep(0.05)
    raise RuntimeError(f"{url}: no first-contentful-paint entry")


def best(repeat: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--chunksize", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--storage", default="/tmp/bench-ui")
    args = parser.parse_args()
    storage = Path(args.storage)
    folder = make_run(storage, args.calls, args.chunksize)

    def status() -> float:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "batchpool", "status", str(storage / folder), "--json"],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started

    driver = browser()
    try:

        def cold(path: str, expect: str) -> Callable[[], float]:
            def measure() -> float:
                with UIServer(str(storage)) as server:
                    # The token's cookie first, from a page that reads no run (a 404).
                    driver.get(server.url_for("/runs/-"))
                    return first_paint(driver, server.base_url + path, expect)

            return measure

        results = {"batchpool status --json (reads the whole run)": best(args.repeat, status)}
        results["run page, cold (a new server reads the store)"] = best(
            args.repeat, cold(f"/runs/{folder}", "tr.job-row")
        )
        with UIServer(str(storage)) as server:
            driver.get(server.url)
            first_paint(driver, server.base_url + f"/runs/{folder}", "tr.job-row")
            results["run page, warm (cached)"] = best(
                args.repeat,
                lambda: first_paint(driver, server.base_url + f"/runs/{folder}", "tr.job-row"),
            )
            results["jobs table page 50, warm"] = best(
                args.repeat,
                lambda: first_paint(
                    driver, server.base_url + f"/runs/{folder}?page=50", "tr.job-row"
                ),
            )
        results["runs page, cold"] = best(args.repeat, cold("/", "tr.run-row"))
    finally:
        driver.quit()
    reference = next(iter(results.values()))
    print(f"\n{args.calls:,} calls in {args.calls // args.chunksize:,} jobs, best of {args.repeat}")
    print(f"{'':52} {'seconds':>8} {'vs status':>10}")
    for what, seconds in results.items():
        print(f"{what:52} {seconds:8.3f} {seconds / reference:9.2f}x")


if __name__ == "__main__":
    main()
