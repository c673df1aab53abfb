"""Who may use the dashboard: only someone who logged in, wherever it runs.

A loopback bind is not enough (a reverse proxy on the same host has a loopback
peer and may send no forwarding headers), so every dashboard has a token made
for this run, printed once on the terminal that started it (as Jupyter does):
`/?token=…` or the login form take it, as they take ORDERFLOW_DASHBOARD_PASSWORD
when one is set.  A login starts a session with its own row in the database
(dashboard_sessions, shared by every dashboard process); logout revokes it.
The cookie, signed with HMAC-SHA256, carries the session's id and its CSRF
token, which each POST form must echo.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

COOKIE = "orderflow_dashboard"
SESSION_TTL_S = 8 * 3600
LOGIN_FAILURES_ALLOWED = 5
LOGIN_FAILURE_WINDOW_S = 60.0
TRACKED_CLIENTS = 10_000  # failure records kept (oldest client forgotten first)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Session:
    sid: str | None  # a login's id (its row in dashboard_sessions); None: not logged in
    csrf: str
    expires: int

    @property
    def authenticated(self) -> bool:
        return self.sid is not None

    @classmethod
    def new(cls, authenticated: bool = False) -> Session:
        """A fresh session: a new CSRF token, and with `authenticated` a new login id
        (never the visitor's old one: no fixation)."""
        sid = secrets.token_urlsafe(18) if authenticated else None
        return cls(sid, secrets.token_urlsafe(24), int(time.time()) + SESSION_TTL_S)


@dataclass
class Access:
    """The dashboard's access policy, fixed at start-up."""

    run_token: str  # made for this run, printed once; logs in like the password
    password: str | None
    secret: bytes
    secure_cookies: bool = False
    # Failed logins per client address, in memory: each process counts its own.
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    @property
    def require_login(self) -> bool:
        return True  # always: see the module's docstring

    @classmethod
    def for_bind(
        cls,
        host: str,
        port: int,
        *,
        password: str | None,
        secret: str | None,
        secure_cookies: bool | None = None,
    ) -> tuple[Access, str]:
        """The policy for a server bound to host:port, and this run's login token.

        Cookies are `Secure` unless bound to loopback (a TLS proxy in front), or as
        `secure_cookies` says."""
        token = secrets.token_urlsafe(24)
        key = secret.encode() if secret else secrets.token_bytes(32)
        secure = (not is_loopback(host)) if secure_cookies is None else secure_cookies
        return cls(token, password, key, secure), token

    # ------------------------------------------------------------ sessions

    def sign(self, session: Session) -> str:
        payload = json.dumps(
            {"s": session.sid, "c": session.csrf, "e": session.expires},
            separators=(",", ":"),
        ).encode()
        body = base64.urlsafe_b64encode(payload).rstrip(b"=")
        mac = base64.urlsafe_b64encode(self._mac(body)).rstrip(b"=")
        return (body + b"." + mac).decode()

    def load(self, cookie: str | None) -> Session | None:
        """The session in a cookie, or None if it is absent, forged or expired."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 512:
            return None
        body, mac = cookie.encode().split(b".")
        try:
            given = base64.urlsafe_b64decode(mac + b"=" * (-len(mac) % 4))
            if not hmac.compare_digest(given, self._mac(body)):
                return None
            data: Any = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
            sid = data["s"]
            session = Session(str(sid) if sid else None, str(data["c"]), int(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires < time.time():
            return None
        return session

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.secret, body, hashlib.sha256).digest()

    # ------------------------------------------------------------ checks

    def password_ok(self, given: str, client: str) -> bool:
        """The password or this run's token, compared in constant time; a client past
        its failure budget is refused outright."""
        if self.locked_out(client):
            return False
        digest = hashlib.sha256(given.encode()).digest()
        ok = any(
            hmac.compare_digest(digest, hashlib.sha256(known.encode()).digest())
            for known in (self.run_token, self.password)
            if known
        )
        if not ok:
            failures = self._failures.setdefault(client, deque())
            self._failures.move_to_end(client)
            failures.append(time.monotonic())
            while len(self._failures) > TRACKED_CLIENTS:
                self._failures.popitem(last=False)
        return ok

    def locked_out(self, client: str) -> bool:
        failures = self._failures.get(client)
        if not failures:
            return False
        now = time.monotonic()
        while failures and now - failures[0] > LOGIN_FAILURE_WINDOW_S:
            failures.popleft()
        return len(failures) >= LOGIN_FAILURES_ALLOWED


def csrf_ok(session: Session | None, submitted: str | None) -> bool:
    return (
        session is not None
        and bool(submitted)
        and hmac.compare_digest(session.csrf.encode(), (submitted or "").encode())
    )
