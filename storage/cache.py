"""Activation caches: a stream of activation batches stored as safetensors shards plus a manifest.

Layout under a `file://` or `s3://` URI:

    manifest.json                     what the cache holds (below); written after every shard, `complete` at the end
    shard-00000.safetensors, ...      one tensor per key: activations [rows, d] per hook name, plus token ids and
                                      row ids [rows] when the stream carries them
    held_out.safetensors              (optional) held-out activations for evaluation, never in the shards

The manifest names the model, its depth, the hooks (name, layer, site), d, the stored dtype, the token count,
the corpus fingerprint and the shard list with each shard's row count. Readers refuse a cache whose model,
sites, d or dtype differ from what the job asks for, or that is incomplete.

Reading shuffles across shards: per epoch the shards are put in a seeded random order, taken in groups of
`group` shards, and the rows of a group are permuted together; any row offset of that sequence can be reached
directly (producers restarted mid-job resume at their offset).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from storage.arrays import to_torch
from storage.uri import filesystem

MANIFEST = "manifest.json"
HELD_OUT = "held_out.safetensors"
FORMAT = "saeforge-activation-cache"
VERSION = 1
STORED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tensor(array: np.ndarray, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = to_torch(np.ascontiguousarray(array))  # bf16 batches of a GPU stream included
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _arrays(data: bytes) -> dict[str, np.ndarray]:
    return {k: (t.float() if t.is_floating_point() else t).numpy() for k, t in load_safetensors_bytes(data).items()}


class CacheWriter:
    """Accumulates batches ({key: array with rows first}) and writes a shard every `shard_tokens` rows.

    `activation_keys` are stored in `dtype` (the model's dtype: a float32 copy of bf16/fp16 activations converts
    back losslessly); other keys (token ids, row ids) keep their own dtype.
    """

    def __init__(self, uri: str, manifest: dict[str, Any], activation_keys: list[str], shard_tokens: int,
                 dtype: str = "float32"):
        if dtype not in STORED_DTYPES:
            raise ValueError(f"cache dtype {dtype!r}: choose one of {sorted(STORED_DTYPES)}")
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)
        self.activation_keys = list(activation_keys)
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.manifest = {"format": FORMAT, "version": VERSION, "complete": False, **manifest, "dtype": dtype,
                         "tokens": 0, "shards": [], "held_out": None, "created": time.time()}
        self._parts: list[dict[str, np.ndarray]] = []
        self._rows = 0
        self.fs.makedirs(self.root, exist_ok=True)
        if self.fs.exists(f"{self.root}/{MANIFEST}"):
            raise FileExistsError(f"data.cache.write: {uri} already holds an activation cache; choose another URI "
                                  "or delete it")

    def _encode(self, batch: dict[str, np.ndarray]) -> bytes:
        stored = STORED_DTYPES[self.dtype]
        return save_safetensors_bytes({k: _tensor(v, stored if k in self.activation_keys else None)
                                       for k, v in batch.items()})

    def add(self, batch: dict[str, np.ndarray]) -> None:
        missing = [k for k in self.activation_keys if k not in batch]
        if missing:
            raise ValueError(f"activation cache: the batch lacks {missing}")
        self._parts.append(batch)
        self._rows += len(batch[self.activation_keys[0]])
        while self._rows >= self.shard_tokens:
            self._write_shard(self.shard_tokens)

    def _take(self, rows: int) -> dict[str, np.ndarray]:
        joined = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
        rest = {k: v[rows:] for k, v in joined.items()}
        self._parts = [rest] if len(next(iter(rest.values()))) else []
        self._rows -= rows
        return {k: v[:rows] for k, v in joined.items()}

    def _write_shard(self, rows: int) -> None:
        shard = self._take(rows)
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        self.fs.pipe_file(f"{self.root}/{name}", self._encode(shard))
        self.manifest["shards"].append({"file": name, "tokens": rows})
        self.manifest["tokens"] += rows
        self._write_manifest()

    def add_held_out(self, batch: dict[str, np.ndarray]) -> None:
        rows = len(batch[self.activation_keys[0]])
        self.fs.pipe_file(f"{self.root}/{HELD_OUT}", self._encode(batch))
        self.manifest["held_out"] = {"file": HELD_OUT, "tokens": rows}
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.fs.pipe_file(f"{self.root}/{MANIFEST}", json.dumps(self.manifest, indent=2).encode())

    def close(self) -> dict[str, Any]:
        """Write the last (short) shard and the manifest marked complete; returns the manifest."""
        if self._rows:
            self._write_shard(self._rows)
        self.manifest["complete"] = True
        self._write_manifest()
        return self.manifest


class ActivationCache:
    """A cache opened for reading: its manifest, shards and held-out set."""

    def __init__(self, uri: str, field: str = "data.cache.read"):
        self.uri = uri.rstrip("/")
        self.field = field
        self.fs, self.root = filesystem(self.uri)
        path = f"{self.root}/{MANIFEST}"
        if not self.fs.exists(path):
            raise ValueError(f"{field}: no {MANIFEST} at {uri}; give the URI a job wrote with data.cache.write")
        self.manifest = json.loads(self.fs.cat_file(path))
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{field}: {uri} is not a saeforge activation cache (format "
                             f"{self.manifest.get('format')!r})")
        if not self.manifest.get("complete"):
            raise ValueError(f"{field}: the cache at {uri} is incomplete (the job writing it did not finish); "
                             "write it again or point to a complete cache")

    @property
    def hook_names(self) -> list[str]:
        return [hook["name"] for hook in self.manifest["hooks"]]

    @property
    def shard_tokens(self) -> list[int]:
        return [shard["tokens"] for shard in self.manifest["shards"]]

    def check(self, model: str | None = None, dtype: str | None = None, d: int | None = None,
              hooks: list[str] | None = None) -> None:
        """Refuse a cache that does not hold what a job asks for; the message names the field and the fix."""
        m, where = self.manifest, f"{self.field} ({self.uri})"
        if model is not None and m["model"] != model:
            raise ValueError(f"{where}: the cache holds activations of model {m['model']!r}, the job asks for "
                             f"{model!r}; set model to the cache's model or point to another cache")
        if d is not None and m["d"] != d:
            raise ValueError(f"{where}: the cache holds activations of width d={m['d']}, the job's model has "
                             f"d={d}; point to a cache of this model")
        missing = [name for name in hooks or [] if name not in self.hook_names]
        if missing:
            raise ValueError(f"{where}: the cache holds the sites {self.hook_names}, not {missing}; change the "
                             "dictionaries' hook (layer/site) to cached ones or write a cache with these sites")
        if dtype is not None and m["dtype"] != dtype:
            raise ValueError(f"{where}: the cache holds {m['dtype']} activations, the job asks for model.dtype "
                             f"{dtype!r}; set model.dtype to {m['dtype']!r} or point to another cache")

    def shard(self, index: int) -> dict[str, np.ndarray]:
        """One shard's arrays; activations as float32."""
        return _arrays(self.fs.cat_file(f"{self.root}/{self.manifest['shards'][index]['file']}"))

    def held_out(self) -> dict[str, np.ndarray] | None:
        if not self.manifest.get("held_out"):
            return None
        return _arrays(self.fs.cat_file(f"{self.root}/{self.manifest['held_out']['file']}"))


