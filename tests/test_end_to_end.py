"""examples/tiny.yaml end to end: a real local Ray, producer and buffer actors, a Ray Train worker with a
DeepSpeed engine, MLflow on SQLite, and the SAELens export read back with SAELens' own loader."""

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from api.jobspec import load_job_spec
from services.model_producer import ActivationProducer
from services.runner import run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_job(repo_root, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAEFORGE_HOME", str(home))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        spec = load_job_spec(repo_root / "examples" / "tiny.yaml")
        seen = []
        result = run_job(spec, quiet=True, on_progress=seen.append)
    return spec, result, seen


def test_job_reports_progress_and_a_good_dictionary(tiny_job):
    spec, result, seen = tiny_job
    training = [p for p in seen if p.phase == "training"]  # the analysis stage reports its own phase after it
    assert training and training[-1].tokens_done == spec.training.tokens == training[-1].tokens_total
    assert seen[-1].phase == "analysis" and seen[-1].tokens_done > 0
    # the held-out slice is shorter than analysis.tokens (1M): the stage's last report completes its bar there
    assert seen[-1].tokens_done == seen[-1].tokens_total < spec.analysis.tokens
    (name, summary), = result.dictionaries.items()
    assert name == "tiny-topk"
    assert summary["tokens"] == spec.training.tokens
    assert summary["held_out_fvu"] < 0.5, summary
    assert summary["held_out_l0"] == pytest.approx(8.0)
    # tiny.yaml's window (50,000 tokens) is a quarter of its 204,800: dead latents are measurable
    assert summary["dead_window_tokens"] == 50_000 and summary["dead_window_complete"] is True
    # Spliced into the whole model on held-out text. A random model predicts near-uniformly whatever its
    # activations (CE ≈ ln 384 clean, spliced and zero-ablated alike), so only consistency is checked here.
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "delta_lm_loss"):
        assert np.isfinite(summary[key]), key
    assert summary["delta_lm_loss"] == pytest.approx(summary["ce_spliced"] - summary["ce_clean"])
    assert abs(summary["delta_lm_loss"]) < 0.1


def test_mlflow_has_the_runs_params_metrics_and_artifacts(tiny_job):
    spec, result, _ = tiny_job
    client = MlflowClient(tracking_uri=result.mlflow_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["training.tokens"] == str(spec.training.tokens)
    assert [a.path for a in client.list_artifacts(result.mlflow_run_id)] == ["job.yaml"]
    child_id = result.child_runs["tiny-topk"]
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == result.mlflow_run_id
    assert child.data.tags["architecture"] == "topk" and child.data.tags["site"] == "resid_post"
    for key in ("fvu", "l0", "dead_fraction", "never_fired_fraction", "tokens_per_s", "final_held_out_fvu",
                "delta_lm_loss", "ce_loss_recovered", "final_ce_loss_recovered", "final_never_fired_fraction"):
        assert key in child.data.metrics, key
    history = client.get_metric_history(child_id, "fvu")
    assert len(history) == spec.training.steps // spec.training.log_every_steps
    assert history[-1].value < history[0].value  # it learned
    artifacts = {a.path for a in client.list_artifacts(child_id, "saelens")}
    assert artifacts == {"saelens/cfg.json", "saelens/sae_weights.safetensors"}
    assert [a.path for a in client.list_artifacts(child_id, "plots")] == ["plots/tiny-topk_firing_frequencies.png"]


def test_export_loads_in_saelens_and_reconstructs_held_out_activations(tiny_job):
    from sae_lens import SAE

    spec, result, _ = tiny_job
    summary = result.dictionaries["tiny-topk"]
    sae = SAE.load_from_disk(summary["saelens_uri"])
    assert sae.cfg.d_in == 64 and sae.cfg.d_sae == 256
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata.training_tokens == spec.training.tokens
    producer = ActivationProducer(spec.model_dump_json())
    held_out = torch.from_numpy(producer.held_out_batch(spec.training.eval_tokens)["blocks.1.hook_resid_post"])
    with torch.no_grad():
        reconstruction = sae(held_out)
    fvu = float((held_out - reconstruction).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum())
    assert fvu == pytest.approx(summary["held_out_fvu"], rel=1e-3, abs=1e-4)
    assert np.isclose(float((sae.encode(held_out) > 0).sum(-1).float().mean()), 8.0)


def test_checkpoint_written_at_the_interval(tiny_job):
    _, result, _ = tiny_job
    from pathlib import Path

    checkpoints = sorted(p for p in Path(result.output_uri, "ray_train", "train").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 1  # 200 steps, every 100, the last step exports instead
    assert (checkpoints[0] / "trainer_state.json").is_file() and (checkpoints[0] / "tiny-topk").is_dir()
