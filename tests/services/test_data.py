"""Corpus loading, held-out split, producer slices and packing into windows."""

import json

import numpy as np
import pytest
from transformers import ByT5Tokenizer

from api.jobspec import DataSpec
from services.data import embedded_documents, load_documents, producer_slice, split_documents
from services.producer import TokenWindows


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
