"""JobSpec validation: bad input is refused with a message that names the field and the fix."""

import json

import pytest

from api.jobspec import JobSpec, JobSpecError, load_job_spec, parse_job_spec


def test_empty_spec_is_the_embedded_default_job():
    spec = parse_job_spec({})
    assert spec.model.name == "embedded" and spec.data.source == "embedded"
    assert spec.dictionaries[0].architecture == "topk" and spec.dictionaries[0].resolved_latents(576) == 8 * 576
    assert spec.hooks()[0].name == "blocks.3.hook_resid_post"


def test_examples_load(repo_root):
    for name in ("default.yaml", "tiny.yaml"):
        assert isinstance(load_job_spec(repo_root / "examples" / name), JobSpec)


def test_default_example_is_what_an_empty_spec_runs(repo_root):
    default = load_job_spec(repo_root / "examples" / "default.yaml")
    assert default.model_dump() == parse_job_spec({}).model_dump()


def test_unknown_field_is_named():
    with pytest.raises(JobSpecError) as error:
        parse_job_spec({"training": {"tokenz": 10}})
    assert "training.tokenz: unknown field; remove it or check its spelling" in str(error.value)


def test_k_not_below_latents():
    with pytest.raises(JobSpecError) as error:
        parse_job_spec({"dictionaries": [{"latents": 64, "k": 64}]})
    assert "dictionaries.0: k (64) must be smaller than latents (64); lower k or raise latents" in str(error.value)


def test_negative_tokens():
    with pytest.raises(JobSpecError) as error:
        parse_job_spec({"training": {"tokens": -5}})
    assert "training.tokens: Input should be greater than 0" in str(error.value)


def test_tokens_below_one_batch():
    with pytest.raises(JobSpecError) as error:
        parse_job_spec({"training": {"tokens": 100, "batch_tokens": 4096}})
    assert "training.tokens (100) is smaller than one batch" in str(error.value)


