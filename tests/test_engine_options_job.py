"""DeepSpeed's memory options through the whole job: two data-parallel replicas (ZeRO-1 splits Adam's state
between them), that state offloaded to CPU, and gradients accumulated over two batches per optimizer step. A
stop asked for between the two batches of an optimizer step waits for its end, and the resumed job ends with
the dictionary of a straight run."""

import pytest
import ray
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from api.jobspec import load_job_spec
from services.runner import run_job

pytestmark = pytest.mark.slow
STEPS, ACCUMULATION, REPLICAS = 24, 2, 2  # batches per replica
STOP_ASKED = 11  # inside the sixth optimizer step: the job stops after batch 12


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(f"{result.dictionaries['tiny-topk']['saelens_uri']}/sae_weights.safetensors")


@pytest.fixture(scope="module")
def runs(repo_root, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("options")
    base = load_job_spec(repo_root / "examples" / "tiny.yaml")
    base = base.model_copy(update={
        "training": base.training.model_copy(update={
            "tokens": STEPS * REPLICAS * 1024, "gradient_accumulation_steps": ACCUMULATION, "warmup_steps": 4,
            "log_every_steps": 2, "checkpoint_every_steps": 0, "splice_eval_tokens": 0}),
        "cluster": base.cluster.model_copy(update={"trainer_ranks": REPLICAS, "zero_stage": 1,
                                                   "offload_optimizer": True})})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAEFORGE_HOME", str(tmp_path))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=1 << 30)
        try:
            straight = run_job(base.model_copy(update={"output": base.output.model_copy(
                update={"uri": str(tmp_path / "straight")})}), quiet=True)
            stopping = base.model_copy(update={"output": base.output.model_copy(
                update={"uri": str(tmp_path / "stopped")})})
            stopped = run_job(stopping, quiet=True, stop_at_step=STOP_ASKED)
            resumed = run_job(stopping, quiet=True, resume="yes")
        finally:
            ray.shutdown()
    return straight, stopped, resumed


def test_the_options_train_and_resume_at_an_optimizer_step(runs):
    straight, stopped, resumed = runs
    assert stopped.stopped_at == {"step": 12, "tokens": 12 * REPLICAS * 1024}
    summary = straight.dictionaries["tiny-topk"]
    assert summary["tokens"] == resumed.dictionaries["tiny-topk"]["tokens"] == STEPS * REPLICAS * 1024
    history = MlflowClient(straight.mlflow_uri).get_metric_history(straight.child_runs["tiny-topk"], "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == STEPS // 2 and losses[-1] < 0.8 * losses[0]  # it learns
    resumed_weights = _weights(resumed)
    for name, value in _weights(straight).items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
