"""A trainer worker killed mid-job: Ray Train restarts the group, the worker resumes from the last checkpoint
and the job finishes with the same token count as a straight run."""

import json
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from mlflow import MlflowClient

from api.jobspec import load_job_spec
from services.runner import run_job

pytestmark = pytest.mark.slow


def _train_worker_processes() -> list[psutil.Process]:
    """Ray Train workers of the cluster this test started (its raylet is our child), not any other Ray's."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def test_killed_trainer_worker_resumes_from_checkpoint(repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFORGE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = load_job_spec(repo_root / "examples" / "tiny.yaml")
    spec = spec.model_copy(update={
        "training": spec.training.model_copy(update={"tokens": 600 * 1024, "checkpoint_every_steps": 50}),
        "output": spec.output.model_copy(update={"uri": str(tmp_path / "job")}),
    })
    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=1 << 30)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_job(spec, quiet=True)), daemon=True)
    try:
        runner.start()
        checkpoints = tmp_path / "job" / "ray_train" / "train"
        deadline = time.monotonic() + 300
        snapshot = checkpoints / "checkpoint_manager_snapshot.json"
        while not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()):  # a registered checkpoint
            assert runner.is_alive() and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        victims = _train_worker_processes()
        assert len(victims) == 1, victims
        victims[0].kill()
        runner.join(timeout=600)
        assert not runner.is_alive()
    finally:
        ray.shutdown()
    result = outcome["result"]
    summary = result.dictionaries["tiny-topk"]
    assert summary["tokens"] == spec.training.tokens  # the same count as a straight run
    # It took up from a checkpoint, not from step 0: the restarted group reported where it resumed.
    history = MlflowClient(result.mlflow_uri).get_metric_history(result.child_runs["tiny-topk"], "resumed_from_step")
    resumed_at = [int(m.value) for m in history]
    assert resumed_at and all(step > 0 and step % 50 == 0 for step in resumed_at), resumed_at
    assert summary["held_out_fvu"] < 0.5
    # Ray Train keeps keep_checkpoints of the checkpoints it registered. A checkpoint the killed worker wrote but
    # never reported stays on disk unregistered (Ray does not prune what it never saw): at most that one more.
    registered = {r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]}
    kept = {p.name for p in checkpoints.glob("checkpoint_*") if p.is_dir()}
    assert 1 <= len(registered) <= spec.training.keep_checkpoints and registered <= kept
    assert len(kept - registered) <= 1, sorted(kept - registered)
    assert Path(result.output_uri, "dictionaries", "tiny-topk", "cfg.json").is_file()