def test_missing_model_file(tmp_path):
    with pytest.raises(JobSpecError) as error:
        parse_job_spec({"model": {"name": str(tmp_path / "nope.gguf")}})
    assert "model.name" in str(error.value) and "does not exist" in str(error.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(JobSpecError) as error:
        parse_job_spec({"data": {"source": str(tmp_path / "corpus.jsonl")}})
    assert "data.source" in str(error.value) and "does not exist" in str(error.value)


def test_missing_job_file(tmp_path):
    with pytest.raises(JobSpecError, match="job spec file .* not found"):
        load_job_spec(tmp_path / "job.yaml")


def test_json_and_yaml_give_the_same_spec(tmp_path):
    data = {"training": {"tokens": 8192, "batch_tokens": 1024}, "dictionaries": [{"latents": 256, "k": 4}]}
    (tmp_path / "job.json").write_text(json.dumps(data))
    (tmp_path / "job.yaml").write_text("training: {tokens: 8192, batch_tokens: 1024}\n"
                                       "dictionaries: [{latents: 256, k: 4}]\n")
    assert load_job_spec(tmp_path / "job.json") == load_job_spec(tmp_path / "job.yaml")


def test_latents_and_expansion_factor_are_exclusive():
    with pytest.raises(JobSpecError, match="either latents or expansion_factor"):
        parse_job_spec({"dictionaries": [{"latents": 256, "expansion_factor": 4}]})


def test_latents_divisible_by_latent_shards():
    with pytest.raises(JobSpecError, match=r"latents \(1000\) must be divisible by cluster.latent_shards \(3\)"):
        parse_job_spec({"dictionaries": [{"latents": 1000}], "cluster": {"trainer_ranks": 3, "latent_shards": 3}})


def test_ranks_are_whole_replicas_of_the_shards():
    with pytest.raises(JobSpecError, match=r"cluster.trainer_ranks \(3\) must be a multiple of cluster.latent_shards"):
        parse_job_spec({"cluster": {"trainer_ranks": 3, "latent_shards": 2}})
    spec = parse_job_spec({"cluster": {"trainer_ranks": 4, "latent_shards": 2},
                           "training": {"tokens": 40960, "batch_tokens": 4096}})
    assert spec.replicas == 2 and spec.steps == 5 and spec.total_tokens == 40960


def test_gradient_accumulation_counts_whole_optimizer_steps():
    spec = parse_job_spec({"cluster": {"trainer_ranks": 2}, "training": {
        "tokens": 11 * 4096, "batch_tokens": 2048, "gradient_accumulation_steps": 2, "checkpoint_every_steps": 4}})
    assert spec.steps == 10 and spec.optimizer_steps == 5 and spec.total_tokens == 10 * 2 * 2048
    with pytest.raises(JobSpecError, match=r"training.checkpoint_every_steps \(3\) must be a multiple of "
                                           r"training.gradient_accumulation_steps \(2\)"):
        parse_job_spec({"training": {"gradient_accumulation_steps": 2, "checkpoint_every_steps": 3}})
    with pytest.raises(JobSpecError, match=r"less than one optimizer step.*gradient_accumulation_steps"):
        parse_job_spec({"training": {"tokens": 8192, "batch_tokens": 4096, "gradient_accumulation_steps": 4}})


def test_optimizer_offload_needs_zero():
    with pytest.raises(JobSpecError, match=r"cluster.offload_optimizer needs ZeRO: set cluster.zero_stage to 1 or 2"):
        parse_job_spec({"cluster": {"offload_optimizer": True, "zero_stage": 0}})
    assert parse_job_spec({"cluster": {"offload_optimizer": True}}).cluster.zero_stage == 1


def test_layer_beyond_model_depth_once_model_known():
    spec = parse_job_spec({"hook": {"layer": 30}})
    with pytest.raises(ValueError, match=r"hook.layer \(30\) is beyond the model, which has 30 layers"):
        spec.check_against_model(num_layers=30, d_model=576)


def test_default_lr_scales_with_latents():
    spec = parse_job_spec({"dictionaries": [{"latents": 2**16}]})
    assert spec.dictionaries[0].resolved_lr(576) == pytest.approx(2e-4 / 2)


def test_dead_window_defaults_to_a_quarter_of_the_job_capped_at_10m_tokens():
    spec = parse_job_spec({"training": {"tokens": 393_216},
                           "dictionaries": [{"k": 32}, {"k": 16, "dead_window_tokens": 50_000}]})
    assert spec.dead_window_tokens(0) == 393_216 // 4  # AuxK and "dead" see three quarters of the job
    assert spec.dead_window_tokens(1) == 50_000  # an explicit window wins
    assert parse_job_spec({"training": {"tokens": 10**9}}).dead_window_tokens(0) == 10_000_000
    # a quarter of what is trained: whole batches of every replica (here 2 × 4,096 per step)
    odd = parse_job_spec({"training": {"tokens": 100_000}, "cluster": {"trainer_ranks": 2}})
    assert odd.dead_window_tokens(0) == odd.total_tokens // 4 == 12 * 8192 // 4


def test_output_uri_scheme_checked():
    with pytest.raises(JobSpecError, match="output.uri"):
        parse_job_spec({"output": {"uri": "gs://bucket/x"}})


def test_output_formats_and_uris():
    spec = parse_job_spec({"output": {"uri": "s3://bucket/jobs/a", "formats": ["saelens", "sparsify"]}})
    assert spec.output.uri == "s3://bucket/jobs/a"
    with pytest.raises(JobSpecError) as error:
        parse_job_spec({"dictionaries": [{"architecture": "jumprelu"}], "output": {"formats": ["sparsify"]}})
    assert "output.formats: sparsify loads TopK dictionaries only" in str(error.value)
    with pytest.raises(JobSpecError) as error:
        parse_job_spec({"output": {"uri": "gs://bucket/a"}})
    assert "output.uri: the scheme 'gs' is not supported" in str(error.value)


def test_abstopk_dictionary_is_k_sparse():
    spec = parse_job_spec({"dictionaries": [{"architecture": "abstopk", "latents": 128, "k": 8}]})
    assert spec.dictionaries[0].architecture == "abstopk"
    assert spec.lazy_adam(0, bf16=False)  # row-sparse gradients, as TopK
    assert spec.dictionary_name(0).startswith("resid_post-3-abstopk-128")
    with pytest.raises(JobSpecError) as error:
        parse_job_spec({"dictionaries": [{"architecture": "abstopk", "latents": 64, "k": 64}]})
    assert "k (64) must be smaller than latents (64)" in str(error.value)


def test_matryoshka_prefixes_are_checked_and_reach_the_dictionary():
    spec = parse_job_spec({"dictionaries": [{"architecture": "matryoshka_batchtopk", "latents": 64, "k": 4,
                                             "matryoshka_prefixes": [8, 24]}]})
    assert spec.dictionaries[0].matryoshka_prefixes == [8, 24] and spec.lazy_adam(0, bf16=False)
    from trainers.sae import sae_config_from_spec
    assert sae_config_from_spec(spec.dictionaries[0].model_dump(), d_in=16).prefix_ends == (8, 24, 64)
    cases = [({"architecture": "topk", "matryoshka_prefixes": 3}, "applies to matryoshka_topk"),
             ({"architecture": "matryoshka_topk", "latents": 64, "matryoshka_prefixes": [24, 8]}, "increasing sizes"),
             ({"architecture": "matryoshka_topk", "latents": 64, "k": 4, "matryoshka_prefixes": [8, 128]},
              "the largest prefix (128) is beyond latents (64)"),
             ({"architecture": "matryoshka_topk", "latents": 64, "k": 4, "matryoshka_prefixes": 8},
              "8 doubling groups need at least 2^7 latents")]
    for dictionary, message in cases:
        with pytest.raises(JobSpecError) as error:
            parse_job_spec({"dictionaries": [dictionary]})
        assert message in str(error.value), dictionary


def test_a_job_without_held_out_documents_is_refused_before_it_trains_when_it_needs_them():
    spec = JobSpec.model_validate({"data": {"holdout_fraction": 0.0}})  # a spec may stream without held-out data
    with pytest.raises(ValueError, match=r"no held-out documents for training.splice_eval_tokens and "
                                         r"analysis.enabled; raise data.holdout_fraction"):
        spec.check_held_out()
    JobSpec.model_validate({"data": {"holdout_fraction": 0.0}, "training": {"splice_eval_tokens": 0},
                            "analysis": {"enabled": False}}).check_held_out()
    JobSpec().check_held_out()


def test_transcoder_reads_one_site_and_reconstructs_a_later_one():
    spec = parse_job_spec({"dictionaries": [
        {"hook": {"layer": 1, "site": "mlp_in"}, "hook_out": {"layer": 1, "site": "mlp_out"}, "skip": True,
         "architecture": "batchtopk", "latents": 64, "k": 4},
        {"hook": {"layer": 1, "site": "mlp_out"}, "latents": 64, "k": 4}]})
    assert spec.hook_out_of(0).name == "blocks.1.hook_mlp_out" and spec.hook_out_of(1) is None
    assert [h.name for h in spec.hooks()] == ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    assert spec.dictionary_name(0) == "mlp_in-1-to-mlp_out-1-skip-batchtopk-64-k4"
    from trainers.sae import sae_config_from_spec
    cfg = sae_config_from_spec(spec.dictionaries[0].model_dump(), d_in=16)
    assert cfg.transcoder and cfg.skip
    assert not sae_config_from_spec(spec.dictionaries[1].model_dump(), d_in=16).transcoder
    transcoder = {"hook": {"layer": 1, "site": "mlp_in"}, "hook_out": {"layer": 1, "site": "mlp_out"},
                  "latents": 64, "k": 4}
    cases = [({"dictionaries": [{"skip": True}]}, "skip applies to transcoders only"),
             ({"dictionaries": [{**transcoder, "hook_out": {"layer": 0, "site": "mlp_out"}}]},
              "must come after the site it reads"),
             ({"dictionaries": [transcoder]}, "SAELens has no topk transcoder"),
             ({"dictionaries": [{**transcoder, "architecture": "abstopk"}], "output": {"formats": ["sparsify"]}},
              "sparsify loads TopK dictionaries only")]
    for data, message in cases:
        with pytest.raises(JobSpecError) as error:
            parse_job_spec(data)
        assert message in str(error.value), data
    topk = parse_job_spec({"dictionaries": [transcoder], "output": {"formats": ["sparsify"]}})
    assert topk.dictionaries[0].architecture == "topk"
    with pytest.raises(ValueError, match="hook_out.layer"):
        parse_job_spec({"dictionaries": [{**transcoder, "hook_out": {"layer": 5, "site": "mlp_out"}}],
                        "output": {"formats": ["sparsify"]}}).check_against_model(num_layers=3, d_model=16)
