"""Activation producers: Ray actors that turn a slice of the data into activation batches.

`ActivationProducer` loads the model cut at the deepest hooked layer (on the GPU when its Ray resources hold
one, in the spec's dtype), packs tokenized documents into fixed context windows, runs the forward pass,
captures every hooked site in that one pass, drops special tokens (BOS, EOS, padding) and returns batches of
`batch_tokens` rows as numpy arrays: the caller owns the result. `CacheProducer` serves the same batches from
an activation cache (storage/cache.py) instead of a model.

Every batch is {hook name: float32 [rows, d]} plus TOKEN_IDS (int32 [rows]) and ROW_IDS (int64 [rows], the
producer's index in the high bits and the row's position in its stream in the low bits: unique across a job).
A producer's stream is deterministic, and `next_batch(offset)` returns the rows from that position on: a
producer restarted by Ray (it loses its state) seeks to the offset its caller asks for, so a job neither loses
nor repeats rows when a producer dies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import ray
import torch

from api.jobspec import JobSpec, ModelSpec
from services.data import corpus_fingerprint, load_documents, producer_slice, split_documents
from services.models import capture, load_language_model, run_blocks

TOKEN_IDS = "token_ids"
ROW_IDS = "row_ids"
STREAM_KEYS = (TOKEN_IDS, ROW_IDS)
ROW_ID_BITS = 40  # 2**40 rows per producer before its ids would collide with the next producer's
HELD_OUT_PRODUCER = (1 << 23) - 1  # the producer bits of held-out row ids
ALLOW_REMOTE_CODE_ENV = "SAEFORGE_ALLOW_TRUST_REMOTE_CODE"
PRODUCER_MAX_RESTARTS = 4


def remote_code_allowed() -> bool:
    return os.environ.get(ALLOW_REMOTE_CODE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_remote_code(model: ModelSpec) -> None:
    """Refuse trust_remote_code unless the server's operator allowed it (SAEFORGE_ALLOW_TRUST_REMOTE_CODE=1)."""
    if model.trust_remote_code and not remote_code_allowed():
        raise ValueError("model.trust_remote_code: this server does not run code shipped with models; set "
                         "model.trust_remote_code to false, or ask the operator to set "
                         f"{ALLOW_REMOTE_CODE_ENV}=1 on the server")


def producer_device() -> str:
    """'cuda' when this process may use a GPU (inside a Ray actor: only when Ray gave it one), else 'cpu'."""
    if not torch.cuda.is_available():
        return "cpu"
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return "cuda" if ray.get_gpu_ids() else "cpu"
    return "cuda"


def row_ids(producer: int, start: int, count: int) -> np.ndarray:
    return (np.int64(producer) << ROW_ID_BITS) + np.arange(start, start + count, dtype=np.int64)


def hook_names(spec: JobSpec) -> list[str]:
    return [hook.name for hook in spec.hooks()]


class TokenWindows:
    """Documents tokenized and packed into windows of `context_length` tokens, over `epochs` epochs (None: forever).

    Each window starts with BOS (when the tokenizer has one) and documents are separated by EOS; those
    positions carry no activation for the stream.
    """

    def __init__(self, tokenizer, documents: list[str], context_length: int, cycle: bool = True,
                 epochs: int | None = None):
        self.tokenizer = tokenizer
        self.documents = documents
        self.context_length = context_length
        self.epochs = epochs if epochs is not None else (None if cycle else 1)
        self.epoch = 0
        self.bos = tokenizer.bos_token_id
        self.separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.bos
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        body = self.context_length - (self.bos is not None)
        pending: list[int] = []
        self.epoch = 0
        while self.epochs is None or self.epoch < self.epochs:
            for doc in self.documents:
                pending.extend(self.tokenizer(doc, add_special_tokens=False)["input_ids"])
                if self.separator is not None:
                    pending.append(self.separator)
                while len(pending) >= body:
                    window, pending = pending[:body], pending[body:]
                    yield np.array(([self.bos] if self.bos is not None else []) + window, dtype=np.int64)
            self.epoch += 1

    def keep_mask(self, windows: np.ndarray) -> np.ndarray:
        """True where a position is a real token (not BOS/EOS/padding)."""
        return ~np.isin(windows, self.special_ids)


