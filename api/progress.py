"""A job's progress and results, read back from MLflow (the parent run tagged saeforge.job_id, one child run
per dictionary), so the API needs no file system shared with the cluster."""

from __future__ import annotations

import math
from typing import Any

from api.jobspec import trained_tokens
from services.tracking import find_job_runs, run_url

DEFAULT_UI = "http://127.0.0.1:5000"


def tokens_total(spec: dict[str, Any]) -> int:
    """The tokens a stored JobSpec trains on (JobSpec.total_tokens, from the dict: its files may be gone)."""
    training, cluster = spec.get("training", {}), spec.get("cluster", {})
    replicas = max(int(cluster.get("trainer_ranks", 1)) // max(int(cluster.get("latent_shards", 1)), 1), 1)
    return trained_tokens(int(training.get("tokens", 0)), max(int(training.get("batch_tokens", 1)), 1), replicas,
                          max(int(training.get("gradient_accumulation_steps", 1)), 1))


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def snapshot(client, experiment: str, job_id: str, ui_base: str | None) -> dict[str, Any] | None:
    """{"experiment_id", "run_id", "run_url", "run_status", "output_uri", "dictionaries": [...]} or None."""
    parent, children = find_job_runs(client, experiment, job_id)
    if parent is None:
        return None
    base = ui_base or DEFAULT_UI
    experiment_id = parent.info.experiment_id
    dictionaries = []
    for child in children:
        tags = child.data.tags
        dictionaries.append({
            "name": child.info.run_name or child.info.run_id,
            "run_id": child.info.run_id,
            "run_url": run_url(base, experiment_id, child.info.run_id),
            "run_status": child.info.status,
            "metrics": _finite(child.data.metrics),
            "tags": {k: v for k, v in tags.items() if not k.startswith("mlflow.")},
            "output_uri": tags.get("saeforge.saelens_uri"),
        })
    return {
        "experiment_id": experiment_id,
        "run_id": parent.info.run_id,
        "run_url": run_url(base, experiment_id, parent.info.run_id),
        "run_status": parent.info.status,
        "output_uri": parent.data.tags.get("saeforge.output_uri"),
        "dictionaries": dictionaries,
    }


def progress(spec: dict[str, Any], state: str, snap: dict[str, Any] | None, started_at: float | None,
             now: float) -> dict[str, Any]:
    total = tokens_total(spec)
    metrics = [d["metrics"] for d in (snap or {}).get("dictionaries", [])]
    done = int(min((m.get("tokens", 0.0) for m in metrics), default=0.0))
    rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    rate = min(rates) if rates else None
    if state == "succeeded":
        done = total
    done = min(done, total)
    eta = None
    if state == "running" and rate and rate > 0:
        eta = (total - done) / rate
    return {"tokens_done": done, "tokens_total": total, "fraction": done / total if total else 0.0,
            "tokens_per_s": rate, "eta_s": eta,
            "elapsed_s": max(now - started_at, 0.0) if started_at else None}
