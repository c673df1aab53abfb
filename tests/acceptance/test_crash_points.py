"""Crash-point sweep: a worker process dies (os._exit) at each failpoint of each step;
another finishes the work; the doctor is clean and each provider saw each effect once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from orderflow.outbox_worker.runner import Worker
from orderflow.statemachine.engine import advance
from tests.support.helpers import place
from tests.support.processes import start_worker
from tests.support.sandbox_client import check_invariants, drain, states
from tests.support.secrets_scan import assert_no_secrets

EXTERNAL = {
    # step: (path that reaches it, final state)
    "charge_payment": ("happy", "confirmed"),
    "ship_order": ("happy", "confirmed"),
    "capture_payment": ("happy", "confirmed"),
    "send_confirmation": ("happy", "confirmed"),
    "refund_payment": ("refused", "cancelled"),
    "create_return_label": ("return", "returned"),
    "refund_return": ("return", "returned"),
}
LOCAL = {
    "release_inventory": ("refused", "cancelled"),
    "restock_inventory": ("return", "returned"),
}
# The payment paths that wait for the customer: a 3-D Secure completed at the
# bank's page (the poll settles it), and one abandoned until the reservation
# expires (the compensation cancels the PaymentIntent).
WAITING = {
    "await_payment": ("3ds", "confirmed"),
    "refund_payment": ("abandoned", "cancelled"),
}
POINTS = ("before_call", "after_call", "before_commit", "after_commit")
CASES = [
    (*case, "at_shipment")
    for case in (
        [(step, point, *how) for step, how in EXTERNAL.items() for point in POINTS]
        + [(step, point, *how) for step, how in WAITING.items() for point in POINTS]
        # between the PaymentIntent's creation (noted) and its confirmation
        + [("charge_payment", "after_checkpoint", "happy", "confirmed")]
        + [
            (step, point, *how)
            for step, how in LOCAL.items()
            for point in ("before_commit", "after_commit")
        ]
    )
] + [
    # With the immediate capture, a refused parcel's payment is refunded, not released.
    ("refund_payment", point, "refused", "cancelled", "immediate")
    for point in POINTS
]


def _customer(conn: Any, sandbox: Any, order_id: str, path: str, worker: Worker) -> None:
    """The customer completes 3-D Secure at the bank, or never comes back (and the
    reservation expires: recorded here at once, not at the worker's next housekeeping)."""
    if path == "3ds":
        row = conn.execute(
            "SELECT id FROM payment_intents WHERE order_id = %s", (order_id,)
        ).fetchone()
        sandbox.authenticate(row["id"], "complete")
    else:
        conn.execute(
            "UPDATE reservations SET expires_at = created_at + interval '1 microsecond'"
            " WHERE order_id = %s",
            (order_id,),
        )
        worker.expire_reservations()


def drain_until(worker: Worker, conn: Any, order_id: str, wanted: str) -> None:
    deadline = time.monotonic() + 30
    while states(conn)[order_id] != wanted:
        assert time.monotonic() < deadline, f"never reached {wanted}"
        if worker.run_once() == 0:
            time.sleep(0.02)


def _wait_state(conn: Any, order_id: str, wanted: str, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if states(conn)[order_id] == wanted:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError(f"order never reached {wanted}")


@pytest.mark.parametrize(("step", "point", "path", "final", "capture"), CASES)
def test_worker_dies_at_failpoint(
    db_url: str,
    conn: Any,
    worker: Worker,  # with the case's capture policy (conftest)
    sandbox: Any,
    tmp_path: Path,
    step: str,
    point: str,
    path: str,
    final: str,
    capture: str,
) -> None:
    if path == "refused":
        sandbox.faults({"endpoint": "shipment", "mode": "error", "status": 422})
    card = "pm_card_authenticationRequired" if path in ("3ds", "abandoned") else "pm_card_visa"
    order = place(conn, [("MUG-01", 1)], payment_method=card)
    # --lease 1 (after start_worker's own --lease 2: the last one counts)
    proc = start_worker(
        db_url,
        sandbox,
        tmp_path,
        "--lease",
        "1",
        failpoints=f"{step}.{point}=exit",
        env_extra={"ORDERFLOW_CAPTURE": capture},
    )
    try:
        if path == "return":
            if _wait_state(conn, order.id, "confirmed", proc):
                advance(conn, order.id, "return_requested", {"reason": "sweep"})
            if _wait_state(conn, order.id, "awaiting_return", proc):
                advance(conn, order.id, "return_received", {})
        if path in ("3ds", "abandoned") and _wait_state(conn, order.id, "awaiting_payment", proc):
            _customer(conn, sandbox, order.id, path, worker)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 77, "the worker did not die at the failpoint"
    time.sleep(1.1)  # the dead worker's lease runs out
    sandbox.faults()
    drain(worker, conn, timeout_s=60)
    if path in ("3ds", "abandoned") and states(conn)[order.id] == "reserved":
        drain_until(worker, conn, order.id, "awaiting_payment")
        _customer(conn, sandbox, order.id, path, worker)
        drain(worker, conn, timeout_s=60)
    if path == "return":  # the person's steps the crash kept from happening
        if states(conn)[order.id] == "confirmed":
            advance(conn, order.id, "return_requested", {"reason": "sweep"})
            drain(worker, conn, timeout_s=60)
        if states(conn)[order.id] == "awaiting_return":
            advance(conn, order.id, "return_received", {})
            drain(worker, conn, timeout_s=60)
    assert states(conn)[order.id] == final
    check_invariants(conn, sandbox.effects())
    assert_no_secrets(tmp_path.glob("*.log"))
