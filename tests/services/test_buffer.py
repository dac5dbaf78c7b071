"""The buffer and producers as Ray actors on one local Ray: mixing, exactly-once delivery through a producer
that is killed mid-stream, live statistics, and an activation cache written to S3 and read back."""

import json

import numpy as np
import pytest
import ray

from api.jobspec import JobSpec
from services.buffer import ActivationBuffer
from services.cache_producer import CacheProducer
from services.model_producer import ActivationProducer
from services.producer import PRODUCER_MAX_RESTARTS
from services.rows import ROW_IDS, TOKEN_IDS

pytestmark = pytest.mark.slow

RESID, ATTN = "blocks.1.hook_resid_post", "blocks.0.hook_attn_out"
BATCH = 96


@pytest.fixture(scope="module")
def local_ray(s3_server):  # the S3 endpoint first: Ray's workers take the environment of its start
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> JobSpec:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "theta", "kappa"]
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(20, 80))))})
                              for _ in range(14)))
    return JobSpec.model_validate({
        "model": {"random": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}},
        "hook": {"layer": 1}, "dictionaries": [{"k": 4}, {"hook": {"layer": 0, "site": "attn_out"}, "k": 4}],
        "data": {"source": str(path), "context_length": 32, "holdout_fraction": 0.1},  # document 1 held out
        "training": {"batch_tokens": BATCH, "tokens": 960}})


def _producers(spec, cls=ActivationProducer, n=2, epochs=1):
    actor = ray.remote(cls).options(num_cpus=1, max_restarts=PRODUCER_MAX_RESTARTS,
                                    max_task_retries=PRODUCER_MAX_RESTARTS)
    return [actor.remote(spec.model_dump_json(), i, n, epochs=epochs) for i in range(n)]


def _drain(buffer, on_batch=None):
    batches = []
    while True:
        refs = ray.get(buffer.next.remote(), timeout=300)
        if not refs:
            return batches
        batches.append(ray.get(refs[0]))
        if on_batch is not None:
            on_batch(len(batches))


def _expected(spec, n=2):
    """Each producer's rows, computed in this process without Ray: {row id: token id}."""
    expected = {}
    for i in range(n):
        producer = ActivationProducer(spec.model_dump_json(), i, n, epochs=1)
        while True:
            meta, batch = producer.next_batch()
            if batch:
                expected.update(zip(batch[ROW_IDS].tolist(), batch[TOKEN_IDS].tolist(), strict=True))
            if meta["end"]:
                break
    return expected


def test_a_killed_producer_neither_loses_nor_repeats_a_token(local_ray, spec):
    producers = _producers(spec)
    buffer = ray.remote(ActivationBuffer).remote(producers, 1, mix_batches=3, batch_rows=BATCH, seed=0)

    def kill(count):
        if count == 2:  # kill a producer that has delivered rows: Ray restarts it, it resumes at the buffer's offset
            state = ray.get(buffer.producer_state.remote())
            ray.kill(producers[max(state, key=lambda i: state[i]["offset"])], no_restart=False)

    batches = _drain(buffer, kill)
    stats = ray.get(buffer.stats.remote())
    expected = _expected(spec)
    rows = np.concatenate([b[ROW_IDS] for b in batches])
    assert len(rows) == len(set(rows.tolist())) == len(expected)  # none twice, none lost: every token once
    tokens = dict(zip(rows.tolist(), np.concatenate([b[TOKEN_IDS] for b in batches]).tolist(), strict=True))
    assert tokens == expected
    assert all(len(b[ROW_IDS]) == BATCH for b in batches[:-1]) and set(batches[0]) == {RESID, ATTN, ROW_IDS, TOKEN_IDS}
    # the restarted producer sought its offset instead of starting over
    assert stats["producer_seeks"] >= 1, str(ray.get(buffer.producer_state.remote()))
    assert stats["consumed_tokens"] == stats["produced_tokens"] == len(expected)
    # rows are mixed: the first batch holds rows of several source batches, from both producers
    first = batches[0][ROW_IDS]
    assert len({(int(r) >> 40, (int(r) & ((1 << 40) - 1)) // BATCH) for r in first}) >= 2
    assert any(len({int(r) >> 40 for r in b[ROW_IDS]}) == 2 for b in batches)
    # live statistics, all numbers (the runner logs them to MLflow)
    assert stats["batches_out"] == len(batches) and stats["pool_capacity"] == 1 and 0 <= stats["pool_fill"] <= 1
    assert stats["produced_tokens_per_s"] > 0 and stats["consumed_tokens_per_s"] > 0 and stats["mix_ms_per_batch"] > 0
    assert all(isinstance(v, int | float) for v in stats.values())


def test_cache_written_to_s3_reads_back_the_same_batches(local_ray, spec):
    import s3fs

    from services.buffer import start_buffer

    s3fs.S3FileSystem().mkdir("streams")
    uri = "s3://streams/tiny-cache"
    writing = spec.model_copy(update={"data": spec.data.model_copy(
        update={"cache": spec.data.cache.model_copy(update={"write": uri, "shard_tokens": 200})})})
    producers = _producers(writing, n=1, epochs=None)
    held_out = producers[0].held_out_batch.remote(64)
    buffer = start_buffer(writing, producers, held_out, job_id="writer")
    steps = spec.training.steps
    written = [ray.get(ray.get(buffer.next.remote())[0]) for _ in range(steps)]  # a job's worth of batches
    manifest = ray.get(buffer.close_cache.remote())  # already complete: the last batch waited for it
    for actor in [buffer, *producers]:
        ray.kill(actor)
    rows = np.concatenate([b[ROW_IDS] for b in written])
    assert manifest["complete"] and manifest["tokens"] == len(rows) == spec.training.tokens and manifest["d"] == 16
    assert manifest["model"] == spec.model.label and manifest["held_out"]["tokens"] == 64
    assert [h["name"] for h in manifest["hooks"]] == [RESID, ATTN] and len(manifest["shards"]) > 2

    reading = spec.model_copy(update={"data": spec.data.model_copy(
        update={"cache": spec.data.cache.model_copy(update={"read": uri, "shuffle_shards": 2})})})
    readers = _producers(reading, CacheProducer)
    again = _drain(ray.remote(ActivationBuffer).remote(readers, 2, mix_batches=2, batch_rows=BATCH))
    read_rows = np.concatenate([b[ROW_IDS] for b in again])
    assert sorted(read_rows.tolist()) == sorted(rows.tolist())
    by_id = {k: np.concatenate([b[k] for b in written])[np.argsort(rows)] for k in (RESID, ATTN)}
    for key in (RESID, ATTN):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in again])[np.argsort(read_rows)], by_id[key])
    assert not np.array_equal(read_rows[:BATCH], rows[:BATCH])  # shuffled, not replayed in order


