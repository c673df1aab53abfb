# mypy: ignore-errors
# (it runs in the peers' virtualenv, whose packages this one does not have)
"""pgqueuer's drain, the way its own tools/benchmark.py runs it (`--strategy drain`):
N jobs enqueued, then D dequeuers (batch B each) drain them with a no-op entrypoint.

Runs in its own virtualenv (bench/peers/__init__.py makes it): pgqueuer is a
peer to compare with, never a dependency of orderflow.  Usage:
    python pgqueuer_drain.py DSN JOBS DRIVER(psy|apg) [DEQUEUERS] [BATCH]
Prints one JSON line: jobs, seconds, jobs_per_s, driver, pgqueuer's version.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from importlib.metadata import version


async def main(dsn: str, jobs: int, driver: str, dequeuers: int, batch: int) -> dict[str, object]:
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver, PsycopgDriver
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    async def connect() -> object:
        if driver == "apg":
            import asyncpg

            return AsyncpgDriver(await asyncpg.connect(dsn=dsn))
        import psycopg

        return PsycopgDriver(await psycopg.AsyncConnection.connect(dsn, autocommit=True))

    setup = Queries(await connect())
    if not await setup.schema_is_installed():
        await setup.install()
    await setup.clear_queue()
    await setup.enqueue(["fetch"] * jobs, [b"" for _ in range(jobs)], [0] * jobs)

    done = 0
    queuers = []
    for _ in range(dequeuers):
        pgq = PgQueuer(await connect())

        @pgq.entrypoint("fetch")
        async def fetch(job: Job) -> None:
            nonlocal done
            done += 1

        queuers.append(pgq)
    began = time.perf_counter()
    await asyncio.gather(*(q.run(batch_size=batch, mode=QueueExecutionMode.drain) for q in queuers))
    elapsed = time.perf_counter() - began
    return {
        "peer": "pgqueuer",
        "pgqueuer_version": version("pgqueuer"),
        "driver": driver,
        "jobs": done,
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(done / elapsed, 1),
        "dequeuers": dequeuers,
        "batch_size": batch,
    }


if __name__ == "__main__":
    dsn, jobs, driver = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dequeuers = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 10
    print(json.dumps(asyncio.run(main(dsn, jobs, driver, dequeuers, batch))))
