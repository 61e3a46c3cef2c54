"""The browser fixtures of tests/browser.py, for real: headless Chromium from Debian."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest
from browser import screenshot

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>batchpool browser test</title></head>
<body style="margin:0">
<h1 id="title">served</h1>
<div style="height:1800px;background:linear-gradient(#fff,#36c)">tall</div>
</body></html>
"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def page_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_reads_a_data_url(browser: Chrome) -> None:
    from selenium.webdriver.common.by import By

    browser.get("data:text/html," + quote("<h1>Hello, batchpool</h1><p>a paragraph</p>"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Hello, batchpool"


def test_script_and_screenshot_of_a_served_page(
    browser: Chrome, page_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    assert browser.title == "batchpool browser test"
    browser.execute_script("document.getElementById('title').textContent = 'scripted';")
    assert browser.find_element(By.ID, "title").text == "scripted"
    assert browser.execute_script("return document.body.scrollHeight;") > 1800

    path = screenshot(browser, tmp_path / "shots" / "page.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5000
    # the whole page: the window was made as tall as the page
    height = int.from_bytes(data[20:24], "big")  # IHDR height
    assert height >= browser.execute_script("return document.body.scrollHeight;")
