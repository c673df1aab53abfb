"""Where the events relay publishes: one interface, NATS JetStream behind it.

A `Publisher` sends one event and returns once the broker has stored it (a
JetStream PubAck; a RabbitMQ publisher confirm would be the same promise), or
raises.  `ORDERFLOW_EVENTS_URL`'s scheme picks the implementation; the settings
refuse a scheme with none, so the process stops at start.
"""

from __future__ import annotations

import contextlib
from typing import Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit


class BrokerUnavailable(Exception):
    """The broker did not confirm: the event stays unpublished and is sent again."""


class Publisher(Protocol):
    async def connect(self) -> None: ...

    async def publish(self, event_id: str, event_type: str, body: bytes) -> None: ...

    async def close(self) -> None: ...


class JetStreamPublisher:
    """NATS JetStream: subject `<prefix>orderflow.order.<state>`, the event id as
    `Nats-Msg-Id`, so the stream drops a re-sent event within its duplicate window."""

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.server = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self.stream = query.get("stream", ["ORDERFLOW_EVENTS"])[0]
        prefix = query.get("prefix", [""])[0]
        self.prefix = f"{prefix}." if prefix else ""
        self.timeout_s = timeout_s
        self._nc: object | None = None
        self._js: object | None = None

    def subject(self, event_type: str) -> str:
        return f"{self.prefix}{event_type}"

    async def connect(self) -> None:
        import nats
        from nats.js.errors import NotFoundError

        try:
            nc = await nats.connect(
                self.server,
                connect_timeout=self.timeout_s,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                allow_reconnect=True,
            )
        except Exception as exc:
            raise BrokerUnavailable(f"NATS at {self.server}: {exc!r}") from exc
        js = nc.jetstream(timeout=self.timeout_s)
        try:
            await js.stream_info(self.stream)
        except NotFoundError:
            await js.add_stream(name=self.stream, subjects=[f"{self.prefix}orderflow.order.>"])
        except Exception as exc:
            await nc.close()
            raise BrokerUnavailable(f"JetStream at {self.server}: {exc!r}") from exc
        self._nc, self._js = nc, js

    async def publish(self, event_id: str, event_type: str, body: bytes) -> None:
        js = self._js
        if js is None:
            raise BrokerUnavailable("not connected")
        try:
            await js.publish(  # type: ignore[attr-defined]
                self.subject(event_type),
                body,
                timeout=self.timeout_s,
                stream=self.stream,
                headers={"Nats-Msg-Id": event_id, "Content-Type": "application/cloudevents+json"},
            )
        except Exception as exc:
            raise BrokerUnavailable(f"publish {event_id}: {exc!r}") from exc

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):  # closing a dead connection
                await nc.close()  # type: ignore[attr-defined]


def publisher_for(url: str) -> Publisher:
    scheme = urlsplit(url).scheme
    if scheme == "nats":
        return JetStreamPublisher(url)
    raise ValueError(f"ORDERFLOW_EVENTS_URL: no broker for {scheme}://")
