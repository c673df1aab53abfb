"""A TCP proxy in front of PostgreSQL that loses the acknowledgement of a COMMIT.

It forwards the wire protocol unchanged, except that a COMMIT (chosen at
random with probability `drop_rate`, from a seeded generator) is forwarded to
the server, the server's answer (the commit is durable by then) is swallowed,
and both sockets are closed: the client sees its
connection die with no way to know whether the transaction committed — what a
`pg_terminate_backend` or a network cut between COMMIT and its
acknowledgement does.  Clients must connect with sslmode=disable (the proxy
reads the messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import threading
from typing import Any


class CommitAckDropper:
    def __init__(self, upstream_socket: str, drop_rate: float, seed: int = 6) -> None:
        self.upstream_socket = upstream_socket
        self.drop_rate = drop_rate
        self._rng = random.Random(seed)
        self.commits = 0
        self.dropped = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CommitAckDropper:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, database: str = "postgres") -> str:
        return (
            f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
            "?sslmode=disable&gssencmode=disable"
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_unix_connection(self.upstream_socket)
        swallow = asyncio.Event()  # set: the server's next answer is to be lost
        pumps = [
            asyncio.ensure_future(self._frontend(c_reader, s_writer, swallow)),
            asyncio.ensure_future(self._backend(s_reader, c_writer, swallow)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
            for writer in (c_writer, s_writer):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _frontend(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, swallow: asyncio.Event
    ) -> None:
        (length,) = struct.unpack("!i", await reader.readexactly(4))  # the startup message
        writer.write(struct.pack("!i", length) + await reader.readexactly(length - 4))
        while True:
            kind = await reader.readexactly(1)
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            if kind == b"Q" and body.lstrip().upper().startswith(b"COMMIT"):
                self.commits += 1
                if self._rng.random() < self.drop_rate:
                    swallow.set()
            writer.write(kind + struct.pack("!i", length) + body)
            await writer.drain()
            if kind == b"X":
                return

    async def _backend(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, swallow: asyncio.Event
    ) -> None:
        while True:
            kind = await reader.readexactly(1)
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            if swallow.is_set():
                if kind == b"Z":  # the server finished the COMMIT: it is durable
                    self.dropped += 1
                    raise ConnectionResetError("commit acknowledgement dropped")
                continue
            writer.write(kind + struct.pack("!i", length) + body)
            await writer.drain()
