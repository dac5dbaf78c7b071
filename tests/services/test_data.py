"""Corpus pieces and their reading (files, JSONL ranges, Parquet row groups, saved datasets, s3://), held-out
documents, producer slices and packing into windows."""

import collections
import json

import numpy as np
import pytest
from transformers import ByT5Tokenizer

import services.data
from api.jobspec import DataSpec
from services.data import (
    corpus_pieces,
    documents,
    embedded_documents,
    is_held_out,
    producer_pieces,
    read_piece,
)
from services.windows import TokenWindows


def test_embedded_corpus_is_real_prose():
    documents = embedded_documents()
    assert len(documents) > 1000 and sum(map(len, documents)) > 1_000_000
    assert any("for" in doc and "statement" in doc for doc in documents[:200])


def load_documents(spec: DataSpec) -> list[str]:
    """Every document of the corpus, held-out ones included, in corpus order."""
    return [text for piece in corpus_pieces(spec) for text in read_piece(piece, spec.text_field) if text]


def test_held_out_and_producer_slices_are_disjoint_and_cover():
    spec = DataSpec(holdout_fraction=0.05)
    pieces = corpus_pieces(spec)
    train, held_out = list(documents(spec, 3, pieces)), list(documents(spec, 3, pieces, held_out=True))
    assert sorted(train + held_out) == sorted(embedded_documents())
    assert 0.03 < len(held_out) / len(embedded_documents()) < 0.07
    assert held_out == list(documents(spec, 3, held_out=True))  # the same on every reading
    assert held_out != list(documents(spec, 4, held_out=True))  # ... and chosen by the seed
    slices = [producer_pieces(pieces, i, 3) for i in range(3)]
    assert sorted(sum(slices, []), key=pieces.index) == pieces
    assert all(not set(a) & set(b) for i, a in enumerate(slices) for b in slices[i + 1:])
    assert sorted(sum((list(documents(spec, 3, s)) for s in slices), [])) == sorted(train)
    with pytest.raises(ValueError, match=r"cluster.producers \(99\): producer 98 gets no piece of the 36"):
        producer_pieces(pieces, 98, 99)
    assert not any(is_held_out(pieces[0], i, 0.0, 3) for i in range(100))


def test_jsonl_byte_ranges_read_every_line_once(tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 37)}) for i in range(500)]
    path.write_text("\n".join(lines[:250]) + "\n\n" + "\n".join(lines[250:]))  # a blank line, no final newline
    monkeypatch.setattr(services.data, "JSONL_PIECE_BYTES", 997)  # ranges that start and end mid-line
    spec = DataSpec(source=str(path))
    pieces = corpus_pieces(spec)
    assert len(pieces) >= 20 and pieces[0].start == 0 and pieces[-1].stop == path.stat().st_size
    assert load_documents(spec) == [json.loads(line)["text"] for line in lines]
    piece = pieces[3]
    assert list(read_piece(piece, "text", 2)) == list(read_piece(piece, "text"))[2:]


def test_jsonl_field_and_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i}"}) for i in range(3)))
    assert load_documents(DataSpec(source=str(path), text_field="body")) == [f"document {i}" for i in range(3)]
    with pytest.raises(ValueError, match="data.text_field: .* has no field 'text'"):
        load_documents(DataSpec(source=str(path)))


def test_windows_have_fixed_length_and_special_tokens_are_masked():
    tokenizer = ByT5Tokenizer()
    windows = TokenWindows(tokenizer, ["hello world " * 20, "second document"], context_length=32, cycle=False)
    packed = list(windows)
    assert packed and all(len(w) == 32 for w in packed)
    stacked = np.stack(packed)
    keep = windows.keep_mask(stacked)
    assert not np.isin(stacked[keep], tokenizer.all_special_ids).any()
    assert (~keep).sum() >= 1  # the EOS between the two documents is excluded from the stream


def _write_sources(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("plain text document")
    (folder / "b.jsonl").write_text(json.dumps({"body": "jsonl document"}) + "\n")
    pq.write_table(pa.table({"body": ["parquet one", None, "parquet two"], "n": [1, 2, 3]}), folder / "c.parquet")


def test_parquet_folder_and_glob(tmp_path):
    _write_sources(tmp_path / "data")
    spec = DataSpec(source=str(tmp_path / "data" / "c.parquet"), text_field="body")
    assert load_documents(spec) == ["parquet one", "parquet two"]
    with pytest.raises(ValueError, match="data.text_field: .* has no column 'text'"):
        load_documents(DataSpec(source=str(tmp_path / "data" / "c.parquet")))
    everything = load_documents(DataSpec(source=str(tmp_path / "data"), text_field="body"))
    assert everything == ["plain text document", "jsonl document", "parquet one", "parquet two"]
    assert load_documents(DataSpec(source=str(tmp_path / "data" / "*.jsonl"), text_field="body")) == ["jsonl document"]


def test_saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": ["first saved", "second saved"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(DataSpec(source=str(tmp_path / "ds"), text_field="content")) == ["first saved",
                                                                                            "second saved"]
    with pytest.raises(ValueError, match="data.text_field: the dataset at .* has no column 'text'"):
        load_documents(DataSpec(source=str(tmp_path / "ds")))