@pytest.fixture(scope="module")
def pieces_spec(tmp_path_factory) -> JobSpec:
    """Two Parquet files of four row groups: a stream that crosses files and row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("pieces")
    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "theta", "kappa"]
    for f in range(2):
        texts = [f"f{f}d{i} " + " ".join(rng.choice(words, size=int(rng.integers(10, 50)))) for i in range(16)]
        pq.write_table(pa.table({"text": texts}), folder / f"part{f}.parquet", row_group_size=4)
    return JobSpec.model_validate({
        "model": {"random": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}},
        "hook": {"layer": 1}, "dictionaries": [{"k": 4}],
        "data": {"source": str(folder), "context_length": 32, "holdout_fraction": 0.0},
        "training": {"batch_tokens": BATCH, "tokens": 960}})


def test_a_snapshot_mid_file_resumes_the_batches_of_the_straight_run(local_ray, pieces_spec):
    # one producer: with several, the order their batches reach the mixer is a race (the rows are the same)
    straight = ray.remote(ActivationBuffer).remote(_producers(pieces_spec, n=1), 2, mix_batches=2,
                                                   batch_rows=BATCH, seed=5)
    first = [ray.get(ray.get(straight.batch.remote(i))[0]) for i in range(4)]
    state = ray.get(straight.snapshot.remote(2))  # as a checkpoint after batch 2 saves it
    rest = _drain(straight)
    (cursor,) = state["cursors"]  # the producer's cursor is saved with its offset: mid-file, past row 0
    assert cursor["row"] > 0 and (cursor["piece"], cursor["doc"]) != (0, 0), cursor
    resumed = ray.remote(ActivationBuffer).remote(_producers(pieces_spec, n=1), 2, mix_batches=2,
                                                  batch_rows=BATCH, seed=5)  # a new producer, as in a resumed job
    ray.get(resumed.restore.remote(state, 2))
    again = _drain(resumed)
    expected = first[2:] + rest
    assert len(again) == len(expected)
    for a, b in zip(again, expected, strict=True):
        np.testing.assert_array_equal(a[ROW_IDS], b[ROW_IDS])
        np.testing.assert_array_equal(a[TOKEN_IDS], b[TOKEN_IDS])
        np.testing.assert_allclose(a[RESID], b[RESID], rtol=1e-5, atol=1e-5)
    assert ray.get(resumed.stats.remote())["producer_seeks"] == 1  # the producer read from its cursor on


def test_the_last_step_of_a_finite_stream_ends_for_every_replica_together(local_ray, pieces_spec):
    buffer = ray.remote(ActivationBuffer).remote(_producers(pieces_spec), 2, batch_rows=BATCH)
    total = sum(len(b[ROW_IDS]) for b in _drain(ray.remote(ActivationBuffer).remote(
        _producers(pieces_spec), 2, batch_rows=BATCH)))
    full_steps = total // (2 * BATCH)
    for step in range(full_steps):
        assert [len(ray.get(ray.get(buffer.batch.remote(2 * step + r, 2))[0])[ROW_IDS]) for r in (0, 1)] == [BATCH] * 2
    assert ray.get(buffer.batch.remote(2 * full_steps + 1, 2)) == []  # the second replica asks first
    assert ray.get(buffer.batch.remote(2 * full_steps, 2)) == []
