"""Bearer tokens: HS256 JWTs with exp, sub (a UUID) and aud.

Customers' tokens (the storefront mints them) and operators' tokens are signed
with different keys and carry different audiences: whoever can mint storefront
tokens cannot mint an operator's, whatever claims they put in it.  A `role`
claim grants nothing by itself.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import jwt

# Fixed here, never read from the token: `alg: none` and algorithm confusion fail.
ALGORITHMS = ["HS256"]


class Unauthorized(Exception):
    pass


@dataclass(frozen=True)
class Principal:
    user_id: uuid.UUID
    is_admin: bool
    scopes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TokenKey:
    """How one kind of token is verified (and minted)."""

    secret: str
    audience: str
    issuer: str | None = None
    leeway_s: int = 30


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing bearer token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected 'Authorization: Bearer <token>'")
    return token.strip()


def verify(authorization: str | None, key: TokenKey, *, admin: bool = False) -> Principal:
    """The principal of a valid token of this key; Unauthorized otherwise."""
    token = _bearer(authorization)
    required = ["exp", "sub", "aud"] + (["iss"] if key.issuer else [])
    try:
        claims = jwt.decode(
            token,
            key.secret,
            algorithms=ALGORITHMS,
            audience=key.audience,
            issuer=key.issuer,
            leeway=key.leeway_s,
            options={"require": required},
        )
        user_id = uuid.UUID(str(claims["sub"]))
    except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
        raise Unauthorized("invalid or expired token") from exc
    scopes = frozenset(str(claims.get("scope", "")).split())
    return Principal(user_id=user_id, is_admin=admin, scopes=scopes)


def authenticate(
    authorization: str | None, *, secret: str, audience: str, issuer: str | None = None,
    leeway_s: int = 30,
) -> Principal:  # fmt: skip
    """A customer's token."""
    return verify(authorization, TokenKey(secret, audience, issuer, leeway_s))


def mint_token(
    user_id: uuid.UUID,
    *,
    secret: str,
    audience: str,
    admin: bool = False,
    ttl_s: int = 3600,
    issuer: str | None = None,
    scope: str | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": str(user_id),
        "aud": audience,
        "iat": now,
        "exp": now + ttl_s,
    }
    if issuer:
        claims["iss"] = issuer
    if admin:
        claims["role"] = "admin"  # informative: the admin key and audience are what count
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm=ALGORITHMS[0])