class ShardStream:
    """Rows of some shards of a cache, shuffled across groups of shards, cycling over epochs (or `epochs` of them).

    `rows(offset, count)` returns rows [offset, offset + count) of that sequence (fewer at the end of the last
    epoch); the sequence is fixed by the seed, so a restarted reader continues exactly where it was.
    """

    def __init__(self, cache: ActivationCache, shards: list[int], group: int, seed: int, keys: list[str] | None = None,
                 epochs: int | None = None):
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        self.cache, self.shards, self.group, self.seed = cache, shards, group, seed
        self.keys, self.epochs = keys, epochs
        self.epoch_rows = sum(cache.shard_tokens[i] for i in shards)
        self._loaded: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None

    def _groups(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.shards).tolist()
        return [order[i:i + self.group] for i in range(0, len(order), self.group)]

    def _group_rows(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        if self._loaded is None or self._loaded[0] != (epoch, index):
            parts = [self.cache.shard(i) for i in self._groups(epoch)[index]]
            keys = self.keys or list(parts[0])
            joined = {k: np.concatenate([p[k] for p in parts]) for k in keys}
            rows = len(joined[keys[0]])
            perm = np.random.default_rng([self.seed, epoch, index, 1]).permutation(rows)
            self._loaded = ((epoch, index), {k: v[perm] for k, v in joined.items()})
        return self._loaded[1]

    def _locate(self, offset: int) -> tuple[int, int, int] | None:
        """(epoch, group index, row within the group) of a sequence offset; None past the last epoch."""
        epoch, within = divmod(offset, self.epoch_rows)
        if self.epochs is not None and epoch >= self.epochs:
            return None
        for index, members in enumerate(self._groups(epoch)):
            size = sum(self.cache.shard_tokens[i] for i in members)
            if within < size:
                return epoch, index, within
            within -= size
        raise AssertionError("offset inside an epoch but beyond its groups")

    def epoch_of(self, offset: int) -> int:
        return offset // self.epoch_rows

    def rows(self, offset: int, count: int) -> dict[str, np.ndarray] | None:
        pieces: list[dict[str, np.ndarray]] = []
        taken = 0
        while taken < count:
            where = self._locate(offset + taken)
            if where is None:
                break
            epoch, index, start = where
            group = self._group_rows(epoch, index)
            size = len(next(iter(group.values())))
            stop = min(size, start + count - taken)
            pieces.append({k: v[start:stop] for k, v in group.items()})
            taken += stop - start
        if not pieces:
            return None
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
