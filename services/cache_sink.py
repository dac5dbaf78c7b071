"""Writing the batches a buffer hands out to an activation cache (storage/cache.py), off the buffer's event
loop: a queue of ObjectRefs drained by one task, the held-out set and the complete manifest at the close."""

from __future__ import annotations

import asyncio

import numpy as np


class CacheSink:
    def __init__(self, cache: dict, held_out: list | None):
        self.cache = cache  # {"uri", "shard_tokens", "dtype", "info": [ref of a producer's info()], "manifest"}
        self.held_out = held_out  # [ref of the held-out batch] or None
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.writer = None
        self.manifest: dict | None = None
        self.closing: asyncio.Task | None = None

    def tokens_written(self) -> int:
        return self.writer.manifest["tokens"] if self.writer else 0

    def write(self, ref) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self.queue.put_nowait(ref)

    async def _writer(self, first: dict[str, np.ndarray]):
        from storage.cache import CacheWriter

        if self.writer is None:
            info = await self.cache["info"][0] if self.cache.get("info") else {}
            manifest = {**self.cache.get("manifest", {})}
            for key in ("model", "num_layers", "corpus_fingerprint"):
                manifest.setdefault(key, info.get(key))
            manifest.setdefault("d", info.get("d_model"))
            hooks = [h["name"] for h in manifest["hooks"]]
            manifest["extra_keys"] = [k for k in first if k not in hooks]
            self.writer = CacheWriter(self.cache["uri"], manifest, hooks, self.cache["shard_tokens"],
                                      dtype=self.cache.get("dtype", "float32"))
        return self.writer

    async def _loop(self) -> None:
        while True:
            ref = await self.queue.get()
            if ref is None:
                return
            batch = await ref
            writer = await self._writer(batch)
            await asyncio.to_thread(writer.add, batch)

    async def close(self) -> dict | None:
        """Write what is left, the held-out set and the complete manifest (once); returns the manifest."""
        if self.closing is None:
            self.closing = asyncio.get_running_loop().create_task(self._close())
        return await asyncio.shield(self.closing)

    async def _close(self) -> dict | None:
        if self.queue is not None:
            self.queue.put_nowait(None)
            await self.task
        if self.writer is None:
            return None
        if self.held_out:
            held = await self.held_out[0]
            if held:
                await asyncio.to_thread(self.writer.add_held_out, held)
        self.manifest = await asyncio.to_thread(self.writer.close)
        return self.manifest
