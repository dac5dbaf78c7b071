"""Two whole jobs on the tiny random model: a sweep of three dictionaries (three sites and architectures) from
one stream that also writes an activation cache to S3 (moto), and a second job that trains from that cache."""

import json

import pytest
from mlflow import MlflowClient

from api.jobspec import JobSpec
from services.cache_producer import open_cache_for
from services.runner import run_job
from storage.cache import ActivationCache

pytestmark = pytest.mark.slow

MODEL = {"random": {"family": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}}
CACHE = "s3://jobs/sweep-cache"
TRAINING = {"batch_tokens": 512, "warmup_steps": 2, "log_every_steps": 4, "eval_tokens": 1024}


@pytest.fixture(scope="module")
def jobs(s3_server, tmp_path_factory):
    import s3fs

    s3fs.S3FileSystem().mkdir("jobs")
    home = tmp_path_factory.mktemp("home")
    sweep = JobSpec.model_validate({
        "name": "sweep", "model": MODEL, "hook": {"layer": 1, "site": "resid_post"},
        "data": {"context_length": 64, "cache": {"write": CACHE, "shard_tokens": 2048}},
        "dictionaries": [
            {"name": "resid-topk", "expansion_factor": 4, "k": 8},
            {"name": "attn-batchtopk", "hook": {"layer": 0, "site": "attn_out"}, "architecture": "batchtopk",
             "latents": 96, "k": 4},
            {"name": "mlp-relu", "hook": {"layer": 1, "site": "mlp_out"}, "architecture": "relu", "latents": 64,
             "lr": 1e-3}],
        "training": {**TRAINING, "tokens": 512 * 12}, "tracking": {"experiment": "streaming"}})
    from_cache = JobSpec.model_validate({
        "name": "from-cache", "model": MODEL, "hook": {"layer": 1, "site": "resid_post"},
        "data": {"cache": {"read": CACHE, "shuffle_shards": 2}},
        "dictionaries": [{"name": "cached-topk", "expansion_factor": 2, "k": 8}],
        "training": {**TRAINING, "tokens": 512 * 6}, "tracking": {"experiment": "streaming"}})
    import ray

    # one Ray for both jobs (run_job joins a running Ray and leaves it up): one start-up instead of two
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SAEFORGE_HOME", str(home))
            env.delenv("MLFLOW_TRACKING_URI", raising=False)
            first = run_job(sweep, quiet=True)
            second = run_job(from_cache, quiet=True)
    finally:
        ray.shutdown()
    return sweep, first, from_cache, second


def test_a_sweep_of_three_dictionaries_gives_three_child_runs_and_three_exports(jobs):
    sweep, result, _, _ = jobs
    assert sorted(result.dictionaries) == sorted(result.child_runs) == ["attn-batchtopk", "mlp-relu", "resid-topk"]
    client = MlflowClient(tracking_uri=result.mlflow_uri)
    sites = {}
    for name, run_id in result.child_runs.items():
        child = client.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == result.mlflow_run_id
        assert "fvu" in child.data.metrics and child.info.status == "FINISHED"
        sites[name] = (child.data.tags["site"], child.data.tags["architecture"])
        cfg = json.loads(open(f"{result.dictionaries[name]['saelens_uri']}/cfg.json").read())
        assert cfg["metadata"]["hook_name"] == sweep.hook_of([d.name for d in sweep.dictionaries].index(name)).name
        assert result.dictionaries[name]["tokens"] == sweep.training.tokens
    assert sites == {"resid-topk": ("resid_post", "topk"), "attn-batchtopk": ("attn_out", "batchtopk"),
                     "mlp-relu": ("mlp_out", "relu")}
    parent = client.get_run(result.mlflow_run_id).data.metrics
    assert parent["buffer_consumed_tokens"] >= sweep.training.tokens and "buffer_produced_tokens_per_s" in parent


def test_the_sweep_wrote_its_stream_to_an_s3_cache(jobs):
    sweep, _, _, _ = jobs
    manifest = ActivationCache(CACHE).manifest
    assert manifest["complete"] and manifest["tokens"] == sweep.training.tokens
    assert [h["name"] for h in manifest["hooks"]] == [h.name for h in sweep.hooks()]
    assert manifest["d"] == 32 and manifest["dtype"] == "float32" and manifest["model"] == sweep.model.label
    assert len(manifest["shards"]) == 3 and manifest["held_out"]["tokens"] == 1024 and manifest["corpus_fingerprint"]


def test_a_second_job_trains_from_the_cache(jobs):
    _, _, from_cache, result = jobs
    summary = result.dictionaries["cached-topk"]
    assert summary["tokens"] == from_cache.training.tokens
    assert summary["held_out_tokens"] == 1024 and summary["held_out_fvu"] < 1.0


def test_a_cache_that_does_not_match_is_refused(jobs):
    _, _, from_cache, _ = jobs
    other_site = from_cache.model_copy(update={"hook": from_cache.hook.model_copy(update={"layer": 0})})
    with pytest.raises(ValueError, match=r"holds the sites .* not \['blocks.0.hook_resid_post'\]"):
        open_cache_for(other_site)
    wider = JobSpec.model_validate({**from_cache.model_dump(), "model": {
        "random": {**MODEL["random"], "hidden_size": 64}}})
    with pytest.raises(ValueError, match="the job asks for 'random-llama-d64-l2-seed0'"):
        open_cache_for(wider)
