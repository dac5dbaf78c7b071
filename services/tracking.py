"""MLflow tracking of a job: one parent run per job, one child run per dictionary.

The experiment is created once by the job runner and its id passed on (several processes calling
set_experiment on a new name race); metrics go through log_batch (one call for many values).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

MAX_BATCH = 1000


def tracking_uri(home: Path) -> str:
    """MLFLOW_TRACKING_URI from the environment wins; otherwise a SQLite file in the service's home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(home / 'mlflow.db').resolve()}"


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists as dotted keys with string values (MLflow params)."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return {prefix: str(data)[:6000]}
    flat: dict[str, str] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class JobTracking:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment(experiment, artifact_root)
        self.parent_run_id: str | None = None
        self.child_runs: dict[str, str] = {}

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if artifact_root is not None and self.uri.startswith("sqlite:"):
            location = (artifact_root / name).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            return self.client.get_experiment_by_name(name).experiment_id

    def start(self, job_id: str, params: dict[str, str], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=job_id, tags={"saeforge.job_id": job_id, **tags})
        self.parent_run_id = run.info.run_id
        self._log(self.parent_run_id, params=params)
        return self.parent_run_id

    def start_child(self, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent_run_id, **tags})
        self.child_runs[name] = run.info.run_id
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._log(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_records(self, records: list[dict]) -> None:
        """Records from the JobMonitor: {"dictionary", "step", "tokens", "metrics"}, batched per run."""
        now = int(time.time() * 1000)
        per_run: dict[str, list[Metric]] = {}
        for record in records:
            run_id = self.child_runs[record["dictionary"]]
            per_run.setdefault(run_id, []).extend(
                Metric(k, float(v), now, record["step"]) for k, v in {**record["metrics"],
                                                                      "tokens": record["tokens"]}.items())
        for run_id, metrics in per_run.items():
            self._log(run_id, metrics=metrics)

    def _log(self, run_id: str, metrics: list[Metric] | None = None, params: dict[str, str] | None = None) -> None:
        """log_batch within MLflow's limits: 1,000 metrics or 100 params per call."""
        metrics = metrics or []
        param_list = [Param(k, v) for k, v in (params or {}).items()]
        for start in range(0, len(param_list), 100):
            self.client.log_batch(run_id, params=param_list[start:start + 100])
        for start in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + MAX_BATCH])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, local_dir, artifact_path)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, local_path, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        for run_id in [*self.child_runs.values(), self.parent_run_id]:
            if run_id is not None:
                self.client.set_terminated(run_id, status=status)


def find_job_runs(client: MlflowClient, experiment: str, job_id: str) -> tuple[Any, list[Any]]:
    """The newest parent run tagged saeforge.job_id = job_id in the experiment, and its child runs (one per
    dictionary); (None, []) when the job has not reached MLflow yet."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None, []
    quoted = job_id.replace("\\", "\\\\").replace("'", "\\'")
    parents = client.search_runs([found.experiment_id], filter_string=f"tags.`saeforge.job_id` = '{quoted}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return None, []
    parent = parents[0]
    children = client.search_runs([found.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=1000)
    return parent, sorted(children, key=lambda run: run.info.run_name or "")


def run_url(ui_base: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
