"""The saga as a Mermaid state diagram, drawn from the table that runs."""

from __future__ import annotations

from statemachine.definition import SETTLED_STATES, TRANSITIONS, OrderState


def mermaid() -> str:
    lines = ["stateDiagram-v2"]
    for state in OrderState:
        lines.append(f'    state "{state.value}" as {state.value}')
    for row in TRANSITIONS:
        source = "[*]" if row.source is None else row.source.value
        label = row.event
        if row.conditions:
            label += " [" + ", ".join(row.conditions) + "]"
        if row.emits:
            label += " / " + ", ".join(row.emits)
        lines.append(f"    {source} --> {row.dest.value} : {label}")
    for state in OrderState:
        if state in SETTLED_STATES:
            lines.append(f"    {state.value} --> [*]")
    return "\n".join(lines) + "\n"
