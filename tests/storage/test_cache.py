"""Activation caches: shards + manifest round trip (local and S3), shuffling across shards, refusals."""

import json

import numpy as np
import pytest
import torch

from storage.cache import MANIFEST, ActivationCache, CacheWriter, ShardStream

HOOK = "blocks.1.hook_resid_post"
OTHER = "blocks.0.hook_attn_out"
BASE = {"model": "random-llama-d8-l2-seed0", "num_layers": 2, "d": 8, "corpus_fingerprint": "abc",
        "hooks": [{"name": HOOK, "layer": 1, "site": "resid_post"}, {"name": OTHER, "layer": 0, "site": "attn_out"}],
        "extra_keys": ["row_ids"]}


def _batches(count: int, rows: int, d: int = 8):
    rng = np.random.default_rng(0)
    for i in range(count):
        yield {HOOK: rng.standard_normal((rows, d)).astype(np.float32),
               OTHER: rng.standard_normal((rows, d)).astype(np.float32),
               "row_ids": np.arange(i * rows, (i + 1) * rows, dtype=np.int64)}


def _write(uri: str, count: int = 7, rows: int = 30, shard_tokens: int = 50, dtype: str = "float32"):
    writer = CacheWriter(uri, BASE, [HOOK, OTHER], shard_tokens, dtype=dtype)
    written = list(_batches(count, rows))
    for batch in written:
        writer.add(batch)
    writer.add_held_out(next(_batches(1, 12)))
    return writer.close(), {k: np.concatenate([b[k] for b in written]) for k in written[0]}


def test_round_trip_with_shards_and_manifest(tmp_path):
    manifest, written = _write(str(tmp_path / "cache"))
    assert manifest["complete"] and manifest["tokens"] == 210
    assert [s["tokens"] for s in manifest["shards"]] == [50, 50, 50, 50, 10]
    on_disk = json.loads((tmp_path / "cache" / MANIFEST).read_text())
    assert on_disk["d"] == 8 and on_disk["model"] == BASE["model"] and on_disk["dtype"] == "float32"
    cache = ActivationCache(f"file://{tmp_path / 'cache'}")
    read = {k: np.concatenate([cache.shard(i)[k] for i in range(5)]) for k in written}
    for key in written:
        np.testing.assert_array_equal(read[key], written[key])
    assert cache.held_out()[HOOK].shape == (12, 8)


def test_bfloat16_cache_is_lossless_for_bfloat16_activations(tmp_path):
    writer = CacheWriter(str(tmp_path / "c"), BASE, [HOOK, OTHER], 100, dtype="bfloat16")
    x = torch.randn(40, 8).bfloat16().float().numpy()  # what a bf16 model's producer streams (as float32)
    writer.add({HOOK: x, OTHER: x, "row_ids": np.arange(40)})
    writer.close()
    cache = ActivationCache(str(tmp_path / "c"))
    assert cache.manifest["dtype"] == "bfloat16"
    np.testing.assert_array_equal(cache.shard(0)[HOOK], x)
    assert (tmp_path / "c" / "shard-00000.safetensors").stat().st_size < 40 * 8 * 4 * 2


def test_stream_shuffles_across_shards_covers_every_row_and_seeks(tmp_path):
    _, written = _write(str(tmp_path / "cache"))
    cache = ActivationCache(str(tmp_path / "cache"))
    stream = ShardStream(cache, [0, 1, 2, 3, 4], group=3, seed=5, epochs=1)
    rows = stream.rows(0, 1000)["row_ids"]
    assert sorted(rows.tolist()) == list(range(210))  # one epoch: every row once
    assert stream.rows(210, 10) is None
    first_group = rows[:100]
    assert len({int(r) // 50 for r in first_group}) >= 2  # rows of several shards mixed together
    assert not np.array_equal(first_group, np.sort(first_group))
    again = ShardStream(cache, [0, 1, 2, 3, 4], group=3, seed=5, epochs=1)
    np.testing.assert_array_equal(again.rows(77, 40)["row_ids"], rows[77:117])  # any offset reached directly
    cycling = ShardStream(cache, [0, 1, 2, 3, 4], group=3, seed=5)
    two_epochs = cycling.rows(150, 120)["row_ids"]  # crosses into the next epoch (another shard order)
    assert len(two_epochs) == 120 and sorted(cycling.rows(210, 210)["row_ids"].tolist()) == list(range(210))


def test_refuses_caches_that_do_not_match(tmp_path):
    _write(str(tmp_path / "cache"))
    cache = ActivationCache(str(tmp_path / "cache"))
    cache.check(model=BASE["model"], dtype="float32", d=8, hooks=[HOOK, OTHER])
    with pytest.raises(ValueError, match=r"data.cache.read .* width d=8, the job's model has d=16"):
        cache.check(d=16)
    with pytest.raises(ValueError, match=r"holds the sites .* not \['blocks.2.hook_mlp_out'\]; change the"):
        cache.check(hooks=[HOOK, "blocks.2.hook_mlp_out"])
    with pytest.raises(ValueError, match="model 'random-llama-d8-l2-seed0', the job asks for 'embedded-x'"):
        cache.check(model="embedded-x")
    with pytest.raises(ValueError, match="holds float32 activations, the job asks for model.dtype 'bfloat16'"):
        cache.check(dtype="bfloat16")


def test_refuses_missing_incomplete_and_existing_caches(tmp_path):
    with pytest.raises(ValueError, match="data.cache.read: no manifest.json at"):
        ActivationCache(str(tmp_path / "nothing"))
    writer = CacheWriter(str(tmp_path / "partial"), BASE, [HOOK, OTHER], 50)
    for batch in _batches(3, 30):
        writer.add(batch)  # shards and a manifest, but never closed
    with pytest.raises(ValueError, match="is incomplete"):
        ActivationCache(str(tmp_path / "partial"))
    _write(str(tmp_path / "done"))
    with pytest.raises(FileExistsError, match="already holds an activation cache"):
        CacheWriter(str(tmp_path / "done"), BASE, [HOOK], 50)


def test_round_trip_on_s3(s3_server):
    import s3fs

    s3fs.S3FileSystem().mkdir("caches")
    manifest, written = _write("s3://caches/run-1")
    cache = ActivationCache("s3://caches/run-1")
    assert cache.manifest["tokens"] == manifest["tokens"] == 210
    rows = ShardStream(cache, list(range(len(cache.manifest["shards"]))), group=2, seed=0, epochs=1).rows(0, 210)
    order = np.argsort(rows["row_ids"])
    np.testing.assert_array_equal(rows[HOOK][order], written[HOOK])
