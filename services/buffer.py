"""ActivationBuffer: the object-store channel between producers and trainer ranks.

The buffer pulls batches from the producers (it makes the calls, so it owns the results: a producer that
dies does not take queued batches with it), asking each producer for the rows from an explicit offset of its
stream, two calls in flight. A producer that dies is restarted by Ray and the call retried; the restarted
producer seeks to the offset, so no row is lost or repeated.

Rows are mixed before hand-out (services/mixing.py), and every row is handed out exactly once. Mixed batches
are `ray.put` by the buffer (so it owns them) into a bounded queue of ready batches: when it is full the
producers are not asked for more (back-pressure). Consumers get [ObjectRef] of {key: array} and read the
arrays zero-copy from the node's object store.

Batches are numbered in the order they leave the queue. Trainers ask for batch number `step · replicas +
replica` (`batch`), so the latent shards of one replica share a batch and the stream a job sees does not depend
on which rank asks first. `snapshot(index)` returns what a checkpoint needs to continue the stream exactly from
batch `index` — the rows not yet handed out (ready batches and the reservoir), the mixing RNG and every
producer's offset — and `restore` puts the buffer back there, on a restarted worker group or a new job.

With a cache configured the buffer also writes every batch it hands out to an activation cache
(services/cache_sink.py), and completes the cache when `total_tokens` have been handed out (or on close_cache()).
Its live figures are `stats()`; services/buffer_stats.py logs them while a job runs.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import numpy as np
import ray

from services.buffer_stats import Rate
from services.cache_sink import CacheSink
from services.mixing import Mixer

# Taken batches kept for consumers that share them and for a snapshot behind the newest batch: the ranks of a job
# run at most a step apart (their collectives join them), so a few steps of every replica are plenty.
RETAINED_BATCHES = 16


class ActivationBuffer:
    def __init__(self, producers: list, capacity: int, mix_batches: int = 1, batch_rows: int | None = None,
                 seed: int = 0, total_tokens: int | None = None, cache: dict | None = None,
                 held_out: list | None = None, in_flight: int = 2):
        self.producers = producers
        self.ready: collections.deque = collections.deque()  # (ref, rows) mixed, not yet handed out
        self._taken: dict[int, ray.ObjectRef] = {}  # batch number -> ref, the last RETAINED_BATCHES taken
        self._taken_rows: dict[int, int] = {}  # batch number -> its rows
        self._next_index = 0  # the number the next batch leaving `ready` gets
        self._stream_over = False  # a finite stream ended and was flushed into `ready`
        self._changed = asyncio.Condition()
        self.capacity = capacity
        self.mixer = Mixer(mix_batches, batch_rows, seed)
        self.total_tokens = total_tokens
        self.in_flight = in_flight
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.produced = Rate()
        self.consumed = Rate()
        self.batches_out = 0
        self.producer_meta: dict[int, dict] = {}
        self.offsets = [0] * len(producers)  # rows received from each producer
        self.cursors: list[dict | None] = [None] * len(producers)  # each producer's latest cursor (a seek hint)
        self.retries = 0
        self.mix_seconds = 0.0
        self.batches_mixed = 0
        self._done: set[int] = set()
        self._ended = False
        self._lock = asyncio.Lock()
        self._pullers: list[asyncio.Task] = []
        self._cache = CacheSink(cache, held_out) if cache is not None else None
        self._cached_batches = 0  # batches written to the cache: a replay after restore() skips them

    # -- pulling -------------------------------------------------------------------------------------------------

    async def _pull(self, index: int) -> None:
        producer = self.producers[index]
        pending: collections.deque = collections.deque()
        step = self.mixer.batch_rows or 0
        failures = 0

        def submit(offset: int) -> None:
            pending.append((offset, producer.next_batch.remote(offset, self.cursors[index])))

        try:
            submit(self.offsets[index])
            while pending:
                offset, (meta_ref, batch_ref) = pending[0]
                try:
                    meta = await meta_ref
                    batch = await batch_ref if meta["tokens"] else {}
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
                    # Ray retries calls on a restarted producer; this is the fallback when it gave up. A producer
                    # whose __init__ failed (bad data, a refused spec) will not come back: fail at once.
                    if getattr(error, "actor_init_failed", False):
                        raise
                    failures += 1
                    self.retries += 1
                    if failures > 8:
                        raise
                    pending.clear()
                    await asyncio.sleep(min(0.5 * failures, 5.0))
                    submit(self.offsets[index])
                    continue
                pending.popleft()
                failures = 0
                if not step:  # first batch: learn the batch size, then keep `in_flight` calls going
                    step = self.mixer.batch_rows = self.mixer.batch_rows or meta["tokens"]
                self.producer_meta[index] = meta
                if meta["tokens"]:
                    self.produced.add(meta["tokens"])
                    await self._ingest(index, offset + meta["tokens"], meta.get("cursor"), batch)
                    await self._wait_for(lambda: len(self.ready) < self.capacity)  # back-pressure
                else:
                    self.offsets[index] = offset
                if meta["end"]:
                    break
                while len(pending) < self.in_flight:
                    submit(pending[-1][0] + step if pending else self.offsets[index])
            self._done.add(index)
            if len(self._done) == len(self.producers):
                await self._finish_stream()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # surfaced to the consumer on its next call
            self.error = error
            await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def _ingest(self, index: int, offset: int, cursor: dict | None, batch: dict[str, np.ndarray]) -> None:
        # One step under the lock: the reservoir, the ready queue and the producer's offset move together, so a
        # snapshot never sees rows that are in none of them or in two.
        async with self._lock:
            refs = await asyncio.to_thread(self._mix_and_put, batch, False)
            self.ready.extend(refs)
            self.offsets[index] = offset
            self.cursors[index] = cursor
        await self._notify()

    async def _finish_stream(self) -> None:
        async with self._lock:
            self.ready.extend(await asyncio.to_thread(self._mix_and_put, None, True))
            self._stream_over = True
        await self._notify()

    def _mix_and_put(self, batch: dict[str, np.ndarray] | None, flush: bool) -> list[tuple]:
        started = time.perf_counter()
        out = self.mixer.flush() if flush else self.mixer.mix(batch)
        refs = [(ray.put(b), len(next(iter(b.values())))) for b in out]
        self.mix_seconds += time.perf_counter() - started
        self.batches_mixed += len(out)
        return refs

    def _start(self) -> None:
        if not self._pullers:
            self._pullers = [asyncio.get_running_loop().create_task(self._pull(i))
                             for i in range(len(self.producers))]

    # -- handing out ---------------------------------------------------------------------------------------------

    async def _take(self) -> int | None:
        """Move the next ready batch to `_taken` under the next number; None once a finite stream has ended."""
        self._start()
        await self._wait_for(lambda: self.ready or self._stream_over or self.error is not None)
        if self.error is not None:
            raise RuntimeError(f"activation producer failed: {self.error}") from self.error
        if not self.ready:
            if not self._ended:
                self._ended = True
                if self._cache is not None:
                    await self.close_cache()
            return None
        ref, rows = self.ready.popleft()
        index = self._next_index
        self._taken[index], self._taken_rows[index] = ref, rows
        self._next_index += 1
        for old in [i for i in self._taken if i < index - RETAINED_BATCHES]:
            del self._taken[old], self._taken_rows[old]  # drop the buffer's reference: the object store may free it
        self.consumed.add(rows)
        self.batches_out = self._next_index
        await self._notify()  # room for the pullers
        if self._cache is not None and self._cache.closing is None and index >= self._cached_batches:
            self._cached_batches = index + 1
            self._cache.write(ref)
            if self.total_tokens is not None and self.consumed.total >= self.total_tokens:
                await self.close_cache()  # the last batch waits until the cache is complete
        return index

    async def next(self) -> list:
        """The next batch as [ObjectRef] (wrapped in a list so Ray hands over the reference, not the value);
        [] once a finite stream has ended."""
        index = await self._take()
        return [] if index is None else [self._taken[index]]

    async def batch(self, index: int, group: int = 1) -> list:
        """Batch number `index` as [ObjectRef]; every consumer that asks for the same number (the latent shards
        of one replica) gets the same batch. Numbers below `index` are taken on the way and kept for the
        consumers that will ask for them. `group`: the batches of one training step (its replicas): each is
        handed out only when all of them are there and full, so at the end of a finite stream every rank of a
        step gets [] together and the job ends at its last full step."""
        first = index - index % group
        while first + group > self._next_index:
            if await self._take() is None:
                return []
        if any(i not in self._taken for i in range(first, first + group)):
            raise RuntimeError(f"batch {index} is gone: the buffer keeps the last {RETAINED_BATCHES} batches and "
                               f"is at batch {self._next_index}")
        if any(self._taken_rows[i] != self.mixer.batch_rows for i in range(first, first + group)):
            return []  # the short last batch of a finite stream
        return [self._taken[index]]

    # -- checkpoints ---------------------------------------------------------------------------------------------

    async def snapshot(self, index: int) -> dict:
        """The stream's state as if batch `index` were the next to leave: the batches from `index` on (taken
        or ready), the reservoir, leftovers, the mixing RNG and each producer's offset."""
        async with self._lock:
            if index > self._next_index or (index < self._next_index and index not in self._taken):
                raise RuntimeError(f"cannot snapshot the stream at batch {index}: the buffer holds batches "
                                   f"{min(self._taken, default=self._next_index)}..{self._next_index - 1}")
            refs = [self._taken[i] for i in range(index, self._next_index)] + [ref for ref, _ in self.ready]
            state = {**self.mixer.state(), "offsets": list(self.offsets), "cursors": list(self.cursors),
                     "stream_over": self._stream_over}
        state["pending"] = [await ref for ref in refs]
        return state

    async def restore(self, state: dict, index: int) -> None:
        """Continue the stream from a snapshot; the first pending batch becomes number `index`. Pullers stop,
        batches handed out since are dropped, producers are asked again from the saved offsets."""
        async with self._lock:  # no mixing in flight while the state is replaced
            for task in self._pullers:
                task.cancel()
            await asyncio.gather(*self._pullers, return_exceptions=True)
            self._pullers = []
            self.ready.clear()
            self._taken.clear()
            self._taken_rows.clear()
            self._next_index = self.batches_out = index
            self._cached_batches = max(self._cached_batches, index)
            for batch in state["pending"]:
                self.ready.append((ray.put(batch), len(next(iter(batch.values())))))
            self.mixer.load(state)
            self.offsets = list(state["offsets"])
            self.cursors = list(state.get("cursors") or [None] * len(self.offsets))
            self._stream_over, self._ended, self._done, self.error = state["stream_over"], False, set(), None
            if not self._stream_over:
                self._start()
        await self._notify()

    # -- the activation cache ------------------------------------------------------------------------------------

    async def close_cache(self) -> dict | None:
        """Write what is left, the held-out set and the complete manifest; returns the manifest."""
        return None if self._cache is None else await self._cache.close()

    async def producer_state(self) -> dict:
        """Per producer: rows received (its offset) and its latest metadata."""
        return {i: {"offset": self.offsets[i], **self.producer_meta.get(i, {})} for i in range(len(self.producers))}

    # -- statistics ----------------------------------------------------------------------------------------------

    async def stats(self) -> dict:
        """Live figures, all numbers (the runner logs them as MLflow metrics)."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {"pool_batches": len(self.ready), "pool_capacity": self.capacity,
                "pool_fill": len(self.ready) / self.capacity,
                "mix_rows": self.mixer.fill, "mix_fill": self.mixer.fraction_full(),
                "produced_tokens": self.produced.total, "consumed_tokens": self.consumed.total,
                "produced_tokens_per_s": self.produced.per_s(), "consumed_tokens_per_s": self.consumed.per_s(),
                "produced_tokens_per_s_mean": self.produced.total / elapsed,
                "consumed_tokens_per_s_mean": self.consumed.total / elapsed,
                "batches_out": self.batches_out, "producer_retries": self.retries,
                "producer_seeks": sum(m.get("seeks", 0) for m in self.producer_meta.values()),
                "mix_ms_per_batch": 1000 * self.mix_seconds / max(self.batches_mixed, 1),
                "cache_tokens_written": self._cache.tokens_written() if self._cache else 0,
                "epochs": max((m["epoch"] for m in self.producer_meta.values()), default=0)}


def start_buffer(spec, producers: list, held_out=None, job_id: str | None = None, with_cache: bool = True):
    """The job's buffer actor; with data.cache.write it writes the stream handed out to the cache."""
    total = getattr(spec, "total_tokens", None)  # tokens the job's trainers take in all
    if total is None:
        total = spec.training.steps * spec.training.batch_tokens * spec.cluster.trainer_ranks
    cache = None
    if with_cache and spec.data.cache.write is not None:
        hooks = [{"name": h.name, "layer": h.layer, "site": h.site} for h in spec.hooks()]
        cache = {"uri": spec.data.cache.write, "shard_tokens": spec.data.cache.shard_tokens,
                 "dtype": spec.model.dtype, "info": [producers[0].info.remote()],
                 "manifest": {"hooks": hooks, "context_length": spec.data.context_length,
                              "data_source": spec.data.source, "job_id": job_id,
                              "batch_tokens": spec.training.batch_tokens}}
    return ray.remote(ActivationBuffer).options(num_cpus=0).remote(
        producers, spec.cluster.buffer_batches, mix_batches=spec.data.mix_batches,
        batch_rows=spec.training.batch_tokens, seed=spec.training.seed, total_tokens=total, cache=cache,
        held_out=[held_out] if held_out is not None else None)
