"""The saga as a Mermaid state diagram, drawn from the table that runs."""

from __future__ import annotations

from collections.abc import Mapping

from orderflow.statemachine.definition import (
    NEXT_COMPENSATION,
    SETTLED_STATES,
    TRANSITIONS,
    OrderState,
)


def mermaid(counts: Mapping[str, int] | None = None) -> str:
    """The diagram; with `counts` (orders per state) each state is labelled with its count.

    States holding orders get the class `occupied`, and `needs_attention` with
    any orders gets `alarm`, so a page can colour them.
    """
    lines = ["stateDiagram-v2"]
    for state in OrderState:
        label = state.value if counts is None else f"{state.value}: {counts.get(state.value, 0)}"
        lines.append(f'    state "{label}" as {state.value}')
    for row in TRANSITIONS:
        source = "[*]" if row.source is None else row.source.value
        label = row.event
        if row.conditions:
            label += " [" + ", ".join(row.conditions) + "]"
        if row.emits:
            # Mermaid drops anything in angle brackets as HTML, so the marker is spelled out.
            emits = ("next compensation" if e == NEXT_COMPENSATION else e for e in row.emits)
            label += " / " + ", ".join(emits)
        lines.append(f"    {source} --> {row.dest.value} : {label}")
    for state in OrderState:
        if state in SETTLED_STATES:
            lines.append(f"    {state.value} --> [*]")
    if counts is not None:
        occupied = [s.value for s in OrderState if counts.get(s.value, 0) > 0]
        lines.append("    classDef occupied font-weight:bold,stroke-width:2px")
        lines.append("    classDef alarm fill:#f8d7da,stroke:#b02a37,stroke-width:3px")
        if occupied:
            lines.append(f"    class {','.join(occupied)} occupied")
        if counts.get(OrderState.NEEDS_ATTENTION.value, 0) > 0:
            lines.append(f"    class {OrderState.NEEDS_ATTENTION.value} alarm")
    return "\n".join(lines) + "\n"