class ActivationProducer:
    def __init__(self, spec_json: str, producer_index: int = 0, producers: int = 1, epochs: int | None = None):
        self.spec = JobSpec.model_validate_json(spec_json)
        check_remote_code(self.spec.model)
        self.index = producer_index
        self.hooks = self.spec.hooks()
        deepest = max(hook.layer for hook in self.hooks)
        self.lm = load_language_model(self.spec.model, keep_layers=deepest + 1, device=producer_device())
        documents = load_documents(self.spec.data)
        self.fingerprint = corpus_fingerprint(documents)
        train, held_out = split_documents(documents, self.spec.data.holdout_fraction, self.spec.training.seed)
        mine = producer_slice(train, producer_index, producers)
        if not mine:
            raise ValueError(f"cluster.producers ({producers}): producer {producer_index} gets no document of the "
                             f"{len(train)} training documents; use fewer producers or more data")
        self.train_windows = TokenWindows(self.lm.tokenizer, [documents[i] for i in mine],
                                          self.spec.data.context_length, epochs=epochs)
        self.held_out_windows = TokenWindows(self.lm.tokenizer, [documents[i] for i in held_out],
                                             self.spec.data.context_length, epochs=1)
        self.documents = len(mine)
        self.batches = 0
        self.tokens_forwarded = 0
        self.forward_seconds = 0.0
        self.seeks = 0
        self._restart_stream()

    def _restart_stream(self) -> None:
        self._windows = iter(self.train_windows)
        self._carry: dict[str, list[np.ndarray]] = {}
        self._carry_rows = 0
        self._rows_forwarded = 0  # kept rows of the stream that went through the model (or were skipped)
        self.position = 0  # rows of the stream handed out

    def info(self) -> dict:
        return {"num_layers": self.lm.num_layers, "kept_layers": self.lm.kept_layers, "d_model": self.lm.d_model,
                "hooks": [hook.name for hook in self.hooks], "documents": self.documents,
                "device": str(self.lm.device), "dtype": self.spec.model.dtype, "model": self.spec.model.label,
                "corpus_fingerprint": self.fingerprint}

    def _forward(self, windows: np.ndarray, keep: np.ndarray, producer: int, first_row: int
                 ) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        device = self.lm.device
        ids = torch.from_numpy(windows)
        if device.type == "cuda":
            ids = ids.pin_memory().to(device, non_blocking=True)
        with torch.inference_mode(), capture(self.lm.model, self.hooks) as captured:
            run_blocks(self.lm, ids)
            mask = torch.from_numpy(keep).to(device)
            rows = {name: acts[mask].float().cpu().numpy() for name, acts in captured.items()}
        kept = int(keep.sum())
        rows[TOKEN_IDS] = windows[keep].astype(np.int32)
        rows[ROW_IDS] = row_ids(producer, first_row, kept)
        self.forward_seconds += time.perf_counter() - started
        self.tokens_forwarded += windows.size
        return rows

    def _take(self, rows_wanted: int) -> dict[str, np.ndarray]:
        batch = {}
        for name, parts in self._carry.items():
            joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
            batch[name], rest = joined[:rows_wanted], joined[rows_wanted:]
            self._carry[name] = [rest] if len(rest) else []
        self._carry_rows -= len(next(iter(batch.values())))
        return batch

    def _fill(self, rows_wanted: int) -> None:
        """Forward windows until the carry holds rows_wanted rows (or the stream ends)."""
        per_forward = max(1, self.spec.training.batch_tokens // self.spec.data.context_length)
        while self._carry_rows < rows_wanted:
            group = [w for _, w in zip(range(per_forward), self._windows, strict=False)]
            if not group:
                return
            windows = np.stack(group)
            rows = self._forward(windows, self.train_windows.keep_mask(windows), self.index, self._rows_forwarded)
            self._add(rows)

    def _add(self, rows: dict[str, np.ndarray]) -> None:
        count = len(rows[ROW_IDS])
        for name, array in rows.items():
            self._carry.setdefault(name, []).append(array)
        self._carry_rows += count
        self._rows_forwarded += count

    def _seek(self, offset: int) -> None:
        """Position the stream at row `offset`: windows before it are tokenized but not run through the model."""
        self.seeks += 1
        self._restart_stream()
        for window in self._windows:
            keep = self.train_windows.keep_mask(window[None])
            kept = int(keep.sum())
            if self._rows_forwarded + kept <= offset:
                self._rows_forwarded += kept
                continue
            rows = self._forward(window[None], keep, self.index, self._rows_forwarded)
            drop = offset - self._rows_forwarded
            self._add({k: v[drop:] for k, v in rows.items()})
            self._rows_forwarded += drop  # _add counted the rows after the boundary only
            break
        self.position = offset

    @ray.method(num_returns=2)
    def next_batch(self, offset: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
        """(metadata, {key: array with `batch_tokens` rows}) from row `offset` of this producer's stream (default:
        where the last call ended); two returns, so a buffer can read the small metadata without the arrays.
        At the end of a finite stream the batch is short, and empty with meta["end"] once nothing is left."""
        if offset is not None and offset != self.position:
            self._seek(offset)
        wanted = self.spec.training.batch_tokens
        self._fill(wanted)
        batch = self._take(min(wanted, self._carry_rows)) if self._carry_rows else {}
        rows = len(batch[ROW_IDS]) if batch else 0
        start = self.position
        self.position += rows
        self.batches += 1
        meta = {"tokens": rows, "offset": start, "end": rows < wanted, "producer": self.index,
                "batch": self.batches, "epoch": self.train_windows.epoch, "forward_seconds": self.forward_seconds,
                "tokens_forwarded": self.tokens_forwarded, "seeks": self.seeks}
        return meta, batch

    def held_out_batch(self, tokens: int) -> dict[str, np.ndarray] | None:
        """Activations of up to `tokens` tokens of held-out documents (never in the training stream)."""
        parts: dict[str, list[np.ndarray]] = {}
        have = 0
        windows = iter(self.held_out_windows)
        per_forward = max(1, self.spec.training.batch_tokens // self.spec.data.context_length)
        while have < tokens:
            group = [w for _, w in zip(range(per_forward), windows, strict=False)]
            if not group:
                break
            stacked = np.stack(group)
            rows = self._forward(stacked, self.held_out_windows.keep_mask(stacked), HELD_OUT_PRODUCER, have)
            for name, array in rows.items():
                parts.setdefault(name, []).append(array)
            have += len(rows[ROW_IDS])
        if not have:
            return None
        return {name: np.concatenate(arrays)[:tokens] for name, arrays in parts.items()}


def expected_width(model: ModelSpec) -> int | None:
    """d of the spec's model without loading its weights (None when its config cannot be read)."""
    if model.random is not None:
        return model.random.hidden_size
    try:
        from transformers import AutoConfig

        from services.models import _source

        folder, kwargs = _source(model)
        return int(AutoConfig.from_pretrained(folder, **kwargs).hidden_size)
    except Exception:  # noqa: BLE001 - a width we cannot read is simply not checked
        return None


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
    def next_batch(self, offset: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
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
                "tokens_forwarded": self.position, "seeks": 0}
        return meta, batch

    def held_out_batch(self, tokens: int) -> dict[str, np.ndarray] | None:
        held_out = self.cache.held_out()
        if held_out is None:
            return None
        return {k: v[:tokens] for k, v in held_out.items() if k in self.keys}


def start_producers(spec: JobSpec, gpu: bool) -> list:
    """The job's producer actors (model or cache), restartable: Ray restarts a dead one and retries its calls."""
    n = spec.cluster.producers
    spec_json = spec.model_dump_json()
    options = {"num_cpus": 1, "max_restarts": PRODUCER_MAX_RESTARTS, "max_task_retries": PRODUCER_MAX_RESTARTS}
    if spec.data.cache.read is not None:
        open_cache_for(spec)  # refuse a mismatching cache here, with its message, before any actor starts
        actor = ray.remote(CacheProducer).options(**options, num_gpus=0)
    else:
        check_remote_code(spec.model)
        if spec.model.trust_remote_code:  # the producers check too: tell them what the server allowed
            options["runtime_env"] = {"env_vars": {ALLOW_REMOTE_CODE_ENV: "1"}}
        actor = ray.remote(ActivationProducer).options(**options, num_gpus=1 if gpu else 0)
    return [actor.remote(spec_json, i, n) for i in range(n)]
