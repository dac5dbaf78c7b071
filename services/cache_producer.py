"""CacheProducer: a Ray actor that serves a job's batches from an activation cache (storage/cache.py) instead of
a model, with the same interface and batch layout as the model-backed producer."""

from __future__ import annotations

import time

import numpy as np
import ray

from api.jobspec import JobSpec
from services.probe import expected_width
from services.remote_code import check_remote_code
from services.rows import STREAM_KEYS, hook_names


def open_cache_for(spec: JobSpec):
    """The cache a job reads (data.cache.read), checked against the job's model, sites, d and dtype."""
    from storage.cache import ActivationCache

    cache = ActivationCache(spec.data.cache.read)
    check_remote_code(spec.model)
    cache.check(model=spec.model.label, dtype=spec.model.dtype, d=expected_width(spec.model),
                hooks=hook_names(spec))
    return cache


class CacheProducer:
    """Serves a job's batches from an activation cache: its slice of the shards, shuffled across shards."""

    def __init__(self, spec_json: str, producer_index: int = 0, producers: int = 1, epochs: int | None = None):
        from storage.cache import ShardStream

        self.spec = JobSpec.model_validate_json(spec_json)
        self.index = producer_index
        self.cache = open_cache_for(self.spec)
        shards = list(range(len(self.cache.manifest["shards"])))[producer_index::producers]
        if not shards:
            raise ValueError(f"cluster.producers ({producers}): producer {producer_index} gets no shard of the "
                             f"{len(self.cache.manifest['shards'])} in {self.cache.uri}; use fewer producers")
        self.keys = [*hook_names(self.spec), *(k for k in STREAM_KEYS if k in self._stored_keys())]
        self.stream = ShardStream(self.cache, shards, self.spec.data.cache.shuffle_shards,
                                  seed=self.spec.training.seed * 1009 + producer_index, keys=self.keys, epochs=epochs)
        self.shards = len(shards)
        self.position = 0
        self.batches = 0
        self.read_seconds = 0.0

    def _stored_keys(self) -> list[str]:
        return [*self.cache.hook_names, *self.cache.manifest.get("extra_keys", [])]

    def info(self) -> dict:
        m = self.cache.manifest
        return {"num_layers": m["num_layers"], "kept_layers": 0, "d_model": m["d"], "hooks": hook_names(self.spec),
                "documents": self.shards, "device": "cache", "dtype": m["dtype"], "model": m["model"],
                "corpus_fingerprint": m.get("corpus_fingerprint"), "cache_uri": self.cache.uri,
                "cache_tokens": m["tokens"]}

    @ray.method(num_returns=2)
    def next_batch(self, offset: int | None = None, cursor: dict | None = None
                   ) -> tuple[dict, dict[str, np.ndarray]]:
        """As ActivationProducer.next_batch; a cache seeks by offset alone (`cursor` is not needed)."""
        start = self.position if offset is None else offset
        wanted = self.spec.training.batch_tokens
        started = time.perf_counter()
        batch = self.stream.rows(start, wanted) or {}
        self.read_seconds += time.perf_counter() - started
        rows = len(batch[self.keys[0]]) if batch else 0
        self.position = start + rows
        self.batches += 1
        meta = {"tokens": rows, "offset": start, "end": rows < wanted, "producer": self.index, "batch": self.batches,
                "epoch": self.stream.epoch_of(start), "forward_seconds": self.read_seconds,
                "tokens_forwarded": self.position, "seeks": 0, "cursor": None}
        return meta, batch

    def held_out_batch(self, tokens: int) -> dict[str, np.ndarray] | None:
        held_out = self.cache.held_out()
        if held_out is None:
            return None
        return {k: v[:tokens] for k, v in held_out.items() if k in self.keys}
