"""The web page's routes (Flask): runs, a run, a job, their JSON, and two actions.

Safety, as the README's "Web page" section states it:

- Every request but the package's own static files needs the server's token: in the
  URL ``batchpool ui`` printed (``?token=``, then kept in a cookie and dropped from the
  address), in that cookie, or in the ``X-BatchPool-Token`` header.
- Cancel and Delete are POST only, carry the token in the form too, and are refused
  when the browser says the request comes from another site (``Origin``,
  ``Sec-Fetch-Site``); the cookie is ``SameSite=Strict``.
- On a loopback address the Host header must name it (no DNS rebinding).
- Templates escape everything (Jinja2's autoescape); the content security policy
  allows only the package's own script and style, so text a job printed never runs.
- Runs are looked up among the folders the storage lists, and jobs among the chunk
  ids a run holds (``views.py``): nothing of a request is used as a path.
- Any error is a page (or JSON) that says what could not be read, never a traceback.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from flask import Flask, Response, abort, jsonify, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from batchpool import cli
from batchpool.runs import format_bytes, format_cost
from batchpool.store import StorageError
from batchpool.ui import views

HERE = Path(__file__).resolve().parent
TOKEN_HEADER = "X-BatchPool-Token"
#: Content security policy: the package's script and style only; no frames, no forms
#: that post elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: How many action results (notices) are kept for the page they redirect to.
MAX_NOTICES = 100


def make_app(
    storage: views.Storage,
    token: str,
    *,
    cookie_name: str = "batchpool_ui",
    allowed_hosts: frozenset[str] | None = None,
    backend_options: dict[str, Any] | None = None,
) -> Flask:
    """The application serving ``storage``'s runs to whoever holds ``token``.

    ``allowed_hosts``: the Host headers accepted (None: any, for a server bound to a
    public address, where the token alone guards it)."""
    app = Flask(
        "batchpool.ui",
        template_folder=str(HERE / "templates"),
        static_folder=str(HERE / "static"),
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    notices: OrderedDict[str, tuple[str, str]] = OrderedDict()
    options = dict(backend_options or {})

    def notice(kind: str, text: str) -> str:
        key = secrets.token_hex(8)
        notices[key] = (kind, text)
        while len(notices) > MAX_NOTICES:
            notices.popitem(last=False)
        return key

    def given_token() -> str:
        return (
            request.headers.get(TOKEN_HEADER)
            or request.cookies.get(cookie_name)
            or request.args.get("token")
            or ""
        )

    def token_ok(value: str) -> bool:
        return hmac.compare_digest(value.encode(), token.encode())

    @app.before_request
    def guard() -> BaseResponse | None:
        if allowed_hosts is not None and request.host not in allowed_hosts:
            return error_response(
                400,
                f"this server answers to {', '.join(sorted(allowed_hosts))}, not to the host "
                f"{request.host!r}: open the URL `batchpool ui` printed",
            )
        if request.endpoint == "static":
            return None
        query_token = request.args.get("token")
        if query_token is not None and request.method == "GET" and token_ok(query_token):
            # Keep it in a cookie and drop it from the address bar and the history.
            args = {k: v for k, v in request.args.items() if k != "token"}
            target = request.path + (f"?{urlencode(args)}" if args else "")
            response = redirect(target, code=303)
            response.set_cookie(cookie_name, token, httponly=True, samesite="Strict")
            return response
        if not token_ok(given_token()):
            return error_response(
                403,
                "this page needs the token of the server: open the URL `batchpool ui` "
                "printed (it ends in ?token=...)",
            )
        if request.method == "POST":
            why = cross_site_reason()
            if why:
                return error_response(403, f"refused: {why}")
            if not token_ok(request.form.get("token", "")):
                return error_response(
                    403, "refused: the form carries no token of this server; reload the page"
                )
        return None

    def cross_site_reason() -> str | None:
        origin = request.headers.get("Origin")
        own = f"{request.scheme}://{request.host}"
        if origin is not None and origin != own:
            return f"the request comes from {origin}, not from this page ({own})"
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"the browser says the request is {site} (Sec-Fetch-Site), not same-origin"
        return None

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on the
        # page's own form posts, which the same-origin check must refuse.
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        if request.endpoint != "static":
            response.headers["Cache-Control"] = "no-store"
        return response

    def wants_json() -> bool:
        return request.path.startswith("/api/")

    def error_response(status: int, message: str) -> Response:
        if wants_json():
            response = jsonify({"error": message, "status": status})
        else:
            response = Response(
                render_template("error.html", status=status, message=message, token=token)
            )
        response.status_code = status
        return response

    @app.errorhandler(views.NotFound)
    def not_found(exc: views.NotFound) -> Response:
        return error_response(404, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return error_response(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def failed(exc: Exception) -> Response:
        if isinstance(exc, (OSError, StorageError)):
            return error_response(
                503, f"could not read the store {storage.root.url}: {type(exc).__name__}: {exc}"
            )
        if isinstance(exc, cli.CommandError):
            return error_response(409, str(exc))
        return error_response(500, f"{type(exc).__name__}: {exc}")

    @app.template_filter("money")
    def money(value: float | None) -> str:
        """A cost as ``Usage`` prints it, or ``-``."""
        return "-" if value is None else format_cost(value)

    @app.context_processor
    def common() -> dict[str, Any]:
        key = request.args.get("notice", "")
        return {
            "token": token,
            "storage_url": storage.root.url,
            "notice": notices.get(key),
            "format_bytes": format_bytes,
        }

    def fragment() -> bool:
        return request.args.get("fragment") == "1"

    # -- pages and their JSON -------------------------------------------------------------

    @app.get("/")
    def runs() -> str:
        page = views.runs_page(storage)
        return render_template("runs.html", page=page, fragment=fragment())

    @app.get("/api/runs")
    def runs_json() -> Response:
        return jsonify(views.runs_page(storage))

    def state_arg() -> str | None:
        state = request.args.get("state") or None
        if state is not None and state not in views.JOB_STATES:
            abort(400, f"state={state!r} is not a job state; use one of {views.JOB_STATES}")
        return state

    def page_arg() -> int:
        text = request.args.get("page", "1")
        if not text.isdigit():
            abort(400, f"page={text!r} is not a page number")
        return int(text)

    @app.get("/runs/<folder>")
    def run(folder: str) -> str:
        page = views.run_page(storage, folder, state_arg(), page_arg())
        return render_template("run.html", page=page, fragment=fragment())

    @app.get("/api/runs/<folder>")
    def run_json(folder: str) -> Response:
        return jsonify(views.run_page(storage, folder, state_arg(), page_arg()))

    @app.get("/api/runs/<folder>/timeline")
    def timeline_json(folder: str) -> Response:
        return jsonify(views.timeline(storage, folder))

    @app.get("/runs/<folder>/jobs/<chunk>")
    def job(folder: str, chunk: str) -> str:
        page = views.job_page(storage, folder, chunk)
        return render_template("job.html", page=page, fragment=fragment())

    @app.get("/api/runs/<folder>/jobs/<chunk>")
    def job_json(folder: str, chunk: str) -> Response:
        return jsonify(views.job_page(storage, folder, chunk))

    # -- actions ----------------------------------------------------------------------------

    @app.get("/runs/<folder>/<action>")
    def confirm(folder: str, action: str) -> str:
        if action not in ("cancel", "delete"):
            abort(404, f"no page {action!r} for run {folder!r}")
        page = views.run_page(storage, folder)
        return render_template("confirm.html", page=page, action=action)

    @app.post("/runs/<folder>/cancel")
    def cancel(folder: str) -> BaseResponse:
        loaded = storage.load(folder)
        done = cli.cancel_run(loaded.run.store, options)
        storage.forget(folder)
        active = done["active"]
        if not active:
            text = "nothing to cancel: every job had ended"
        else:
            parts = [f"cancel requested (cancel.json written): {len(active)} job(s) were live"]
            if done["cancelled_job_ids"]:
                parts.append(f"cancelled on {done['backend']}: {len(done['cancelled_job_ids'])}")
            if done["signalled"]:
                parts.append(f"SIGTERM sent to {len(done['signalled'])} worker(s)")
            for skip in done["skipped"][:5]:
                parts.append(f"did not stop {skip['chunk']}: {skip['why']}")
            if done["left_to_client"]:
                parts.append(f"{len(done['left_to_client'])} not yet running: left to the client")
            text = "; ".join(parts)
        key = notice("ok" if active else "warn", text)
        return redirect(url_for("run", folder=folder, notice=key), code=303)

    @app.post("/runs/<folder>/delete")
    def delete(folder: str) -> BaseResponse:
        loaded = storage.load(folder)
        run = loaded.run
        why = cli.not_a_run(run)
        if why is not None:
            key = notice("error", f"{folder} was left alone: {why}")
            return redirect(url_for("run", folder=folder, notice=key), code=303)
        force = request.form.get("force") == "yes"
        plan = cli.plan_clean([run], force, options)
        if plan.skipped:
            reason = plan.skipped[0][1].replace("; --force deletes it anyway", "")
            key = notice(
                "warn",
                f"not deleted: {reason}. Tick \u201cdelete it although it is running\u201d "
                "to delete it anyway",
            )
            return redirect(url_for("run", folder=folder, notice=key), code=303)
        cli.delete_runs(plan)
        storage.forget(folder)
        if plan.failed:
            key = notice("error", f"could not delete {folder}: {plan.failed[0][1]}")
            return redirect(url_for("run", folder=folder, notice=key), code=303)
        key = notice("ok", f"deleted run {folder} ({format_bytes(run.size_bytes)} freed)")
        return redirect(url_for("runs", notice=key), code=303)

    return app
