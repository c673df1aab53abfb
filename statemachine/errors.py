"""Named errors of the order state machine."""

from __future__ import annotations


class OrderflowError(Exception):
    """Base of every error the domain raises on purpose."""


class OrderNotFound(OrderflowError):
    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id} not found")
        self.order_id = order_id


class IllegalTransition(OrderflowError):
    """The event is not allowed from the order's current state; nothing was written."""

    def __init__(self, order_id: str, state: str, event: str) -> None:
        super().__init__(f"order {order_id}: event {event!r} is not allowed in state {state!r}")
        self.order_id = order_id
        self.state = state
        self.event = event


class InvalidEventDetail(OrderflowError):
    """The event is known but its detail does not fit the order; nothing was written."""

    def __init__(self, order_id: str, event: str, reason: str) -> None:
        super().__init__(f"order {order_id}: event {event!r}: {reason}")
        self.order_id = order_id
        self.event = event


class StaleState(OrderflowError):
    """The guarded UPDATE found the order no longer in the state it was read in:
    another transaction won the race."""

    def __init__(self, order_id: str, expected_state: str) -> None:
        super().__init__(f"order {order_id} left state {expected_state!r} before this event")
        self.order_id = order_id
        self.expected_state = expected_state
