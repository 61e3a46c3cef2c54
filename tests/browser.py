"""pytest plugin: headless Chromium from Debian, driven by Selenium (``ci/chromium.sh``).

Loaded from ``tests/conftest.py`` (``pytest_plugins``). The session fixture ``chromium``
runs ``ci/chromium.sh`` (installs Debian's ``chromium`` and its matching
``chromium-driver`` when missing) and returns a ``Chromium``, whose ``new()`` starts a
headless ``selenium.webdriver.Chrome``; every driver it started is quit at the session's
end. The fixture ``browser`` is one such driver for one test, quit after it, and
``screenshot(driver, path)`` saves a PNG of the whole page.

Selenium never looks for a browser or a driver itself: the ``Service`` names Debian's
chromedriver and the options name Debian's chromium, so Selenium Manager is not run (and
``SE_OFFLINE``/``SE_AVOID_STATS`` would keep it off the network if it were).

Tests using either fixture get the marker ``browser``. When ``CI`` is set Chromium must
start, or the tests fail with the script's output; elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ci" / "chromium.sh"

#: Seconds the first test that needs Chromium may take: on a fresh machine its set-up
#: installs chromium and chromium-driver with apt (about 20 s here, more on a slow mirror).
SETUP_TIMEOUT = 600

#: The tallest page ``screenshot`` saves, in CSS pixels.
MAX_SCREENSHOT_HEIGHT = 8000

#: Selenium Manager stays offline and sends no usage statistics (it is not run at all
#: when the driver's path is given, which ``Chromium.new`` always does).
SELENIUM_ENV = {"SE_AVOID_STATS": "true", "SE_OFFLINE": "true"}

__all__ = ["Chromium", "browser", "chromium", "screenshot"]

_FIXTURES = ("browser", "chromium")


def _needs_chromium(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return any(name in names for name in _FIXTURES)


@pytest.hookimpl(tryfirst=True)  # before -m selects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_chromium(item):
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: the first test that will run
def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        if _needs_chromium(item):  # the session fixture is set up in this test's set-up
            item.add_marker(pytest.mark.timeout(SETUP_TIMEOUT), append=False)
            return


def _unavailable(why: str, output: str = "") -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"headless Chromium is required when CI is set, but {why}:\n{output}")
    pytest.skip(f"no headless Chromium here: {why}")


class Chromium:
    """Starts headless Chromium drivers; ``quit_all`` ends every one still running."""

    def __init__(self, binary: str, driver: str, folder: Path, script_output: str) -> None:
        #: Debian's ``/usr/bin/chromium`` (``BATCHPOOL_CHROMIUM``).
        self.binary = binary
        #: Debian's ``/usr/bin/chromedriver`` (``BATCHPOOL_CHROMEDRIVER``).
        self.driver = driver
        #: Where each driver's profile (``--user-data-dir``) and chromedriver log go.
        self.folder = folder
        self._script_output = script_output
        self._drivers: list[Chrome] = []

    def new(self, width: int = 1400, height: int = 1000) -> Chrome:
        """A new headless Chrome with a fresh profile and a ``width`` x ``height`` window."""
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service

        profile = Path(tempfile.mkdtemp(prefix="profile-", dir=self.folder))
        log = profile.with_name(profile.name + "-chromedriver.log")
        options = webdriver.ChromeOptions()
        options.binary_location = self.binary
        for arg in (
            "--headless=new",
            "--no-sandbox",  # we run as root: Chromium's sandbox refuses to start as root
            "--disable-gpu",
            "--disable-dev-shm-usage",  # /dev/shm of a container may be 64 MB only
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--no-first-run",
            "--no-default-browser-check",
        ):
            options.add_argument(arg)
        service = Service(
            executable_path=self.driver,
            log_output=str(log),
            env={**os.environ, **SELENIUM_ENV},
        )
        try:
            driver = webdriver.Chrome(service=service, options=options)
        except WebDriverException as err:
            text = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            _unavailable(
                f"Chromium did not start: {err.msg or err}",
                f"{self._script_output}\nchromedriver log ({log}):\n{text}",
            )
        driver.set_window_size(width, height)
        self._drivers.append(driver)
        return driver

    def quit(self, driver: Chrome) -> None:
        """Quit ``driver`` (once; quitting one already gone is not an error)."""
        if driver in self._drivers:
            self._drivers.remove(driver)
        try:
            driver.quit()
        except Exception:  # a browser that died already counts as quit
            pass

    def quit_all(self) -> None:
        for driver in list(self._drivers):
            self.quit(driver)


def screenshot(driver: Chrome, path: str | os.PathLike[str]) -> Path:
    """Save a PNG of the whole page at ``path`` (the window's page area is made as tall as
    the page, at most ``MAX_SCREENSHOT_HEIGHT`` pixels, first) and return its path."""
    page, frame = driver.execute_script(
        "return [Math.max(document.body ? document.body.scrollHeight : 0,"
        " document.documentElement.scrollHeight), window.outerHeight - window.innerHeight];"
    )
    height = max(1, min(int(page or 1), MAX_SCREENSHOT_HEIGHT))
    # set_window_size sizes the outer window: headless Chromium's still has a frame
    # (about 140 px here) above the page, which the page's height must not lose
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, height + max(0, int(frame or 0)))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(target)):
        raise OSError(f"Chromium saved no screenshot at {target}")
    return target


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("the selenium package (the [test] extra) is not installed")
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT)],
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        _unavailable(f"`bash ci/chromium.sh` took more than {err.timeout} s", str(err.stderr))
    output = f"{proc.stdout}{proc.stderr}"
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export ") :].partition("=")
            env[name] = value
    binary = env.get("BATCHPOOL_CHROMIUM", "")
    driver = env.get("BATCHPOOL_CHROMEDRIVER", "")
    if proc.returncode != 0 or not binary or not driver:
        _unavailable(f"`bash ci/chromium.sh` exited with status {proc.returncode}", output)
    folder = tmp_path_factory.mktemp("chromium")
    browsers = Chromium(binary, driver, folder, output)
    try:
        yield browsers
    finally:
        browsers.quit_all()
        shutil.rmtree(folder, ignore_errors=True)  # the profiles: tens of MB each


@pytest.fixture
def browser(chromium: Chromium) -> Iterator[Chrome]:
    """One headless Chrome (1400 x 1000) for this test, quit after it."""
    driver = chromium.new()
    try:
        yield driver
    finally:
        chromium.quit(driver)
