"""ActivationProducer and CacheProducer in-process (no Ray): batch layout, seeking, slices, dtype, refusals."""

import json

import numpy as np
import pytest

from api.jobspec import JobSpec
from services.cache_producer import CacheProducer
from services.model_producer import ActivationProducer
from services.remote_code import ALLOW_REMOTE_CODE_ENV
from services.rows import ROW_IDS, TOKEN_IDS
from services.windows import TokenWindows
from storage.cache import CacheWriter

RESID, ATTN = "blocks.1.hook_resid_post", "blocks.0.hook_attn_out"


def tiny_spec(source: str, **overrides) -> JobSpec:
    data = {"model": {"random": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}},
            "hook": {"layer": 1}, "dictionaries": [{"k": 4}, {"hook": {"layer": 0, "site": "attn_out"}, "k": 4}],
            "data": {"source": source, "context_length": 32, "holdout_fraction": 0.1},
            "training": {"batch_tokens": 96, "tokens": 960}}
    for key, value in overrides.items():
        data[key] = {**data[key], **value}
    return JobSpec.model_validate(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "theta"]
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(5, 60))))})
                              for _ in range(24)))
    return str(path)


def _drain(producer, limit=1000):
    batches = []
    for _ in range(limit):
        meta, batch = producer.next_batch()
        if batch:
            batches.append(batch)
        if meta["end"]:
            return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    raise AssertionError("stream did not end")


