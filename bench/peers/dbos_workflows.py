# mypy: ignore-errors
# (it runs in the peers' virtualenv, whose packages this one does not have)
"""DBOS Transact's durable workflow of four no-op steps, N of them started at once
and waited for, on a Postgres system database: the moonshot beside `bench saga`
(a saga is a workflow of about four steps, each checkpointed in Postgres).

Runs in the peers' virtualenv (bench/peers/__init__.py makes it).  Usage:
    python dbos_workflows.py DSN WORKFLOWS
Prints one JSON line: workflows, seconds, workflows_per_s, DBOS's version.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version

from dbos import DBOS, DBOSConfig


@DBOS.step()
def reserve() -> None:
    pass


@DBOS.step()
def charge() -> None:
    pass


@DBOS.step()
def ship() -> None:
    pass


@DBOS.step()
def notify() -> None:
    pass


@DBOS.workflow()
def saga() -> None:
    reserve()
    charge()
    ship()
    notify()


def main(dsn: str, workflows: int) -> dict[str, object]:
    config: DBOSConfig = {"name": "orderflow-bench-peer", "system_database_url": dsn}
    DBOS(config=config)
    DBOS.launch()
    DBOS.start_workflow(saga).get_result()  # warm: connections, the schema
    began = time.perf_counter()
    handles = [DBOS.start_workflow(saga) for _ in range(workflows)]
    for handle in handles:
        handle.get_result()
    elapsed = time.perf_counter() - began
    DBOS.destroy()
    return {
        "peer": "dbos",
        "dbos_version": version("dbos"),
        "workflows": workflows,
        "steps_per_workflow": 4,
        "seconds": round(elapsed, 2),
        "workflows_per_s": round(workflows / elapsed, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
