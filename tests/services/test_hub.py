"""Models and datasets by hub id, resolved offline from a Hugging Face cache folder the test builds (the layout
huggingface_hub writes: <repo type>s--org--name/refs/main and snapshots/<commit>/)."""

import numpy as np
import pytest

from api.jobspec import DataSpec, JobSpec
from services.data import corpus_pieces, documents
from services.hub import hub_dataset_files, is_hub_id
from services.model_producer import ActivationProducer
from services.rows import TOKEN_IDS

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RANDOM = {"random": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}}


def _snapshot(cache, repo_type, repo):
    folder = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import constants

    from services.models import _random_model

    cache = tmp_path / "hf" / "hub"
    model, tokenizer = _random_model(JobSpec.model_validate({"model": RANDOM}).model)
    folder = _snapshot(cache, "model", "tiny-org/tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = _snapshot(cache, "dataset", "tiny-org/corpus") / "data"
    data.mkdir()
    train = [f"training document {i} " + "words " * (i % 7 + 5) for i in range(40)]
    pq.write_table(pa.table({"text": train}), data / "train-00000-of-00001.parquet", row_group_size=8)
    pq.write_table(pa.table({"text": ["a test document " * 4] * 3}), data / "test-00000-of-00001.parquet")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return train


def test_a_hub_model_and_dataset_resolve_from_the_cache_offline(hf_cache):
    spec = JobSpec.model_validate({
        "model": {"name": "tiny-org/tiny-llama"}, "hook": {"layer": 1}, "dictionaries": [{"k": 4}],
        "data": {"source": "tiny-org/corpus", "context_length": 32, "holdout_fraction": 0.0},
        "training": {"batch_tokens": 64, "tokens": 640}})
    assert is_hub_id("tiny-org/corpus") and not is_hub_id("embedded")
    assert len(corpus_pieces(spec.data)) == 5  # the train split's row groups, not the test split
    producer = ActivationProducer(spec.model_dump_json(), epochs=1)
    assert producer.info()["d_model"] == 16 and producer.info()["corpus_documents"] == 40
    meta, batch = producer.next_batch()
    tokenizer = producer.lm.tokenizer
    expected = [t for doc in hf_cache for t in tokenizer(doc, add_special_tokens=False)["input_ids"]]
    np.testing.assert_array_equal(batch[TOKEN_IDS], expected[:64])
    test_split = DataSpec(source=f"tiny-org/corpus@{COMMIT}", split="test", holdout_fraction=0.0)
    assert list(documents(test_split, 0)) == ["a test document " * 4] * 3


def test_an_id_in_no_cache_is_refused_with_what_to_do(hf_cache):
    from services.models import load_language_model

    with pytest.raises(ValueError, match=r"model.name: the model 'tiny-org/missing' is not in the Hugging Face "
                                         r"cache \(.*hub\) and the hub is not reached \(HF_HUB_OFFLINE=1\); "
                                         r"download it where the hub is reachable \(`hf download tiny-org/missing`\)"):
        load_language_model(JobSpec.model_validate({"model": {"name": "tiny-org/missing"}}).model)
    with pytest.raises(ValueError, match=r"data.source: the dataset 'tiny-org/nothing' is not in the Hugging Face "
                                         r"cache .* \(`hf download tiny-org/nothing --repo-type dataset`\)"):
        corpus_pieces(DataSpec(source="tiny-org/nothing"))
    with pytest.raises(ValueError, match=r"data.split / data.subset: the dataset 'tiny-org/corpus' has no data file "
                                         r"for split 'validation'"):
        hub_dataset_files(DataSpec(source="tiny-org/corpus", split="validation"))
