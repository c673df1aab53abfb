"""Bearer tokens: HS256 JWTs with exp, sub (the user's UUID) and aud."""

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


def authenticate(authorization: str | None, *, secret: str, audience: str) -> Principal:
    if not authorization:
        raise Unauthorized("missing bearer token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected 'Authorization: Bearer <token>'")
    try:
        claims = jwt.decode(
            token.strip(),
            secret,
            algorithms=ALGORITHMS,
            audience=audience,
            options={"require": ["exp", "sub", "aud"]},
        )
        user_id = uuid.UUID(str(claims["sub"]))
    except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
        raise Unauthorized("invalid or expired token") from exc
    return Principal(user_id=user_id, is_admin=claims.get("role") == "admin")


def mint_token(
    user_id: uuid.UUID, *, secret: str, audience: str, admin: bool = False, ttl_s: int = 3600
) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": str(user_id),
        "aud": audience,
        "iat": now,
        "exp": now + ttl_s,
    }
    if admin:
        claims["role"] = "admin"
    return jwt.encode(claims, secret, algorithm=ALGORITHMS[0])
