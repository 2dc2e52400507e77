"""The labeling web app: Starlette + uvicorn, server-rendered pages, a little JavaScript.

Pages: ``/`` (sign in with a name and the token ``annotator add`` printed), ``/label``
(the current item: two responses side by side, or K to rank), ``/guidelines``.
JSON API (what the page's script, the demo and the load test call; authenticated by the
session cookie or ``Authorization: Bearer <token>``):

    POST /api/login    {"name", "token"}                      -> sets the session cookie
    GET  /api/next[?progress=1]                               -> the current item, or done
    POST /api/votes    {"vote_id", "item_id", "choice": "A" | "B" | "tie" | "cant_tell"}
                    or {"vote_id", "item_id", "ranking": [display positions, best first]}
                       + optional "strength" (1-4), "flags", "note", "time_ms"
    POST /api/undo                                            -> undoes the last vote
    GET  /api/progress

Display positions are mapped to response indices with the order stored in the
annotator's assignment, so the client never needs to know the true order. Each vote is
committed before the answer is sent; a resubmitted ``vote_id`` returns the stored vote
("duplicate": true). Bad requests get a 4xx with {"error": message}: 400 malformed, 401
not signed in / wrong token, 404 unknown item, 409 conflicting vote.

Model text is rendered by Jinja2 with autoescaping and the script never inserts HTML; a
Content-Security-Policy allows only the app's own script, so an output holding
``<script>`` is shown as text and never runs.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from fastrlhf.feedback import pages
from fastrlhf.feedback.assign import (
    AssignmentPolicy,
    get_assignment,
    next_assignment,
    progress,
    reopen,
)
from fastrlhf.feedback.store import (
    FLAGS,
    MAX_STRENGTH,
    ConflictError,
    StoreError,
    Vote,
    add_vote,
    authenticate,
    connect,
    get_item,
    undo_last_vote,
)

COOKIE = "fastrlhf_feedback"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class ServerSettings:
    db: str
    policy: AssignmentPolicy
    guidelines: str = ""  # plain text, shown escaped


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_status(e: Exception) -> int:
    if isinstance(e, ConflictError):
        return 409
    if isinstance(e, PermissionError):
        return 401
    if isinstance(e, StoreError) and str(e).startswith("unknown item"):
        return 404
    return 400


def create_app(settings: ServerSettings) -> Starlette:
    connect(settings.db).close()  # fail at start-up, not at the first request
    local = threading.local()

    def db():
        # one connection per server thread (sqlite3 connections are not shared)
        if getattr(local, "conn", None) is None:
            local.conn = connect(settings.db)
        return local.conn

    def annotator(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        token = token or request.cookies.get(COOKIE)
        if not token:
            raise ApiError(401, "not signed in: sign in at / or send 'Authorization: Bearer'")
        try:
            return authenticate(db(), token)
        except PermissionError:
            raise ApiError(401, "unknown or revoked token; sign in again") from None

    def html(body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(body, status, headers=SECURITY_HEADERS)

    def api(handler):
        """Wrap a JSON endpoint ``handler(request, body bytes)``: it runs in the thread pool
        (SQLite calls block), and its errors become 4xx {"error": message}."""

        async def endpoint(request: Request) -> Response:
            try:
                body = await request.body() if request.method == "POST" else b""
                return await run_in_threadpool(handler, request, body)
            except ApiError as e:
                return JSONResponse({"error": str(e)}, e.status, headers=SECURITY_HEADERS)
            except (StoreError, PermissionError) as e:
                return JSONResponse({"error": str(e)}, _error_status(e), headers=SECURITY_HEADERS)

        return endpoint

    def _sign_in(name: str, token: str) -> str:
        if not isinstance(name, str) or not isinstance(token, str) or not name or not token:
            raise ApiError(400, "give a name and a token")
        try:
            return authenticate(db(), token.strip(), name.strip())
        except PermissionError as e:
            raise ApiError(401, str(e)) from None

    def _with_cookie(resp: Response, token: str) -> Response:
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 86400)
        return resp

    # ------------------------------------------------------------------- pages

    def index(request: Request) -> Response:
        token = request.cookies.get(COOKIE)
        if token:
            try:
                authenticate(db(), token)
                return RedirectResponse("/label", 303)
            except PermissionError:
                pass
        return html(pages.render("login.html", error=None, name=""))

    async def login_form(request: Request) -> Response:
        form = await request.form()
        name, token = str(form.get("name", "")), str(form.get("token", ""))
        try:
            _sign_in(name, token)
        except ApiError as e:
            return html(pages.render("login.html", error=str(e), name=name), e.status)
        return _with_cookie(RedirectResponse("/label", 303), token.strip())

    def logout(request: Request) -> Response:
        resp = RedirectResponse("/", 303)
        resp.delete_cookie(COOKIE)
        return resp

    def label(request: Request) -> Response:
        try:
            name = annotator(request)
        except ApiError:
            return RedirectResponse("/", 303)
        a = next_assignment(db(), name, settings.policy)
        prog = progress(db(), name, settings.policy)
        if a is None:
            return html(pages.render("done.html", name=name, progress=prog))
        shown = [(chr(ord("A") + p), a.item.responses[r]) for p, r in enumerate(a.shown_order)]
        return html(
            pages.render(
                "label.html",
                name=name,
                item=a.item,
                shown=shown,
                kind="pair" if a.item.k == 2 else "rank",
                progress=prog,
                vote_id=secrets.token_hex(16),
                guidelines=settings.guidelines,
                flags=FLAGS,
                max_strength=MAX_STRENGTH,
            )
        )

    def guidelines(request: Request) -> Response:
        return html(pages.render("guidelines.html", guidelines=settings.guidelines))

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in pages.STATIC:
            return Response("not found", 404)
        body, media = pages.STATIC[name]
        return Response(body, media_type=media, headers=SECURITY_HEADERS)

    # ------------------------------------------------------------------- API

    def _json(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @api
    def api_login(request: Request, raw: bytes) -> Response:
        body = _json(raw)
        name = _sign_in(body.get("name"), body.get("token"))
        return _with_cookie(JSONResponse({"ok": True, "name": name}), body["token"].strip())

    @api
    def api_next(request: Request, raw: bytes) -> Response:
        name = annotator(request)
        a = next_assignment(db(), name, settings.policy)
        out = {"done": a is None}
        if a is not None:
            out.update(
                item_id=a.item.id,
                prompt=a.item.prompt,
                kind="pair" if a.item.k == 2 else "rank",
                responses=[a.item.responses[r] for r in a.shown_order],
            )
        if request.query_params.get("progress") == "1":  # costs a scan of the items
            out["progress"] = progress(db(), name, settings.policy)
        return JSONResponse(out)

    def _vote_from(body: dict, name: str) -> Vote:
        item_id = body.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise ApiError(400, "'item_id' must be a non-empty string")
        unknown = set(body) - {"vote_id", "item_id", "choice", "ranking", "strength", "flags",
                               "note", "time_ms"}  # fmt: skip
        if unknown:
            raise ApiError(400, f"unknown fields {sorted(unknown)}")
        get_item(db(), item_id)  # an unknown item is a 404, before "not assigned to you"
        a = get_assignment(db(), name, item_id)
        order = a.shown_order
        v = Vote(item_id, name, shown_order=order, origin="web")
        if ("choice" in body) == ("ranking" in body):
            raise ApiError(400, "give exactly one of 'choice' and 'ranking'")
        if "choice" in body:
            choice = body["choice"]
            if choice == "tie":
                v.tie = True
            elif choice == "cant_tell":
                v.cant_tell = True
            elif choice in ("A", "B") and a.item.k == 2:
                best = 0 if choice == "A" else 1
                v.ranking = [order[best], order[1 - best]]
            else:
                raise ApiError(400, f"'choice' must be 'A', 'B', 'tie' or 'cant_tell' "
                                    f"(A/B only for 2 responses), got {choice!r}")  # fmt: skip
        else:
            ranking = body["ranking"]
            ok = isinstance(ranking, list) and all(
                isinstance(p, int) and not isinstance(p, bool) for p in ranking
            )
            if not ok or sorted(ranking) != list(range(a.item.k)):
                raise ApiError(400, f"'ranking' must order the display positions "
                                    f"0..{a.item.k - 1} exactly once, got {ranking!r}")  # fmt: skip
            v.ranking = [order[p] for p in ranking]
        v.strength = body.get("strength")
        v.flags = body.get("flags", [])
        v.note = body.get("note") or None
        v.time_ms = body.get("time_ms")
        v.client_id = body.get("vote_id")
        return v

    @api
    def api_vote(request: Request, raw: bytes) -> Response:
        body = _json(raw)
        name = annotator(request)
        v = _vote_from(body, name)
        stored, duplicate = add_vote(db(), v)  # committed before we answer
        return JSONResponse(
            {"ok": True, "vote_id": stored.client_id, "id": stored.id, "duplicate": duplicate}
        )

    @api
    def api_undo(request: Request, raw: bytes) -> Response:
        name = annotator(request)
        undone = undo_last_vote(db(), name)
        if undone is None:
            return JSONResponse({"ok": True, "undone": None})
        reopen(db(), name, undone.item_id)
        return JSONResponse({"ok": True, "undone": undone.item_id, "vote_id": undone.client_id})

    @api
    def api_progress(request: Request, raw: bytes) -> Response:
        return JSONResponse(progress(db(), annotator(request), settings.policy))

    def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    routes = [
        Route("/", index),
        Route("/login", login_form, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/label", label),
        Route("/guidelines", guidelines),
        Route("/static/{name}", static),
        Route("/api/login", api_login, methods=["POST"]),
        Route("/api/next", api_next),
        Route("/api/votes", api_vote, methods=["POST"]),
        Route("/api/undo", api_undo, methods=["POST"]),
        Route("/api/progress", api_progress),
        Route("/healthz", healthz),
    ]
    return Starlette(routes=routes)


def read_guidelines(path: str | None) -> str:
    if path is None:
        return pages.DEFAULT_GUIDELINES
    return Path(path).read_text(encoding="utf-8")


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(settings)
    print(f"labeling app on http://{host}:{port}/ (database {settings.db})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
