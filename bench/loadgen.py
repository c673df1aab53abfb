"""A lean HTTP/1.1 keep-alive load generator on raw asyncio streams.

httpx costs more CPU per request than the server under test; on a 2-core
machine that would measure the client.  This one only writes a request and
reads the status line, headers and Content-Length body.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RequestFactory = Callable[[int, int], tuple[str, str, dict[str, str], Any]]


@dataclass
class Phase:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


def _encode(host: str, method: str, path: str, headers: dict[str, str], body: Any) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return status, body


async def drive(
    phase: Phase,
    host: str,
    port: int,
    concurrency: int,
    seconds: float,
    make_request: RequestFactory,
    warmup_s: float = 1.0,
    ok_statuses: tuple[int, ...] = (200, 201, 202),
) -> None:
    warm_until = time.monotonic() + warmup_s
    stop_at = warm_until + seconds

    async def worker(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        i = 0
        try:
            while True:
                started = time.monotonic()
                if started >= stop_at:
                    return
                method, path, headers, body = make_request(n, i)
                writer.write(_encode(f"{host}:{port}", method, path, headers, body))
                status, _ = await _read_response(reader)
                i += 1
                if started < warm_until:
                    continue
                if status in ok_statuses:
                    phase.latencies_ms.append((time.monotonic() - started) * 1000)
                else:
                    phase.errors[status] = phase.errors.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    phase.seconds = seconds
