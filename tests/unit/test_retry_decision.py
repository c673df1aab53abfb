"""The retry decision, a pure function, over every outcome kind: what is retried,
for how long, what fails for good, what goes to an operator, what is no attempt."""

from __future__ import annotations

import random

import pytest

from orderflow.outbox_worker.outcomes import (
    Action,
    AttemptHistory,
    Kind,
    StepOutcome,
    backoff_s,
    decide_crash,
    decide_retry,
)
from orderflow.statemachine.definition import STEPS, RetryPolicy

POLICY = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=30.0, max_unreadable=5)
# Outcomes that are not retried: they are committed (DONE, FAILED) or handed over (OPERATOR).
FINAL = {Kind.DONE, Kind.FAILED, Kind.OPERATOR}
NOW = 1_800_000_000.0


def _run(outcome: StepOutcome, times: int, policy: RetryPolicy = POLICY) -> list[Action]:
    """Feed the same outcome back `times` times, as the worker does (the counters
    of each decision are the next attempt's history)."""
    history, actions = AttemptHistory(), []
    for _ in range(times):
        decision = decide_retry(policy, history, outcome, NOW, rng=random.Random(7))
        actions.append(decision.action)
        if decision.action != Action.RETRY:
            break
        history = AttemptHistory.from_payload(dict(decision.counters))
    return actions


def test_every_kind_has_a_decision_or_is_final() -> None:
    for kind in Kind:
        outcome = StepOutcome(kind, error="x")
        if kind in FINAL:
            with pytest.raises(ValueError):
                decide_retry(POLICY, AttemptHistory(), outcome, NOW)
        else:
            assert decide_retry(POLICY, AttemptHistory(), outcome, NOW).action == Action.RETRY


def test_definitely_not_done_is_retried_then_fails() -> None:
    assert _run(StepOutcome.transient("503 before the call"), 10) == [
        Action.RETRY,
        Action.RETRY,
        Action.FAIL,
    ]


def test_unknown_is_never_failed_however_long_the_outage() -> None:
    actions = _run(StepOutcome.unknown("500 stored for the key"), 1000)
    assert actions == [Action.RETRY] * 1000


def test_unreadable_answers_go_to_an_operator_never_to_compensation() -> None:
    unreadable = StepOutcome(Kind.UNKNOWN, error="no amount_received", unreadable=True)
    assert _run(unreadable, 100) == [Action.RETRY] * 4 + [Action.DEAD_LETTER]


def test_throttles_and_polls_are_no_attempt_and_never_fail() -> None:
    for outcome in (StepOutcome.throttled(2.5), StepOutcome.wait()):
        assert _run(outcome, 200) == [Action.RETRY] * 200
        decision = decide_retry(POLICY, AttemptHistory(), outcome, NOW)
        assert decision.give_back_attempt
    assert not decide_retry(
        POLICY, AttemptHistory(), StepOutcome.unknown("x"), NOW
    ).give_back_attempt


def test_retry_after_is_a_floor_on_the_delay() -> None:
    decision = decide_retry(POLICY, AttemptHistory(), StepOutcome.throttled(120.0), NOW)
    assert decision.delay_s >= 120.0


def test_throttles_do_not_use_up_the_attempts_of_definite_failures() -> None:
    history = AttemptHistory(throttles=50, not_done=1)
    assert decide_retry(POLICY, history, StepOutcome.transient("x"), NOW).action == Action.RETRY
    last = decide_retry(POLICY, AttemptHistory(not_done=2), StepOutcome.transient("x"), NOW)
    assert last.action == Action.FAIL


def test_the_counters_are_carried_over() -> None:
    history = AttemptHistory(not_done=1, unknowns=4, unreadable=2, throttles=3, polls=5, crashes=1)
    decision = decide_retry(POLICY, history, StepOutcome.unknown("x"), NOW)
    assert decision.counters == {
        "not_done": 1, "unknowns": 5, "unreadable": 2, "throttled": 3, "polls": 5, "crashes": 1,
    }  # fmt: skip
    # The payload's names read back into the same history (lost attempts count as unreadable).
    again = AttemptHistory.from_payload(dict(decision.counters), lost=2)
    assert again.unknowns == 5 and again.unreadable == 4 and again.throttles == 3


def test_a_crash_backs_off_then_goes_to_an_operator() -> None:
    history, actions = AttemptHistory(), []
    for _ in range(10):
        decision = decide_crash(POLICY, history)
        actions.append(decision.action)
        if decision.action != Action.RETRY:
            break
        history = AttemptHistory.from_payload(dict(decision.counters))
    assert actions == [Action.RETRY, Action.RETRY, Action.DEAD_LETTER]


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 10, 40])
def test_backoff_is_full_jitter_under_the_cap(attempt: int) -> None:
    ceiling = min(POLICY.max_delay_s, POLICY.base_delay_s * 2 ** (attempt - 1))
    draws = [backoff_s(POLICY, attempt, rng=random.Random(seed)) for seed in range(200)]
    assert all(0 <= d <= ceiling for d in draws)
    assert max(draws) > ceiling * 0.8  # jittered across the whole range, not a constant
    assert backoff_s(POLICY, attempt, scale=0.0) == 0.0


def test_every_steps_policy_fails_a_definite_no_in_finite_tries() -> None:
    for step in STEPS:
        actions = _run(StepOutcome.transient("no"), 100, step.retry)
        assert actions[-1] == Action.FAIL and len(actions) == step.retry.max_attempts


def test_an_unknown_is_replayed_before_its_key_is_forgotten() -> None:
    """Stripe answers a replay with the first call's result only while it keeps
    the key (about 24 h): the replay is scheduled before the window ends."""
    slow = RetryPolicy(max_attempts=3, base_delay_s=600.0, max_delay_s=3600.0)
    history = AttemptHistory(unknowns=12, key_sent_at=NOW - 23 * 3600 + 90)
    for seed in range(50):
        decision = decide_retry(slow, history, StepOutcome.unknown("timeout"), NOW,
                                key_window_s=23 * 3600, rng=random.Random(seed))  # fmt: skip
        assert decision.action == Action.RETRY and decision.delay_s <= 90
    # Far from the window's end, the backoff alone decides; past it, the step
    # itself reconciles instead of replaying (StepCall.key_expired).
    fresh = AttemptHistory(unknowns=12, key_sent_at=NOW)
    delays = [decide_retry(slow, fresh, StepOutcome.unknown("t"), NOW, key_window_s=82800,
                           rng=random.Random(seed)).delay_s for seed in range(50)]  # fmt: skip
    assert max(delays) > 90
    # A throttle keeps the provider's Retry-After.
    throttled = decide_retry(slow, history, StepOutcome.throttled(300.0), NOW, key_window_s=82800)
    assert throttled.delay_s >= 300


def test_the_keys_age_is_read_from_the_payload() -> None:
    history = AttemptHistory.from_payload({"sent_at": {"create": 100.0, "": 250.0}})
    assert history.key_sent_at == 100.0
    assert AttemptHistory.from_payload({}).key_sent_at is None
