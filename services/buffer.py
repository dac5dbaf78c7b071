"""ActivationBuffer: the object-store channel between producers and trainer ranks.

The buffer pulls batches from the producers (it makes the calls, so it owns the results: a producer that
dies does not take queued batches with it), asking each producer for the rows from an explicit offset of its
stream, two calls in flight. A producer that dies is restarted by Ray and the call retried; the restarted
producer seeks to the offset, so no row is lost or repeated.

Rows are mixed before hand-out: a reservoir holds the rows of the last `mix_batches` batches; each new batch
takes the place of `batch_rows` rows drawn at random from the reservoir, and those rows leave as the next
batch. A trainer therefore never sees one document's tokens in a row, and every row is handed out exactly once
(at the end of a finite stream the reservoir is flushed). Mixed batches are `ray.put` by the buffer (so it owns
them) into a bounded pool: when the pool is full the producers are not asked for more (back-pressure).
Consumers get [ObjectRef] of {key: array} and read the arrays zero-copy from the node's object store.

With a cache configured the buffer also writes every batch it hands out to an activation cache
(storage/cache.py), and completes the cache when `total_tokens` have been handed out (or on close_cache()).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable

import numpy as np
import ray

END = "end"
RATE_WINDOW_S = 30.0


class _Rate:
    """Tokens per second over the last RATE_WINDOW_S seconds."""

    def __init__(self):
        self.samples: collections.deque = collections.deque()
        self.total = 0

    def add(self, tokens: int) -> None:
        self.total += tokens
        now = time.monotonic()
        self.samples.append((now, self.total))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()

    def per_s(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / max(t1 - t0, 1e-9)


class ActivationBuffer:
    def __init__(self, producers: list, capacity: int, mix_batches: int = 1, batch_rows: int | None = None,
                 seed: int = 0, total_tokens: int | None = None, cache: dict | None = None,
                 held_out: list | None = None, in_flight: int = 2):
        self.producers = producers
        self._shared: dict[tuple[int, int], list] = {}  # (group, step) -> [future of the batch, consumers left]
        self.pool: asyncio.Queue = asyncio.Queue(maxsize=capacity)
        self.capacity = capacity
        self.mix_batches = mix_batches
        self.batch_rows = batch_rows
        self.total_tokens = total_tokens
        self.in_flight = in_flight
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.produced = _Rate()
        self.consumed = _Rate()
        self.batches_out = 0
        self.producer_meta: dict[int, dict] = {}
        self.offsets = [0] * len(producers)  # rows received from each producer
        self.retries = 0
        self.mix_seconds = 0.0
        self.batches_mixed = 0
        self._rng = np.random.default_rng([seed, 7])
        self._reservoir: dict[str, np.ndarray] | None = None
        self._fill = 0
        self._leftovers: list[dict[str, np.ndarray]] = []
        self._done: set[int] = set()
        self._ended = False
        self._lock = asyncio.Lock()
        self._pullers: list[asyncio.Task] = []
        # activation cache
        self._cache = cache
        self._held_out = held_out
        self._cache_queue: asyncio.Queue | None = None
        self._cache_task: asyncio.Task | None = None
        self._cache_writer = None
        self._cache_manifest: dict | None = None
        self._cache_closing: asyncio.Task | None = None

    # -- pulling -------------------------------------------------------------------------------------------------

    async def _pull(self, index: int) -> None:
        producer = self.producers[index]
        pending: collections.deque = collections.deque()
        step = self.batch_rows or 0
        failures = 0

        def submit(offset: int) -> None:
            pending.append((offset, producer.next_batch.remote(offset)))

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
                    step = self.batch_rows = self.batch_rows or meta["tokens"]
                self.offsets[index] = offset + meta["tokens"]
                self.producer_meta[index] = meta
                if meta["tokens"]:
                    self.produced.add(meta["tokens"])
                    await self._ingest(batch)
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

    async def _ingest(self, batch: dict[str, np.ndarray]) -> None:
        async with self._lock:
            refs = await asyncio.to_thread(self._mix_and_put, batch, False)
        for ref, rows in refs:
            await self.pool.put((ref, rows))

    async def _finish_stream(self) -> None:
        async with self._lock:
            refs = await asyncio.to_thread(self._mix_and_put, None, True)
        for ref, rows in refs:
            await self.pool.put((ref, rows))
        await self.pool.put((END, 0))

    def _mix_and_put(self, batch: dict[str, np.ndarray] | None, flush: bool) -> list[tuple]:
        started = time.perf_counter()
        out = self._flush() if flush else self._mix(batch)
        refs = [(ray.put(b), len(next(iter(b.values())))) for b in out]
        self.mix_seconds += time.perf_counter() - started
        self.batches_mixed += len(out)
        return refs

    def _mix(self, batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Swap the new batch into the reservoir; the rows it replaces are the batch handed out."""
        n = len(next(iter(batch.values())))
        if n != self.batch_rows:  # the short last batch of a finite stream: handed out with the flush
            self._leftovers.append({k: np.array(v) for k, v in batch.items()})
            return []
        size = self.mix_batches * n
        if self._reservoir is None:
            self._reservoir = {k: np.empty((size, *v.shape[1:]), dtype=v.dtype) for k, v in batch.items()}
        if self._fill < size:
            for k, v in batch.items():
                self._reservoir[k][self._fill:self._fill + n] = v
            self._fill += n
            return []
        slots = np.sort(self._rng.choice(size, n, replace=False))
        out = {}
        for k, v in batch.items():
            out[k] = self._reservoir[k][slots]
            self._reservoir[k][slots] = v
        return [out]

    def _flush(self) -> list[dict[str, np.ndarray]]:
        parts = list(self._leftovers)
        if self._reservoir is not None and self._fill:
            parts.append({k: v[:self._fill] for k, v in self._reservoir.items()})
        self._reservoir, self._fill, self._leftovers = None, 0, []
        if not parts:
            return []
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        rows = len(next(iter(joined.values())))
        order = self._rng.permutation(rows)
        step = self.batch_rows or rows
        return [{k: v[order[i:i + step]] for k, v in joined.items()} for i in range(0, rows, step)]

    def _start(self) -> None:
        if not self._pullers:
            self._pullers = [asyncio.get_running_loop().create_task(self._pull(i))
                             for i in range(len(self.producers))]

    # -- handing out ---------------------------------------------------------------------------------------------

    async def next(self) -> list:
        """The next batch as [ObjectRef] (wrapped in a list so Ray hands over the reference, not the value);
        [] once a finite stream has ended."""
        self._start()
        while True:
            if self.error is not None:
                raise RuntimeError(f"activation producer failed: {self.error}") from self.error
            if self._ended:
                return []
            try:
                batch_ref, rows = await asyncio.wait_for(self.pool.get(), timeout=1.0)
                break
            except asyncio.TimeoutError:
                continue
        if isinstance(batch_ref, str) and batch_ref == END:
            self._ended = True
            if self._cache is not None:
                await self.close_cache()
            return []
        self.consumed.add(rows)
        self.batches_out += 1
        if self._cache is not None and self._cache_closing is None:
            self._write_to_cache(batch_ref)
            if self.total_tokens is not None and self.consumed.total >= self.total_tokens:
                await self.close_cache()  # the last batch waits until the cache is complete
        return [batch_ref]

    async def next_shared(self, group: int, step: int, members: int) -> list:
        """The batch of step `step` for a group of `members` consumers that share batches (the latent shards of
        one data-parallel replica): the first to ask takes the next batch, the others get the same ObjectRef."""
        key = (group, step)
        if key not in self._shared:
            self._shared[key] = [asyncio.ensure_future(self.next()), members]
        entry = self._shared[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._shared[key]
        return await asyncio.shield(entry[0])

    async def start(self) -> None:
        """Start pulling now (otherwise the first next() does)."""
        self._start()

    # -- the activation cache ------------------------------------------------------------------------------------

    def _write_to_cache(self, ref) -> None:
        if self._cache_queue is None:
            self._cache_queue = asyncio.Queue()
            self._cache_task = asyncio.get_running_loop().create_task(self._cache_loop())
        self._cache_queue.put_nowait(ref)

    async def _writer(self, first: dict[str, np.ndarray]):
        from storage.cache import CacheWriter

        if self._cache_writer is None:
            info = await self._cache["info"][0] if self._cache.get("info") else {}
            manifest = {**self._cache.get("manifest", {})}
            for key in ("model", "num_layers", "corpus_fingerprint"):
                manifest.setdefault(key, info.get(key))
            manifest.setdefault("d", info.get("d_model"))
            hooks = [h["name"] for h in manifest["hooks"]]
            manifest["extra_keys"] = [k for k in first if k not in hooks]
            self._cache_writer = CacheWriter(self._cache["uri"], manifest, hooks, self._cache["shard_tokens"],
                                             dtype=self._cache.get("dtype", "float32"))
        return self._cache_writer

    async def _cache_loop(self) -> None:
        while True:
            ref = await self._cache_queue.get()
            if ref is None:
                return
            batch = await ref
            writer = await self._writer(batch)
            await asyncio.to_thread(writer.add, batch)

    async def close_cache(self) -> dict | None:
        """Write what is left, the held-out set and the complete manifest; returns the manifest."""
        if self._cache is None:
            return None
        if self._cache_closing is None:
            self._cache_closing = asyncio.get_running_loop().create_task(self._close_cache())
        return await asyncio.shield(self._cache_closing)

    async def _close_cache(self) -> dict | None:
        if self._cache_queue is not None:
            self._cache_queue.put_nowait(None)
            await self._cache_task
        if self._cache_writer is None:
            return None
        if self._held_out:
            held = await self._held_out[0]
            if held:
                await asyncio.to_thread(self._cache_writer.add_held_out, held)
        self._cache_manifest = await asyncio.to_thread(self._cache_writer.close)
        return self._cache_manifest

    async def producer_state(self) -> dict:
        """Per producer: rows received (its offset) and its latest metadata."""
        return {i: {"offset": self.offsets[i], **self.producer_meta.get(i, {})} for i in range(len(self.producers))}

    # -- statistics ----------------------------------------------------------------------------------------------

    async def stats(self) -> dict:
        """Live figures, all numbers (the runner logs them as MLflow metrics)."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        size = self.mix_batches * (self.batch_rows or 0)
        return {"pool_batches": self.pool.qsize(), "pool_capacity": self.capacity,
                "pool_fill": self.pool.qsize() / self.capacity,
                "mix_rows": self._fill, "mix_fill": self._fill / size if size else 0.0,
                "produced_tokens": self.produced.total, "consumed_tokens": self.consumed.total,
                "produced_tokens_per_s": self.produced.per_s(), "consumed_tokens_per_s": self.consumed.per_s(),
                "produced_tokens_per_s_mean": self.produced.total / elapsed,
                "consumed_tokens_per_s_mean": self.consumed.total / elapsed,
                "batches_out": self.batches_out, "producer_retries": self.retries,
                "producer_seeks": sum(m.get("seeks", 0) for m in self.producer_meta.values()),
                "mix_ms_per_batch": 1000 * self.mix_seconds / max(self.batches_mixed, 1),
                "cache_tokens_written": (self._cache_writer.manifest["tokens"] if self._cache_writer else 0),
                "epochs": max((m["epoch"] for m in self.producer_meta.values()), default=0)}


def log_stats_periodically(buffer, log: Callable[[dict, int], None], every_s: float = 10.0,
                           stop: threading.Event | None = None) -> threading.Thread:
    """A daemon thread that logs the buffer's stats (as buffer_<name>, step = batches handed out) until the
    buffer is gone or `stop` is set; it never raises into the job."""
    stop = stop or threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                stats = ray.get(buffer.stats.remote(), timeout=every_s)
                log({f"buffer_{k}": v for k, v in stats.items()}, int(stats["batches_out"]))
            except Exception:  # noqa: BLE001 - the buffer ended with the job, or tracking is busy: stop quietly
                return

    thread = threading.Thread(target=loop, name="buffer-stats", daemon=True)
    thread.start()
    return thread


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
