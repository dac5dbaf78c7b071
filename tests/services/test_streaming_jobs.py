"""Whole jobs on the tiny random model: a sweep of six dictionaries (four sites; TopK, BatchTopK, ReLU, AbsTopK,
Matryoshka BatchTopK and a skip transcoder) from one stream that also writes an activation cache to S3 (moto),
a second job that trains from that cache, and a job whose tokens exceed one pass over its corpus, with
data.epochs 1 (it ends at the last full batch) and 2."""

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
             "lr": 1e-3},
            # the newer kinds (row cap = latents: BatchTopK's inference is then exactly SAELens's JumpReLU)
            {"name": "resid-abstopk", "architecture": "abstopk", "latents": 64, "k": 4},
            {"name": "resid-matryoshka", "architecture": "matryoshka_batchtopk", "latents": 64, "k": 4,
             "matryoshka_prefixes": [16, 32], "batchtopk_row_cap": 64},
            {"name": "mlp-skip-transcoder", "hook": {"layer": 1, "site": "mlp_in"},
             "hook_out": {"layer": 1, "site": "mlp_out"}, "skip": True, "architecture": "batchtopk", "latents": 64,
             "k": 4, "batchtopk_row_cap": 64}],
        "training": {**TRAINING, "tokens": 512 * 12}, "tracking": {"experiment": "streaming"}})
    from_cache = JobSpec.model_validate({
        "name": "from-cache", "model": MODEL, "hook": {"layer": 1, "site": "resid_post"},
        "data": {"cache": {"read": CACHE, "shuffle_shards": 2}},
        "dictionaries": [{"name": "cached-topk", "expansion_factor": 2, "k": 8}],
        "training": {**TRAINING, "tokens": 512 * 6}, "tracking": {"experiment": "streaming"}})
    corpus = home / "short.jsonl"  # 2,600 bytes: 2,600 ByT5 tokens plus separators, about 5 steps of 512
    corpus.write_text("\n".join(json.dumps({"text": f"{i:02d} " + "abcdefghij" * 25 + "k" * (i + 1)})
                                 for i in range(10)))
    short = JobSpec.model_validate({
        "name": "short", "model": MODEL, "hook": {"layer": 1}, "dictionaries": [{"expansion_factor": 2, "k": 8}],
        "data": {"source": str(corpus), "context_length": 64, "holdout_fraction": 0.0},
        "training": {**TRAINING, "eval_tokens": 0, "splice_eval_tokens": 0, "tokens": 512 * 8},
        "analysis": {"enabled": False}, "tracking": {"experiment": "epochs"}})
    twice = short.model_copy(update={"name": "twice", "data": short.data.model_copy(update={"epochs": 2})})
    too_much = from_cache.model_copy(update={"training": from_cache.training.model_copy(update={"tokens": 512 * 40})})
    import ray

    # one Ray for all jobs (run_job joins a running Ray and leaves it up): one start-up instead of two
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SAEFORGE_HOME", str(home))
            env.delenv("MLFLOW_TRACKING_URI", raising=False)
            first = run_job(sweep, quiet=True)
            second = run_job(from_cache, quiet=True)
            with pytest.raises(ValueError) as refused:
                run_job(too_much, quiet=True)
            ended = run_job(short, quiet=True)
            both = run_job(twice, quiet=True)
    finally:
        ray.shutdown()
    epochs = {"short": short, "ended": ended, "both": both, "refused": str(refused.value)}
    return sweep, first, from_cache, second, epochs


def test_a_sweep_gives_a_child_run_and_an_export_per_dictionary(jobs):
    sweep, result, _, _, _ = jobs
    assert sorted(result.dictionaries) == sorted(result.child_runs) == [
        "attn-batchtopk", "mlp-relu", "mlp-skip-transcoder", "resid-abstopk", "resid-matryoshka", "resid-topk"]
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
                     "mlp-relu": ("mlp_out", "relu"), "resid-abstopk": ("resid_post", "abstopk"),
                     "resid-matryoshka": ("resid_post", "matryoshka_batchtopk"),
                     "mlp-skip-transcoder": ("mlp_in", "batchtopk")}
    parent = client.get_run(result.mlflow_run_id).data.metrics
    assert parent["buffer_consumed_tokens"] >= sweep.training.tokens and "buffer_produced_tokens_per_s" in parent


def test_the_sweep_wrote_its_stream_to_an_s3_cache(jobs):
    sweep, _, _, _, _ = jobs
    manifest = ActivationCache(CACHE).manifest
    assert manifest["complete"] and manifest["tokens"] == sweep.training.tokens
    assert [h["name"] for h in manifest["hooks"]] == [h.name for h in sweep.hooks()]
    assert manifest["d"] == 32 and manifest["dtype"] == "float32" and manifest["model"] == sweep.model.label
    assert len(manifest["shards"]) == 3 and manifest["held_out"]["tokens"] == 1024 and manifest["corpus_fingerprint"]


def test_a_second_job_trains_from_the_cache(jobs):
    _, _, from_cache, result, _ = jobs
    summary = result.dictionaries["cached-topk"]
    assert summary["tokens"] == from_cache.training.tokens
    assert summary["held_out_tokens"] == 1024 and summary["held_out_fvu"] < 1.0


