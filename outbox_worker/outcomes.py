"""What a step came to, and the retry decision (a pure function, as procrastinate's
RetryStrategy): given the policy, what earlier attempts came to and this one's
outcome, retry when, fail for good, or hand the row to an operator."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from orderflow.statemachine.definition import RetryPolicy


class Kind(StrEnum):
    DONE = "done"  # finished: fire `event` (if any) with what it learned
    FAILED = "failed"  # a definite no (a declined card, a refused parcel): the error edge
    WAIT = "wait"  # the provider is still working (3-D Secure, a pending refund): poll later
    TRANSIENT = "transient"  # definitely not done (never sent, or proven absent): retry
    # 429: "not now", not "no": retry after Retry-After without using up an attempt,
    # so a rate-limit storm delays orders but fails none.
    THROTTLED = "throttled"
    UNKNOWN = "unknown"  # it may have happened: find out, never compensate on it
    OPERATOR = "operator"  # only a person can settle it (a refund refused, a bad key)


@dataclass(frozen=True)
class StepOutcome:
    kind: Kind
    # The state-machine event to fire; None with DONE: finish the row silently.
    event: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # what to record
    memory: dict[str, Any] = field(default_factory=dict)  # merged into the row's payload
    error: str | None = None
    retry_after_s: float | None = None
    # A report that nothing happened, from a step whose order moved on: if the
    # order cannot take the event, the row simply ends.
    quiet: bool = False
    # DONE without any event (a poll whose order moved on); otherwise DONE
    # without `event` fires the step's on_success.
    silent: bool = False
    # UNKNOWN because the answer could not be read (not an outage): counted
    # against the policy's max_unreadable.
    unreadable: bool = False
    # This attempt proved what the earlier, unknown ones did (nothing: the
    # provider holds no such effect), so the row is settled again.  Without it a
    # row whose outcome was unknown stays unknown, whatever this attempt met (a
    # 429 on the lookup proves nothing).
    proven: bool = False
    # The row waited without asking the provider anything (its order is with an
    # operator): what earlier attempts left unknown stays unknown.
    asked: bool = True

    @classmethod
    def done(cls, event: str | None = None, **facts: Any) -> StepOutcome:
        return cls(Kind.DONE, event, facts)

    @classmethod
    def failed(cls, error: str, **facts: Any) -> StepOutcome:
        return cls(Kind.FAILED, None, facts, error=error)

    @classmethod
    def wait(cls, event: str | None = None, **facts: Any) -> StepOutcome:
        return cls(Kind.WAIT, event, facts)

    @classmethod
    def transient(cls, error: str, **memory: Any) -> StepOutcome:
        return cls(Kind.TRANSIENT, memory=memory, error=error)

    @classmethod
    def proven_absent(cls, error: str, **memory: Any) -> StepOutcome:
        """The provider answered and holds no effect of the earlier calls: retry
        (with the new key in `memory`), the row no longer unknown."""
        return cls(Kind.TRANSIENT, memory=memory, error=error, proven=True)

    @classmethod
    def throttled(cls, retry_after_s: float | None = None) -> StepOutcome:
        return cls(Kind.THROTTLED, error="rate limited", retry_after_s=retry_after_s)

    @classmethod
    def unknown(cls, error: str, **memory: Any) -> StepOutcome:
        return cls(Kind.UNKNOWN, memory=memory, error=error)

    @classmethod
    def operator(cls, error: str) -> StepOutcome:
        return cls(Kind.OPERATOR, error=error)

    def remember(self, **memory: Any) -> StepOutcome:
        return dataclasses.replace(self, memory={**self.memory, **memory})


@dataclass(frozen=True)
class AttemptHistory:
    """What the row's earlier attempts came to (counters kept in its payload)."""

    not_done: int = 0  # definite failures
    unknowns: int = 0  # outcomes that left the truth unknown (an outage: no limit)
    unreadable: int = 0  # answers we could not read (lost attempts included)
    throttles: int = 0
    polls: int = 0
    crashes: int = 0  # the step raised: a bug or an answer we could not read
    # When the oldest idempotency key still in use was first sent (epoch s): the
    # provider forgets it after its window, and a replay then acts anew.
    key_sent_at: float | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any], lost: int = 0) -> AttemptHistory:
        sent = [float(v) for v in (payload.get("sent_at") or {}).values() if v is not None]
        return cls(
            not_done=int(payload.get("not_done", 0)),
            unknowns=int(payload.get("unknowns", 0)),
            unreadable=int(payload.get("unreadable", 0)) + lost,
            throttles=int(payload.get("throttled", 0)),
            polls=int(payload.get("polls", 0)),
            crashes=int(payload.get("crashes", 0)),
            key_sent_at=min(sent) if sent else None,
        )


