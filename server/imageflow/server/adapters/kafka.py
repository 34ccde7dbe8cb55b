"""Publishes execution events to Kafka with aiokafka; a slow or dead broker never blocks an execution."""

from __future__ import annotations

import asyncio
import logging
import math

from aiokafka import AIOKafkaProducer
from imageflow.v1 import execution_pb2

log = logging.getLogger(__name__)


class KafkaEventSink:
    """A bounded buffer drained by one background sender; when full, events are dropped and counted."""

    def __init__(self, bootstrap: str, topic: str, buffer_events: int) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._queue: asyncio.Queue[execution_pb2.ExecutionEvent] = asyncio.Queue(maxsize=buffer_events)
        self._sender: asyncio.Task[None] | None = None
        self.dropped = 0
        self.sent = 0

    async def start(self) -> None:
        """Start the background sender (connecting lazily, retrying while the broker is down)."""
        self._sender = asyncio.create_task(self._send_forever(), name="kafka-sender")

    def publish(self, event: execution_pb2.ExecutionEvent) -> None:
        """Enqueue without waiting; drop (and count) when the buffer is full."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or math.log2(self.dropped).is_integer():
                log.warning("Kafka buffer full: %d events dropped so far", self.dropped)

    async def _send_forever(self) -> None:
        backoff = 0.5
        while True:
            producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks=1, linger_ms=5)
            try:
                await producer.start()
                backoff = 0.5
                while True:
                    event = await self._queue.get()
                    await producer.send_and_wait(
                        self._topic, event.SerializeToString(), key=event.execution_id.encode()
                    )
                    self.sent += 1
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
