"""Corpus loading, held-out split, producer slices and packing into windows."""

import json

import numpy as np
import pytest
from transformers import ByT5Tokenizer

from api.jobspec import DataSpec
from services.data import embedded_documents, load_documents, producer_slice, split_documents
from services.windows import TokenWindows


def test_embedded_corpus_is_real_prose():
    documents = embedded_documents()
    assert len(documents) > 1000 and sum(map(len, documents)) > 1_000_000
    assert any("for" in doc and "statement" in doc for doc in documents[:200])


def test_split_and_slices_are_disjoint_and_cover():
    train, held_out = split_documents(list("abcdefghijklmnopqrstuvwxyz"), holdout_fraction=0.1, seed=3)
    assert not set(train) & set(held_out) and sorted(train + held_out) == list(range(26))
    slices = [producer_slice(train, i, 3) for i in range(3)]
    assert sorted(sum(slices, [])) == train
    assert all(not set(a) & set(b) for i, a in enumerate(slices) for b in slices[i + 1:])


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