def test_a_cache_that_does_not_match_is_refused(jobs):
    _, _, from_cache, _, _ = jobs
    other_site = from_cache.model_copy(update={"hook": from_cache.hook.model_copy(update={"layer": 0})})
    with pytest.raises(ValueError, match=r"holds the sites .* not \['blocks.0.hook_resid_post'\]"):
        open_cache_for(other_site)
    wider = JobSpec.model_validate({**from_cache.model_dump(), "model": {
        "random": {**MODEL["random"], "hidden_size": 64}}})
    with pytest.raises(ValueError, match="the job asks for 'random-llama-d64-l2-seed0'"):
        open_cache_for(wider)


def test_a_job_past_its_one_epoch_ends_at_the_last_full_batch_and_says_so(jobs):
    short, result = jobs[4]["short"], jobs[4]["ended"]
    summary = result.dictionaries[short.dictionary_name(0)]
    assert 512 * 4 <= summary["tokens"] < short.training.tokens and summary["tokens"] % 512 == 0
    run = MlflowClient(tracking_uri=result.mlflow_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["saeforge.stream_ended"] == (f"trained {summary['tokens']:,} of {short.training.tokens:,} "
                                                      "tokens: the corpus ran out after data.epochs = 1")
    assert run.data.metrics["data_epochs"] == 1 and run.data.params["data.epochs"] == "1"
    assert run.data.metrics["buffer_epochs"] == 0  # the stream never left its first epoch


def test_two_epochs_train_every_token_asked_for(jobs):
    short, result = jobs[4]["short"], jobs[4]["both"]
    assert result.dictionaries[short.dictionary_name(0)]["tokens"] == short.training.tokens
    run = MlflowClient(tracking_uri=result.mlflow_uri).get_run(result.mlflow_run_id)
    assert "saeforge.stream_ended" not in run.data.tags and run.data.metrics["buffer_epochs"] == 1


def test_a_cache_job_asking_for_more_than_its_epochs_is_refused_with_the_numbers(jobs):
    assert jobs[4]["refused"] == (
        "training.tokens: the job trains on 20,480 tokens but the corpus holds 6,144 tokens, 6,144 in data.epochs "
        "= 1; lower training.tokens to at most 6,144 or raise data.epochs to 4")


def test_the_newer_kinds_load_in_saelens_and_reconstruct_the_held_out_rows_as_trained(jobs):
    """AbsTopK, Matryoshka BatchTopK and a skip transcoder (mlp_in -> mlp_out) trained from the sweep's one
    stream: each SAELens export loads and, on the held-out rows the job evaluated (kept in its cache), has the
    FVU the job reported for the trained module; for the transcoder that is its prediction of the live model's
    MLP output from the MLP's input."""
    import sae_lens
    import torch

    sweep, result = jobs[0], jobs[1]
    held_out = ActivationCache(CACHE).held_out()
    names = [d.name for d in sweep.dictionaries]
    kinds = {"resid-abstopk": "abstopk", "resid-matryoshka": "jumprelu",
             "mlp-skip-transcoder": "jumprelu_skip_transcoder"}
    for name, kind in kinds.items():
        index, summary = names.index(name), result.dictionaries[name]
        cfg = json.loads(open(f"{summary['saelens_uri']}/cfg.json").read())
        assert cfg["architecture"] == kind, name
        loaded = sae_lens.SAE.load_from_disk(summary["saelens_uri"])
        target = sweep.hook_out_of(index) or sweep.hook_of(index)
        x = torch.from_numpy(held_out[sweep.hook_of(index).name]).float()
        y = torch.from_numpy(held_out[target.name]).float()
        with torch.no_grad():
            fvu = float((y - loaded(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert fvu == pytest.approx(summary["held_out_fvu"], rel=1e-4, abs=1e-6), name
        assert summary["held_out_fvu"] < 1.0, name
    assert cfg["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    matryoshka = result.dictionaries["resid-matryoshka"]
    assert matryoshka["held_out_fvu_prefix_16"] > matryoshka["held_out_fvu_prefix_64"] == pytest.approx(
        matryoshka["held_out_fvu"])
    child = MlflowClient(tracking_uri=result.mlflow_uri).get_run(result.child_runs["resid-matryoshka"])
    assert {"fvu_prefix_16", "l0_prefix_16", "fvu_prefix_32", "l0_prefix_64"} <= set(child.data.metrics)
    from services.compare import compare, format_table

    rows = {r["dictionary"]: r for r in compare(result.mlflow_uri, "streaming", job_id=result.job_id,
                                                log_to_mlflow=False)["rows"]}
    assert rows["resid-matryoshka"]["matryoshka_prefixes"] == "16,32,64" and rows["resid-topk"]["site_out"] is None
    assert (rows["mlp-skip-transcoder"]["site_out"], rows["mlp-skip-transcoder"]["skip"]) == ("mlp_out", True)
    assert "16,32,64" in format_table(list(rows.values()))