def test_s3_sources(s3_server, tmp_path):
    import datasets
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("corpus")
    _write_sources(tmp_path / "data")
    fs.put(str(tmp_path / "data") + "/", "corpus/data/", recursive=True)
    datasets.Dataset.from_dict({"body": ["saved on s3"]}).save_to_disk("s3://corpus/saved")
    assert load_documents(DataSpec(source="s3://corpus/data", text_field="body")) == [
        "plain text document", "jsonl document", "parquet one", "parquet two"]
    assert load_documents(DataSpec(source="s3://corpus/data/*.parquet", text_field="body")) == [
        "parquet one", "parquet two"]
    assert load_documents(DataSpec(source="s3://corpus/data/a.txt")) == ["plain text document"]
    assert load_documents(DataSpec(source="s3://corpus/saved", text_field="body")) == ["saved on s3"]
    with pytest.raises(ValueError, match="data.source: 's3://corpus/missing' does not exist"):
        load_documents(DataSpec(source="s3://corpus/missing"))


def test_data_spec_checks():
    from pydantic import ValidationError

    DataSpec(source="s3://bucket/anything")  # not reached out to at validation
    with pytest.raises(ValidationError, match="data.source: the scheme 'gs' is not supported"):
        DataSpec(source="gs://bucket/x")
    with pytest.raises(ValidationError, match="data.cache: give either write or read, not both"):
        DataSpec(cache={"write": "/tmp/a", "read": "/tmp/b"})
    with pytest.raises(ValidationError, match="data.cache.read: the scheme 'http' is not supported"):
        DataSpec(cache={"read": "http://x/y"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DataSpec(cache={"uri": "/tmp/a"})


def test_two_epochs_stream_every_document_exactly_twice_in_a_reshuffled_piece_order(tmp_path):
    """data.epochs: 2 over a multi-file corpus (two JSONL files cut into byte ranges, a Parquet file of three
    row groups): for 1 and 2 producers, every document's tokens are streamed exactly twice between them, once per
    epoch; epoch 0 reads a producer's pieces in corpus order, epoch 1 in a shuffled order (documents keep their
    order inside a piece)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from services.windows import CorpusWindows

    context = 16
    # (bytes + EOS) a multiple of the context: windows end at document ends, so no partial window is dropped
    # and a document's tokens are all streamed, while longer documents span several windows.
    texts = [(f"doc {i:03d} " + "abcdefghij" * 7)[:context * (1 + i % 4) - 1] for i in range(150)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, part in (("a.jsonl", texts[:50]), ("b.jsonl", texts[50:90])):
        (folder / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    with pq.ParquetWriter(folder / "c.parquet", pa.schema([("text", pa.string())])) as writer:
        for start in (90, 110, 130):
            writer.write_table(pa.table({"text": texts[start:start + 20]}))
    spec = DataSpec(source=str(folder), holdout_fraction=0.0, context_length=context)
    pieces = corpus_pieces(spec)
    assert {p.kind for p in pieces} == {"jsonl", "parquet"} and sum(p.kind == "parquet" for p in pieces) == 3
    tokenizer = ByT5Tokenizer()
    for producers in (1, 2):
        streamed: list[str] = []
        for producer in range(producers):
            mine = producer_pieces(pieces, producer, producers)
            windows = CorpusWindows(tokenizer, spec, mine, seed=7, producer=producer, epochs=2)
            cursors, packed = zip(*windows.windows(), strict=True)
            assert all(len(w) == context for w in packed) and windows.epoch == 1
            assert [c.epoch for c in cursors] == sorted(c.epoch for c in cursors)  # epoch 0, then epoch 1
            stream = np.concatenate(packed).tolist()
            assert stream[-1] == tokenizer.eos_token_id  # the last document ends the last window
            docs, current = [], []
            for token in stream:
                if token == tokenizer.eos_token_id:
                    docs.append(tokenizer.decode(current))
                    current = []
                else:
                    current.append(token)
            shuffled = windows.order(1)
            assert sorted(shuffled) == list(range(len(mine))) and shuffled != list(range(len(mine)))
            in_order = [t for p in mine for t in read_piece(p, "text")]
            reshuffled = [t for i in shuffled for t in read_piece(mine[i], "text")]
            assert in_order != reshuffled
            assert docs == in_order + reshuffled, f"producer {producer} of {producers}"
            streamed += docs
        counts = collections.Counter(streamed)
        assert set(counts) == set(texts) and set(counts.values()) == {2}, producers
