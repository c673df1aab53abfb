"""Who may use the dashboard: loopback without a login, anywhere else with one.

Sessions live in a cookie signed with HMAC-SHA256 (nothing server-side, so
several dashboard processes share sessions if they share the secret).  Every
session, logged in or not, carries a CSRF token that each POST form must echo.
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
# Headers a reverse proxy adds: without a login the dashboard must be reached directly.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


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
    authenticated: bool
    csrf: str
    expires: int

    @classmethod
    def new(cls, authenticated: bool = False) -> Session:
        return cls(authenticated, secrets.token_urlsafe(24), int(time.time()) + SESSION_TTL_S)


@dataclass
class Access:
    """The dashboard's access policy, fixed at start-up."""

    require_login: bool
    password: str | None
    secret: bytes
    secure_cookies: bool = False
    # Host headers accepted without a login (loopback only: a DNS-rebinding
    # page on another origin cannot reach the dashboard through the browser).
    loopback_hosts: frozenset[str] = frozenset()
    # Failed logins per client address, in memory: each process counts its own.
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    @classmethod
    def for_bind(
        cls,
        host: str,
        port: int,
        *,
        password: str | None,
        secret: str | None,
        secure_cookies: bool = False,
    ) -> tuple[Access, str | None]:
        """The policy for a server bound to host:port, and a generated admin token if any.

        A configured password always requires a login.  Off loopback without
        one, a random admin token is generated (there are no default
        credentials) and the caller prints it once.
        """
        generated: str | None = None
        if password:
            require = True
        elif is_loopback(host):
            require = False
        else:
            password = generated = secrets.token_urlsafe(24)
            require = True
        names = {"127.0.0.1", "localhost", "[::1]"}
        hosts = frozenset({f"{n}:{port}" for n in names} | names)
        key = secret.encode() if secret else secrets.token_bytes(32)
        return cls(require, password, key, secure_cookies, hosts), generated

    # ------------------------------------------------------------ sessions

    def sign(self, session: Session) -> str:
        payload = json.dumps(
            {"a": session.authenticated, "c": session.csrf, "e": session.expires},
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
            session = Session(bool(data["a"]), str(data["c"]), int(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires < time.time():
            return None
        return session

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.secret, body, hashlib.sha256).digest()

    # ------------------------------------------------------------ checks

    def allowed(self, session: Session | None) -> bool:
        return not self.require_login or (session is not None and session.authenticated)

    def host_ok(self, host_header: str | None, headers: dict[str, str] | None = None) -> bool:
        """Without a login only direct loopback requests are served; with one, any.

        A loopback Host header shuts out DNS-rebinding pages; a proxy's headers
        mean the request came from elsewhere, which needs a login.
        """
        if self.require_login:
            return True
        if headers and any(h in headers for h in PROXY_HEADERS):
            return False
        return (host_header or "").lower() in self.loopback_hosts

    def password_ok(self, given: str, client: str) -> bool:
        """Constant-time comparison; a client past its failure budget is refused outright."""
        if self.locked_out(client) or self.password is None:
            return False
        ok = hmac.compare_digest(
            hashlib.sha256(given.encode()).digest(), hashlib.sha256(self.password.encode()).digest()
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
