"""Hypothesis: any sequence of events keeps the history a path of the machine,
and the outbox rows emitted are exactly what the table says.

The oracle below re-derives the expected outcome from the transition table and
its own bookkeeping of what the order has done; it shares no code with
statemachine.machine beyond the table itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderflow.sql.db import connect
from orderflow.statemachine.definition import NEXT_COMPENSATION, TRANSITIONS
from orderflow.statemachine.engine import advance
from orderflow.statemachine.errors import IllegalTransition, InvalidEventDetail
from tests.support.helpers import place, snapshot

COMPENSATIONS = ["cancel_shipment", "refund_payment", "release_inventory"]

EVENTS = st.one_of(
    st.sampled_from(
        [
            ("payment_captured", {}),
            ("payment_authorized", {"intent_status": "requires_capture"}),
            ("payment_pending", {"intent_status": "requires_action"}),
            ("customer_cancelled", {"reason": "customer_cancelled"}),
            ("operator_cancelled", {"reason": "operator_cancelled"}),
            ("hold_expiring", {}),
            ("hold_lost", {}),
            ("capture_failed", {}),
            ("payment_failed", {"code": "card_declined"}),
            ("dispute_opened", {"dispute_id": "dp_1"}),
            ("reservation_expired", {}),
            ("shipment_created", {"tracking": "1Z"}),
            ("shipment_failed", {}),
            ("shipment_failed", {"effects_done": ["ship_order"]}),
            ("confirmation_sent", {}),
            ("return_requested", {"reason": "broken"}),
            ("return_label_created", {}),
            ("return_received", {}),
            ("step_dead_lettered", {"step": "x"}),
            ("redrive", {}),
            ("place", {}),
            ("no_such_event", {}),
        ]
    ),
    st.builds(lambda s: ("compensation_done", {"step": s}), st.sampled_from(COMPENSATIONS)),
)


@dataclass
class Oracle:
    """What the order has done, as the test sees it."""

    state: str = "reserved"
    done: set[str] = field(default_factory=lambda: {"reserve"})
    compensated: list[str] = field(default_factory=list)
    state_before_dead: str | None = None
    parked_by: str | None = None
    captured: bool = False
    authorized: bool = False

    def owed(self, done: set[str], compensated: list[str]) -> list[str]:
        pairs = [
            ("ship", "cancel_shipment"),
            ("charge", "refund_payment"),
            ("reserve", "release_inventory"),
        ]
        return [c for a, c in pairs if a in done and c not in compensated]

    def expect(
        self, event: str, detail: dict[str, Any], emitted: list[str]
    ) -> tuple[str, list[str]] | None:
        """(next state, emitted steps), or None if the event must be refused."""
        done = set(self.done)
        compensated = list(self.compensated)
        if event in ("payment_captured", "payment_pending", "payment_authorized"):
            done.add("charge")  # an intent that may take money needs undoing too
        if "ship_order" in detail.get("effects_done", []):
            done.add("ship")
        if event == "shipment_created":
            done.add("ship")
        if event == "compensation_done" and self.state == "compensating":
            running = [c for c in self.owed(self.done, self.compensated) if c in emitted]
            if detail["step"] not in running:
                return None
            compensated.append(detail["step"])
        owed = self.owed(done, compensated)
        # one compensation at a time: the next starts only when none is running
        running = [c for c in owed if c in emitted]
        waiting = [c for c in owed if c not in emitted]
        next_one = waiting[:1] if not running else []
        rows = [
            t for t in TRANSITIONS if t.event == event and t.source and t.source.value == self.state
        ]
        for row in rows:
            cond = set(row.conditions)
            if "not_captured_yet" in cond and self.captured:
                continue
            if "not_authorized_yet" in cond and self.authorized:
                continue
            held = self.authorized and not self.captured
            if "payment_held" in cond and not held:
                continue
            if "payment_taken" in cond and held:
                continue
            if "parked_for_its_hold" in cond and not (
                self.parked_by == "hold_expiring" and self.state_before_dead == "paid"
            ):
                continue
            if "work_remains" in cond and not owed:
                continue
            if "no_work_remains" in cond and owed:
                continue
            resumes = [c for c in cond if c.startswith("resumes_")]
            if resumes and resumes[0] != f"resumes_{self.state_before_dead}":
                continue
            emits = []
            for step in row.emits:
                if step == NEXT_COMPENSATION:
                    emits += next_one
                else:
                    emits.append(step)
            return row.dest.value, emits
        return None

    def apply(self, event: str, detail: dict[str, Any], dest: str) -> None:
        if event in ("payment_captured", "payment_pending", "payment_authorized"):
            self.done.add("charge")
        if event == "payment_captured":
            self.captured = True
        if event == "payment_authorized":
            self.authorized = True
        if event == "shipment_created" or "ship_order" in detail.get("effects_done", []):
            self.done.add("ship")
        if event == "compensation_done":
            self.compensated.append(detail["step"])
        if (
            event in ("step_dead_lettered", "dispute_opened", "hold_expiring")
            and dest != self.state
        ):
            self.state_before_dead = self.state
            self.parked_by = event
        self.state = dest


EDGES = {(t.source.value if t.source else None, t.event, t.dest.value) for t in TRANSITIONS}

PROFILE_EXAMPLES = int(os.environ.get("ORDERFLOW_HYPOTHESIS_EXAMPLES", "150"))


@settings(
    max_examples=PROFILE_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=st.lists(EVENTS, max_size=25))
def test_any_event_sequence_keeps_history_a_path(
    module_db_url: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    with connect(module_db_url) as conn:
        _check_sequence(conn, events)


def _check_sequence(
    conn: psycopg.Connection[Any], events: list[tuple[str, dict[str, Any]]]
) -> None:
    conn.execute(
        "INSERT INTO products (sku, name, price_cents, currency, available)"
        " VALUES ('PROP-1', 'property stock', 100, 'EUR', 1000000) ON CONFLICT DO NOTHING"
    )
    order = place(conn, [("PROP-1", 1)])
    oracle = Oracle()
    expected_outbox = ["charge_payment"]
    for event, detail in events:
        before = snapshot(conn, order.id)
        expected = oracle.expect(event, detail, expected_outbox)
        try:
            outcome = advance(conn, order.id, event, detail)
        except (IllegalTransition, InvalidEventDetail):
            assert expected is None, (oracle.state, event, detail)
            assert snapshot(conn, order.id) == before
            continue
        assert expected is not None, (oracle.state, event, detail)
        dest, emits = expected
        assert outcome.dest.value == dest
        expected_outbox += emits
        oracle.apply(event, detail, dest)
        snap = snapshot(conn, order.id)
        assert [r["step"] for r in snap["outbox"]] == expected_outbox
        assert snap["state"]["state"] == dest

    snap = snapshot(conn, order.id)
    previous = None
    for h in snap["history"]:
        assert h["from_state"] == previous
        assert (h["from_state"], h["event"], h["to_state"]) in EDGES
        previous = h["to_state"]
    assert previous == snap["state"]["state"]
