"""Publishes execution events to Kafka with aiokafka; a slow or dead broker never blocks an execution, and nothing is
lost silently: an event is either delivered (after the broker comes back, in order per execution) or counted and logged
as dropped with its execution id."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from imageflow.server.domain import instruments as telemetry

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 1024 * 1024
"""Kafka's default message size limit; events carry output references, not pixels, so they stay far below it."""


class KafkaEventSink:
    """A bounded buffer drained by one background sender that reconnects after failures and retries the event it was
    sending; when the buffer is full, or an event is over the message size limit, it is dropped, counted and logged."""

    def __init__(
        self, bootstrap: str, topic: str, buffer_events: int, max_message_bytes: int = MAX_MESSAGE_BYTES
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._max_message_bytes = max_message_bytes
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=buffer_events)
        self._sender: asyncio.Task[None] | None = None
        self.dropped = 0
        self.sent = 0

    async def start(self) -> None:
        """Start the background sender (connecting lazily, retrying while the broker is down)."""
        self._sender = asyncio.create_task(self._send_forever(), name="kafka-sender")

    def publish_stored(self, execution_id: str, payload: bytes) -> None:
        """Enqueue without waiting; drop (counted, logged) when the buffer is full or the event is too large."""
        if len(payload) > self._max_message_bytes:
            self._drop(execution_id, f"{len(payload)} bytes, over the message limit of {self._max_message_bytes}")
            return
        try:
            self._queue.put_nowait((execution_id, payload))
        except asyncio.QueueFull:
            self._drop(execution_id, f"the buffer of {self._queue.maxsize} events is full (broker slow or down)")

    def _drop(self, execution_id: str, why: str) -> None:
        self.dropped += 1
        telemetry.kafka_dropped.add(1)
        log.warning("Kafka: dropped an event of execution %s: %s (%d dropped so far)", execution_id, why, self.dropped)

    async def _send_forever(self) -> None:
        backoff = 0.5
        pending: tuple[str, bytes] | None = None  # kept across reconnects: a failed send is retried, not lost
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap, acks=1, linger_ms=5, request_timeout_ms=int(SEND_TIMEOUT_S * 1000)
            )
            try:
                await asyncio.wait_for(producer.start(), SEND_TIMEOUT_S)
                if backoff > 0.5:
                    log.info("Kafka reachable again at %s; sending the buffered events", self._bootstrap)
                backoff = 0.5
                while True:
                    if pending is None:
                        pending = await self._queue.get()
                    execution_id, payload = pending
                    try:
                        await asyncio.wait_for(
                            producer.send_and_wait(self._topic, payload, key=execution_id.encode()), SEND_TIMEOUT_S
                        )
                    except MessageSizeTooLargeError:
                        self._drop(execution_id, "the broker refused it as too large")
                    else:
                        self.sent += 1
                    pending = None
            except asyncio.CancelledError:
                await producer.stop()
                raise
            except Exception as error:  # noqa: BLE001 - keep retrying; executions never wait on Kafka
                log.warning("Kafka unavailable (%s); retrying in %.1f s", type(error).__name__, backoff)
                await producer.stop()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def close(self) -> None:
        """Stop the sender."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
