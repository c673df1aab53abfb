"""What a provider call came to, and how long to wait before the next try."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from statemachine.definition import RetryPolicy


class Kind(StrEnum):
    SUCCESS = "success"
    PERMANENT = "permanent"  # a definite no (a declined card, a 4xx): do not retry
    TRANSIENT = "transient"  # a definite "not done" (5xx, refused): retry
    # 429: "not now", not "no": retry after the provider's Retry-After without
    # using up an attempt, so a rate-limit storm delays orders but fails none.
    THROTTLED = "throttled"
    UNKNOWN = "unknown"  # sent, no answer: it may have happened; replay the same key


@dataclass(frozen=True)
class StepOutcome:
    kind: Kind
    facts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    retry_after_s: float | None = None

    @classmethod
    def success(cls, **facts: Any) -> StepOutcome:
        return cls(Kind.SUCCESS, facts)

    @classmethod
    def permanent(cls, error: str, **facts: Any) -> StepOutcome:
        return cls(Kind.PERMANENT, facts, error)

    @classmethod
    def transient(cls, error: str, retry_after_s: float | None = None) -> StepOutcome:
        return cls(Kind.TRANSIENT, {}, error, retry_after_s)

    @classmethod
    def throttled(cls, retry_after_s: float | None = None) -> StepOutcome:
        return cls(Kind.THROTTLED, {}, "rate limited", retry_after_s)

    @classmethod
    def unknown(cls, error: str) -> StepOutcome:
        return cls(Kind.UNKNOWN, {}, error)


def backoff_s(policy: RetryPolicy, attempt: int, scale: float = 1.0, rng: Any = random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2^(attempt-1)))."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2 ** max(attempt - 1, 0))
    return float(rng.uniform(0, ceiling)) * scale
