"""The web page of a storage's runs: ``batchpool ui STORAGE``, or ``bpe.ui()`` in a script.

Needs the ``ui`` extra (``pip install 'batchpool[ui]'``: Flask). ``UIServer`` serves the
pages (``app.py``) of what ``views.py`` reads from the store, from a thread of this
process, on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import ipaddress
import secrets
import threading
from typing import Any

from batchpool.store import Store, open_storage

__all__ = ["LOOPBACK", "UIServer"]

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unset_app(environ: Any, start_response: Any) -> list[bytes]:
    raise RuntimeError("the web page's application is set once the port is known")


class UIServer:
    """A web server for the runs of ``storage``, started by ``start`` in a daemon thread.

    ``url`` (after ``start``) carries the server's token: whoever opens it may see the
    runs' logs and cancel or delete runs. ``host`` other than a loopback address needs
    ``allow_remote=True``: the page is then reachable from other machines, guarded by the
    token alone, over plain HTTP."""

    def __init__(
        self,
        storage: Any,
        storage_options: dict[str, Any] | None = None,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        allow_remote: bool = False,
        backend_options: dict[str, Any] | None = None,
    ) -> None:
        try:
            from werkzeug.serving import WSGIRequestHandler, make_server

            from batchpool.ui import app as app_module
            from batchpool.ui import views
        except ImportError as exc:
            raise ImportError(
                f"the web page needs Flask ({exc}); install it with: pip install 'batchpool[ui]'"
            ) from exc
        if not is_loopback(host) and not allow_remote:
            raise ValueError(
                f"host={host!r} is not a loopback address: the page (logs, Cancel, Delete) "
                "would be reachable from other machines; pass allow_remote=True "
                "(`batchpool ui --allow-remote`) if that is meant"
            )
        from batchpool import cli  # the command's helpers (views.py reads runs with them)

        fs, root = open_storage(storage, storage_options)
        self.storage = views.Storage(Store(fs, root.rstrip("/"), retry_deadline=cli.RETRY_DEADLINE))
        self.token = secrets.token_urlsafe(24)
        self.host = host

        # The port is known once bound (port=0 picks a free one); the app needs it.
        class Quiet(WSGIRequestHandler):
            """No access log on stderr (a notebook's output, a script's): errors only."""

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                pass

        self._server = make_server(host, port, _unset_app, threaded=True, request_handler=Quiet)
        self.port = int(self._server.server_port)
        loopback = is_loopback(host)
        hosts = {f"{host}:{self.port}", f"localhost:{self.port}", f"127.0.0.1:{self.port}"}
        self._server.app = app_module.make_app(
            self.storage,
            self.token,
            cookie_name=f"batchpool_ui_{self.port}",  # cookies are per host, not per port
            allowed_hosts=frozenset(hosts) if loopback else None,
            backend_options=backend_options,
        )
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The runs page, with the token."""
        return self.url_for("/")

    def url_for(self, path: str) -> str:
        return f"{self.base_url}{path}?token={self.token}"

    def run_url(self, folder: str) -> str:
        """The page of the run in ``folder`` (a folder name the storage lists), with the token."""
        return self.url_for(f"/runs/{folder}")

    def start(self) -> UIServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="batchpool-ui", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C)."""
        self._server.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> UIServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