@pytest.fixture(scope="module")
def pieces_corpus(tmp_path_factory):
    """Two Parquet files of three row groups and a JSONL file (read in byte ranges): 18 pieces."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("pieces")
    rng = np.random.default_rng(2)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "theta"]

    def doc(i):
        return f"d{i} " + " ".join(rng.choice(words, size=int(rng.integers(5, 40))))

    for f in range(2):
        pq.write_table(pa.table({"text": [doc(100 * f + i) for i in range(12)]}), folder / f"part{f}.parquet",
                       row_group_size=4)
    (folder / "tail.jsonl").write_text("\n".join(json.dumps({"text": doc(300 + i)}) for i in range(10)))
    return str(folder)


def _tokens(tokenizer, docs):
    return [t for doc in docs for t in tokenizer(doc, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_slices_of_n_producers_are_disjoint_and_cover_the_training_corpus_token_for_token(pieces_corpus, n):
    from services.data import corpus_pieces, documents, producer_pieces

    spec = tiny_spec(pieces_corpus)
    pieces = corpus_pieces(spec.data)
    assert len(pieces) == 2 * 3 + 16
    producers = [ActivationProducer(spec.model_dump_json(), i, n, epochs=1) for i in range(n)]
    slices = [list(documents(spec.data, 0, producer_pieces(pieces, i, n))) for i in range(n)]
    train, held_out = list(documents(spec.data, 0)), list(documents(spec.data, 0, held_out=True))
    assert sorted(sum(slices, [])) == sorted(train) and len(sum(slices, [])) == len(train)  # cover, disjoint
    assert held_out and not set(held_out) & set(train)
    tokenizer = producers[0].lm.tokenizer
    for index, producer in enumerate(producers):
        stream = _drain(producer)
        expected = _tokens(tokenizer, slices[index])
        got = stream[TOKEN_IDS].tolist()
        assert got == expected[:len(got)] and len(expected) - len(got) < spec.data.context_length
        assert stream[ROW_IDS].tolist() == [(index << 40) + i for i in range(len(got))]
        assert stream[RESID].shape == (len(got), 16) and stream[ATTN].dtype == np.float32


def test_a_restarted_producer_resumes_mid_file_from_its_cursor(pieces_corpus, monkeypatch):
    import services.windows

    spec = tiny_spec(pieces_corpus)
    straight = ActivationProducer(spec.model_dump_json(), 0, 2, epochs=1)
    metas, batches = zip(*[straight.next_batch() for _ in range(5)], strict=True)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in (RESID, TOKEN_IDS, ROW_IDS)}
    cursor = metas[2]["cursor"]  # where the third batch ended: inside some document of some piece
    assert 0 < cursor["row"] <= 3 * 96 and (cursor["piece"], cursor["doc"]) != (0, 0)
    reads = []
    original = services.windows.read_piece
    monkeypatch.setattr(services.windows, "read_piece",
                        lambda piece, field, first=0: reads.append((piece, first)) or original(piece, field, first))
    restarted = ActivationProducer(spec.model_dump_json(), 0, 2, epochs=1)  # a fresh producer, as after a restart
    meta, batch = restarted.next_batch(3 * 96, cursor)
    assert meta["offset"] == 3 * 96 and meta["seeks"] == 1 and meta["tokens"] == 96
    np.testing.assert_array_equal(batch[TOKEN_IDS], rows[TOKEN_IDS][288:384])  # no token lost, none repeated
    np.testing.assert_array_equal(batch[ROW_IDS], rows[ROW_IDS][288:384])
    np.testing.assert_allclose(batch[RESID], rows[RESID][288:384], rtol=1e-5, atol=1e-5)
    assert reads[0] == (restarted.train_windows.pieces[cursor["piece"]], cursor["doc"])  # read from the cursor on
    assert metas[4]["cursor"]["row"] <= 5 * 96 and meta["cursor"]["row"] <= 4 * 96


def test_two_epochs_stream_every_document_twice_the_second_in_another_order(pieces_corpus):
    from services.data import documents

    spec = tiny_spec(pieces_corpus)
    producer = ActivationProducer(spec.model_dump_json(), 0, 1, epochs=2)
    stream = _drain(producer)
    windows = producer.train_windows
    order = windows.order(1)
    assert order != windows.order(0) and sorted(order) == windows.order(0)
    first = list(documents(spec.data, 0, windows.pieces))
    second = list(documents(spec.data, 0, [windows.pieces[i] for i in order]))
    assert sorted(first) == sorted(second)
    tokenizer = producer.lm.tokenizer
    expected = _tokens(tokenizer, first + second)
    got = stream[TOKEN_IDS].tolist()
    assert got == expected[:len(got)] and len(expected) - len(got) < spec.data.context_length
    assert producer.next_batch()[0]["end"]


def test_seek_gives_the_rows_of_an_uninterrupted_stream(corpus):
    spec = tiny_spec(corpus)
    straight = ActivationProducer(spec.model_dump_json(), 1, 2)
    batches = [straight.next_batch()[1] for _ in range(4)]
    rows = {k: np.concatenate([b[k] for b in batches]) for k in (RESID, TOKEN_IDS, ROW_IDS)}
    restarted = ActivationProducer(spec.model_dump_json(), 1, 2)  # a fresh producer, as after a restart
    meta, batch = restarted.next_batch(150)
    assert meta["offset"] == 150 and meta["seeks"] == 1 and meta["tokens"] == 96
    np.testing.assert_array_equal(batch[TOKEN_IDS], rows[TOKEN_IDS][150:246])
    np.testing.assert_array_equal(batch[ROW_IDS], rows[ROW_IDS][150:246])
    np.testing.assert_allclose(batch[RESID], rows[RESID][150:246], rtol=1e-5, atol=1e-5)


def test_dtype_from_the_spec_streams_at_that_width(corpus):
    from storage.arrays import BFLOAT16

    full = ActivationProducer(tiny_spec(corpus).model_dump_json())
    half = ActivationProducer(tiny_spec(corpus, model={"dtype": "bfloat16"}).model_dump_json())
    assert str(next(half.lm.model.parameters()).dtype) == "torch.bfloat16" and half.info()["device"] == "cpu"
    a, b = full.next_batch()[1], half.next_batch()[1]
    assert a[RESID].dtype == np.float32 and b[RESID].dtype == BFLOAT16  # half the bytes through the object store
    assert b[RESID].nbytes * 2 == a[RESID].nbytes
    np.testing.assert_array_equal(a[TOKEN_IDS], b[TOKEN_IDS])
    b_float = b[RESID].astype(np.float32)
    assert np.abs(a[RESID] - b_float).mean() < 0.05 * np.abs(a[RESID]).mean() + 1e-3


def test_trust_remote_code_needs_the_server_to_allow_it(corpus, monkeypatch):
    spec = tiny_spec(corpus, model={"trust_remote_code": True})
    monkeypatch.delenv(ALLOW_REMOTE_CODE_ENV, raising=False)
    with pytest.raises(ValueError, match=f"model.trust_remote_code: this server does not run code .* "
                                         f"{ALLOW_REMOTE_CODE_ENV}=1"):
        ActivationProducer(spec.model_dump_json())
    monkeypatch.setenv(ALLOW_REMOTE_CODE_ENV, "1")
    assert ActivationProducer(spec.model_dump_json()).info()["d_model"] == 16


def test_windows_over_epochs():
    from transformers import ByT5Tokenizer

    windows = TokenWindows(ByT5Tokenizer(), ["x" * 50], context_length=16, epochs=2)
    assert len(list(windows)) == 6 and windows.epoch == 2


def test_cache_producer_serves_the_cached_rows_and_refuses_a_mismatch(corpus, tmp_path):
    spec = tiny_spec(corpus, data={"holdout_fraction": 0.3})  # held-out documents are drawn: 3 of these 24
    producer = ActivationProducer(spec.model_dump_json(), epochs=1)
    info = producer.info()
    stream = _drain(producer)
    manifest = {"model": info["model"], "num_layers": 2, "d": 16, "corpus_fingerprint": info["corpus_fingerprint"],
                "hooks": [{"name": RESID, "layer": 1, "site": "resid_post"},
                          {"name": ATTN, "layer": 0, "site": "attn_out"}], "extra_keys": [TOKEN_IDS, ROW_IDS]}
    writer = CacheWriter(str(tmp_path / "cache"), manifest, [RESID, ATTN], shard_tokens=200)
    writer.add(stream)
    writer.add_held_out(producer.held_out_batch(64))
    writer.close()
    reading = tiny_spec(corpus, data={"cache": {"read": str(tmp_path / "cache"), "shuffle_shards": 2},
                                      "holdout_fraction": 0.3})
    readers = [CacheProducer(reading.model_dump_json(), i, 2, epochs=1) for i in range(2)]
    assert readers[0].info()["d_model"] == 16 and readers[0].info()["num_layers"] == 2
    got = [_drain(r) for r in readers]
    ids = np.concatenate([g[ROW_IDS] for g in got])
    assert sorted(ids.tolist()) == stream[ROW_IDS].tolist()  # every cached row once, across both readers
    order = np.argsort(np.concatenate([g[ROW_IDS] for g in got]))
    np.testing.assert_array_equal(np.concatenate([g[RESID] for g in got])[order], stream[RESID])
    assert readers[0].held_out_batch(10)[ATTN].shape == (10, 16)
    other_site = tiny_spec(corpus, data={"cache": {"read": str(tmp_path / "cache")}},
                           hook={"layer": 1, "site": "mlp_out"})
    with pytest.raises(ValueError, match=r"holds the sites .* not \['blocks.1.hook_mlp_out'\]"):
        CacheProducer(other_site.model_dump_json())
    wider = tiny_spec(corpus, data={"cache": {"read": str(tmp_path / "cache")}},
                      model={"random": {"hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                        "intermediate_size": 32}})
    with pytest.raises(ValueError, match="model 'random-llama-d16-l2-seed0', the job asks for "
                                         "'random-llama-d32-l2-seed0'"):
        CacheProducer(wider.model_dump_json())
