"""ActivationBuffer: the object-store channel between producers and trainer ranks.

The buffer pulls batches from the producers (it makes the calls, so it owns the results: a producer that
dies does not take queued batches with it), keeps at most `capacity` of them (back-pressure: producers are
not asked for more while the pool is full) and hands ObjectRefs to consumers, which read the numpy arrays
zero-copy from the node's object store.
"""

from __future__ import annotations

import asyncio
import time


class ActivationBuffer:
    def __init__(self, producers: list, capacity: int):
        self.producers = producers
        self.pool: asyncio.Queue = asyncio.Queue(maxsize=capacity)
        self.capacity = capacity
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.tokens_in = 0
        self.tokens_out = 0
        self.batches_out = 0
        self.producer_meta: dict[int, dict] = {}
        self._pullers: list[asyncio.Task] = []

    async def _pull(self, index: int) -> None:
        producer = self.producers[index]
        try:
            while True:
                meta_ref, batch_ref = producer.next_batch.remote()
                meta = await meta_ref
                await self.pool.put((batch_ref, meta))
                self.tokens_in += meta["tokens"]
                self.producer_meta[index] = meta
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # surfaced to the consumer on its next call
            self.error = error

    def _start(self) -> None:
        if not self._pullers:
            self._pullers = [asyncio.get_running_loop().create_task(self._pull(i))
                             for i in range(len(self.producers))]

    async def next(self) -> list:
        """The next batch as [ObjectRef] (wrapped in a list so Ray hands over the reference, not the value)."""
        self._start()
        while True:
            if self.error is not None:
                raise RuntimeError(f"activation producer failed: {self.error}") from self.error
            try:
                batch_ref, meta = await asyncio.wait_for(self.pool.get(), timeout=1.0)
                break
            except asyncio.TimeoutError:
                continue
        self.tokens_out += meta["tokens"]
        self.batches_out += 1
        return [batch_ref]

    async def stats(self) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {"pool_batches": self.pool.qsize(), "pool_capacity": self.capacity,
                "produced_tokens": self.tokens_in, "consumed_tokens": self.tokens_out,
                "produced_tokens_per_s": self.tokens_in / elapsed, "consumed_tokens_per_s": self.tokens_out / elapsed,
                "epochs": max((m["epoch"] for m in self.producer_meta.values()), default=0)}
