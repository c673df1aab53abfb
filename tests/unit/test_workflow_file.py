"""The seed workflow file and the state machine describe the same saga."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from orderflow.statemachine.definition import (
    CANCEL_EVENTS,
    FORWARD_ACTIONS,
    FORWARD_RETRY,
    STATE_TIMEOUT_MINUTES,
    STEPS,
    STEPS_BY_NAME,
    TRANSITIONS,
    WORKFLOW_NODES,
    OrderState,
    Transition,
)
from tests.support.paths import PROJECT_ROOT

WORKFLOW = PROJECT_ROOT / "statemachine" / "order-fulfillment.osop.yaml"
NODES = {n.id: n for n in WORKFLOW_NODES}


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    return data


def _rows(event: str, source: OrderState | None = None) -> list[Transition]:
    return [t for t in TRANSITIONS if t.event == event and (source is None or t.source == source)]


def _success_event(node_id: str) -> str:
    node = NODES[node_id]
    if node.step:
        if node.runs_as == "human":
            assert node.human_event
            return node.human_event
        event = STEPS_BY_NAME[node.step].on_success
        assert event
        return event
    assert node.success_event, node_id
    return node.success_event


def _failure_event(node_id: str) -> str | None:
    node = NODES[node_id]
    if node.runs_as == "step" and node.step:
        return STEPS_BY_NAME[node.step].failure_edge
    return node.failure_event


def _state_after(node_id: str) -> OrderState:
    rows = _rows(_success_event(node_id))
    return rows[0].dest


def _state_during(node_id: str) -> OrderState | None:
    node = NODES[node_id]
    return STEPS_BY_NAME[node.step].runs_in if node.step else None


def test_shape_of_the_seed(workflow: dict[str, Any]) -> None:
    assert workflow["id"] == "temporal-order-fulfillment"
    assert len(workflow["nodes"]) == 7
    assert len(workflow["edges"]) == 8


def test_every_node_is_implemented_and_nothing_else(workflow: dict[str, Any]) -> None:
    assert {n["id"] for n in workflow["nodes"]} == set(NODES)
    for node in WORKFLOW_NODES:
        if node.step:
            assert node.step in STEPS_BY_NAME
        if node.runs_as in ("step", "human", "transition"):
            assert _rows(_success_event(node.id)), node.id


def test_compensations_match(workflow: dict[str, Any]) -> None:
    declared = {
        n["id"]: n["config"]["compensate"]
        for n in workflow["nodes"]
        if "compensate" in n.get("config", {})
    }
    ours = {a.name: a.compensation for a in FORWARD_ACTIONS}
    assert declared == ours
    compensation_steps = {s.name: s.compensates for s in STEPS if s.compensates}
    assert compensation_steps == {c: a for a, c in declared.items()}
    # compensations run in the compensating state and report back through the handler
    for step in compensation_steps:
        assert STEPS_BY_NAME[step].runs_in == OrderState.COMPENSATING
        assert STEPS_BY_NAME[step].on_success == "compensation_done"


def test_error_edges_lead_to_the_compensation_handler(workflow: dict[str, Any]) -> None:
    handler_state = NODES["compensation_handler"].state
    error_sources = {
        e["from"]
        for e in workflow["edges"]
        if e["mode"] == "error" and e["to"] == "compensation_handler"
    }
    assert error_sources == {"reserve_inventory", "charge_payment", "ship_order"}
    for node_id in NODES:
        failure = _failure_event(node_id)
        state = _state_during(node_id) or (
            _state_after(node_id) if NODES[node_id].runs_as == "transition" else None
        )
        leads_to_handler = bool(
            failure and state and any(t.dest == handler_state for t in _rows(failure, state))
        )
        assert leads_to_handler == (node_id in error_sources), node_id
    # and nothing else enters compensation from a forward state
    forward_states = {
        OrderState.RESERVED,
        OrderState.PAID,
        OrderState.SHIPPED,
        OrderState.CONFIRMED,
    }
    entering = {
        t.event for t in TRANSITIONS if t.dest == handler_state and t.source in forward_states
    }
    # The seed's charge_payment is "authorize and capture": with capture at
    # shipment its second half can fail too (the capture, or a hold released
    # before the parcel ships).  A cancel is the customer's (or an operator's).
    payment_second_half = {"capture_failed", "hold_lost"}
    assert entering == (
        {_failure_event(n) for n in error_sources} | payment_second_half | set(CANCEL_EVENTS)
    )


def test_sequential_edges_are_emitted_steps(workflow: dict[str, Any]) -> None:
    for edge in workflow["edges"]:
        if edge["mode"] != "sequential" or edge["from"] == "validate_order":
            continue
        source_event = _success_event(edge["from"])
        target_step = NODES[edge["to"]].step
        emits = {s for t in _rows(source_event, _state_during(edge["from"])) for s in t.emits}
        assert target_step in emits, edge


def test_validate_order_runs_before_the_reservation(workflow: dict[str, Any]) -> None:
    edge = next(e for e in workflow["edges"] if e["from"] == "validate_order")
    assert edge["to"] == "reserve_inventory"
    assert NODES["validate_order"].runs_as == "request"
    place = _rows(_success_event("reserve_inventory"))
    assert [t.source for t in place] == [None]  # reservation creates the order


def test_event_edge_is_the_human_return(workflow: dict[str, Any]) -> None:
    edge = next(e for e in workflow["edges"] if e["mode"] == "event")
    assert (edge["from"], edge["to"], edge["when"]) == (
        "send_confirmation",
        "handle_return",
        NODES["handle_return"].human_event,
    )
    rows = _rows(edge["when"], _state_after("send_confirmation"))
    assert rows and NODES["handle_return"].step in rows[0].emits
    # send_confirmation has no error edge: its failure never compensates
    assert not any(
        t.dest == OrderState.COMPENSATING
        for t in _rows(STEPS_BY_NAME["send_confirmation"].failure_edge)
    )


def test_retry_policy_and_timeouts(workflow: dict[str, Any]) -> None:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    policy = nodes["charge_payment"]["config"]["retry_policy"]
    assert policy["backoff"] == "exponential"
    assert STEPS_BY_NAME["charge_payment"].retry == FORWARD_RETRY
    assert FORWARD_RETRY.max_attempts == policy["max_attempts"]
    timeout = nodes["reserve_inventory"]["config"]["timeout_minutes"]
    assert NODES["reserve_inventory"].timeout_minutes == timeout
    assert STATE_TIMEOUT_MINUTES[OrderState.RESERVED] == timeout
