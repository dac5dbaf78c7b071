"""A Ray that declares one GPU (the most common research machine): the default layout of a job — producer,
splice evaluator and trainer rank — runs to the end on it, and a job that needs more GPUs is refused at once.

torch here has no CUDA, so the actors compute on the CPU, but Ray's scheduling of the GPU requests is real:
a plan that asked for more than the one GPU would leave the job waiting forever, as it did before placement.
"""

import pytest
import ray

from api.jobspec import JobSpec
from services.placement import PlacementError, cluster_nodes, plan
from services.runner import run_job

pytestmark = pytest.mark.slow

JOB = {
    "name": "one-gpu", "model": {"random": {"family": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                            "intermediate_size": 64, "seed": 0}},
    "hook": {"layer": 0}, "data": {"context_length": 64},
    "dictionaries": [{"name": "d", "latents": 64, "k": 4, "initialization": "random"}],
    "training": {"tokens": 1024, "batch_tokens": 256, "warmup_steps": 0, "log_every_steps": 1, "eval_tokens": 256,
                 "splice_eval_tokens": 128},
    "tracking": {"experiment": "placement"},
}


@pytest.fixture(scope="module")
def one_gpu_ray(tmp_path_factory):
    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, object_store_memory=256 << 20)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAEFORGE_HOME", str(tmp_path_factory.mktemp("home")))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield
    ray.shutdown()


def test_default_layout_runs_to_the_end_on_one_gpu(one_gpu_ray):
    spec = JobSpec.model_validate(JOB)
    placed = plan(spec, cluster_nodes())
    assert placed.trainers_use_gpu and placed.producer.gpus > 0 and placed.evaluator.gpus > 0
    result = run_job(spec, quiet=True)
    (summary,) = result.dictionaries.values()
    assert summary["tokens"] == 1024 and "delta_lm_loss" in summary  # the evaluator on the shared GPU answered
    assert ray.available_resources().get("GPU", 0) == pytest.approx(1.0)  # everything handed back


def test_two_ranks_on_one_gpu_are_refused_with_the_numbers(one_gpu_ray):
    spec = JobSpec.model_validate({**JOB, "cluster": {"trainer_ranks": 2}})
    with pytest.raises(PlacementError, match=r"4 GPUs needed .* one per trainer rank .* 1 node\(s\) with 1 GPUs "
                                             r"in all; lower cluster.trainer_ranks to 1"):
        run_job(spec, quiet=True)