class Action(StrEnum):
    RETRY = "retry"
    FAIL = "fail"  # take the step's failure edge (or dead-letter if it has none)
    DEAD_LETTER = "dead_letter"  # to an operator: never compensate on this


@dataclass(frozen=True)
class RetryDecision:
    action: Action
    delay_s: float = 0.0
    give_back_attempt: bool = False  # a throttle or a poll is not an attempt
    counters: dict[str, int] = field(default_factory=dict)  # the payload's new counters


def _counters(history: AttemptHistory) -> dict[str, int]:
    return {
        "not_done": history.not_done,
        "unknowns": history.unknowns,
        "unreadable": history.unreadable,
        "throttled": history.throttles,
        "polls": history.polls,
        "crashes": history.crashes,
    }


def backoff_s(policy: RetryPolicy, attempt: int, scale: float = 1.0, rng: Any = random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2^(attempt-1)))."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2 ** max(attempt - 1, 0))
    return float(rng.uniform(0, ceiling)) * scale


def decide_retry(
    policy: RetryPolicy,
    history: AttemptHistory,
    outcome: StepOutcome,
    now: float,
    *,
    key_window_s: float | None = None,
    scale: float = 1.0,
    rng: Any = random,
) -> RetryDecision:
    """The retry decision for an outcome that is not final: TRANSIENT (definitely
    not done: retried up to max_attempts, then the step fails), THROTTLED (not an
    attempt), WAIT (a poll, not an attempt), UNKNOWN (never failed: an outage is
    asked about for as long as it lasts; answers we cannot read, up to
    max_unreadable, then an operator).  An unknown outcome is replayed before its
    key's window ends (`key_window_s` after `history.key_sent_at`), while the
    provider still answers the replay with the first call's result.  Pure: `now`
    is given, `rng` draws the jitter."""
    kind, unreadable, retry_after_s = outcome.kind, outcome.unreadable, outcome.retry_after_s
    counters = _counters(history)
    if kind == Kind.TRANSIENT:
        counters["not_done"] += 1
        if counters["not_done"] >= policy.max_attempts:
            return RetryDecision(Action.FAIL, counters=counters)
        tries = counters["not_done"] + counters["throttled"]
    elif kind == Kind.THROTTLED:
        counters["throttled"] += 1
        tries = counters["not_done"] + counters["throttled"]
    elif kind == Kind.WAIT:
        counters["polls"] += 1
        tries = counters["polls"]
    elif kind == Kind.UNKNOWN and unreadable:
        counters["unreadable"] += 1
        if counters["unreadable"] >= policy.max_unreadable:
            return RetryDecision(Action.DEAD_LETTER, counters=counters)
        tries = counters["unreadable"] + counters["unknowns"]
    elif kind == Kind.UNKNOWN:
        # An outage: asked about for as long as it lasts, backing off to the cap.
        counters["unknowns"] += 1
        tries = counters["unknowns"] + counters["unreadable"] + counters["throttled"]
    else:
        raise ValueError(f"not a retryable outcome: {kind}")
    delay = backoff_s(policy, tries, scale, rng)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    if kind == Kind.UNKNOWN and key_window_s is not None and history.key_sent_at is not None:
        left = history.key_sent_at + key_window_s - now
        if left > 0:
            delay = min(delay, left)
    return RetryDecision(
        Action.RETRY,
        delay,
        give_back_attempt=kind in (Kind.THROTTLED, Kind.WAIT),
        counters=counters,
    )


def decide_crash(policy: RetryPolicy, history: AttemptHistory, *, scale: float = 1.0,
                 rng: Any = random) -> RetryDecision:  # fmt: skip
    """A step that raised (a bug, an answer it could not read): its call may have
    reached the provider, so it is never compensated; it backs off and, past the
    attempt limit, goes to an operator with the error."""
    counters = _counters(history)
    counters["crashes"] += 1
    if counters["crashes"] >= policy.max_attempts:
        return RetryDecision(Action.DEAD_LETTER, counters=counters)
    return RetryDecision(
        Action.RETRY, backoff_s(policy, counters["crashes"], scale, rng), counters=counters
    )
