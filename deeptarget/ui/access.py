"""Who may see the web UI: everyone, as the API's read endpoints, unless ``ui_key`` is set.

With a key, every UI page and thumbnail needs the session cookie that ``/ui/login`` sets once the key is typed
there. The cookie holds an HMAC of the key, not the key: it proves the key was known, and changing the key ends every
session. It is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it along) and Secure when
the request came over TLS. A browser without it is sent to the login page; any other client gets a 401.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import quote

from aiohttp import web

from deeptarget.api.app import key_equals
from deeptarget.core.settings import Settings

COOKIE = "deeptarget_ui"
SESSION_MESSAGE = b"deeptarget-ui-session-v1"


def session_token(settings: Settings) -> str | None:
    """What the cookie must hold, or None when the UI is open."""
    if settings.ui_key is None:
        return None
    return hmac.new(settings.ui_key.get_secret_value().encode(), SESSION_MESSAGE, hashlib.sha256).hexdigest()


def allowed(request: web.Request, settings: Settings) -> bool:
    token = session_token(settings)
    if token is None:
        return True
    return hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), token.encode())


def key_matches(given: str, settings: Settings) -> bool:
    if settings.ui_key is None:
        return True
    return key_equals(given, settings.ui_key)


def local_path(raw: str | None) -> str:
    """Where to go after logging in: a path of this site only (never ``//host`` or a URL: no open redirect)."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw or any(ord(c) < 32 for c in raw):
        return "/"
    return raw


def refusal(request: web.Request) -> web.Response:
    """A browser asking for a page goes to the login page; anything else (a thumbnail, a script) gets a 401."""
    if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
        return web.Response(status=303, headers={"Location": f"/ui/login?next={quote(request.path_qs, safe='')}"})
    return web.json_response({"error": "the web UI needs its key: log in at /ui/login", "reason": "ui_key_required"},
                             status=401)  # fmt: skip


def set_session(response: web.StreamResponse, request: web.Request, settings: Settings) -> None:
    token = session_token(settings)
    if token is not None:
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/")
