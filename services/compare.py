"""Compare the dictionaries of an experiment, read back from MLflow: one row per dictionary (child run) and a
Pareto plot of L0 against FVU (lower is better on both) with the frontier drawn, saved as PNG and logged to
the experiment's comparison run.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

COMPARE_TAG = "saeforge.kind"
COMPARE_RUN = "saeforge-compare"
PLOT_NAME = "pareto_l0_fvu.png"
POINT_COLOR = "#1f77b4"  # ordinary points
FRONT_COLOR = "#d62728"  # points on the frontier
FRONT_LINE = "#7f7f7f"


class ExperimentNotFound(LookupError):
    pass


def _metric(metrics: dict[str, float], *names: str) -> float | None:
    for name in names:
        value = metrics.get(name)
        if value is not None and math.isfinite(value):
            return float(value)
    return None


def _all_runs(client: MlflowClient, experiment_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def compare_rows(client: MlflowClient, experiment: str, job_id: str | None = None) -> tuple[str, list[dict]]:
    """(experiment id, rows): one row per dictionary run of the experiment (of one job when job_id is given)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ExperimentNotFound(f"no MLflow experiment named {experiment!r}")
    runs = _all_runs(client, found.experiment_id)
    parents = {r.info.run_id: r for r in runs if "saeforge.job_id" in r.data.tags}
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        parent = parents.get(tags.get("mlflow.parentRunId", ""))
        if parent is None or "architecture" not in tags:
            continue
        run_job = parent.data.tags["saeforge.job_id"]
        if job_id is not None and run_job != job_id:
            continue
        dead = _metric(metrics, "final_dead_fraction", "dead_fraction")
        never = _metric(metrics, "final_never_fired_fraction", "never_fired_fraction")
        window = _metric(metrics, "final_dead_window_tokens")
        tokens, seconds = _metric(metrics, "final_tokens"), _metric(metrics, "final_train_seconds")
        rate = tokens / seconds if tokens and seconds else _metric(metrics, "tokens_per_s")
        rows.append({
            "job_id": run_job,
            "dictionary": run.info.run_name or run.info.run_id,
            "architecture": tags.get("architecture"),
            "matryoshka_prefixes": tags.get("matryoshka_prefixes"),  # "16,32,64" (Matryoshka kinds)
            "site_out": tags.get("site_out"),  # a transcoder's target site (with skip: "skip" true)
            "skip": tags.get("skip") == "true" if "skip" in tags else None,
            "model": tags.get("model"),
            "site": tags.get("site"),
            "layer": int(tags["layer"]) if tags.get("layer", "").isdigit() else None,
            "latents": int(tags["latents"]) if tags.get("latents", "").isdigit() else None,
            "k": int(tags["k"]) if tags.get("k", "").isdigit() else None,
            "l0": _metric(metrics, "final_held_out_l0", "l0"),
            "fvu": _metric(metrics, "final_held_out_fvu", "fvu"),
            "dead_pct": 100 * dead if dead is not None else None,
            "never_fired_pct": 100 * never if never is not None else None,
            "dead_window_tokens": int(window) if window is not None else None,
            # dead_pct counts latents silent for a whole window: a run shorter than it cannot have any
            "dead_window_complete": tokens >= window if tokens is not None and window is not None else None,
            "delta_lm_loss": _metric(metrics, "final_delta_lm_loss", "delta_lm_loss"),
            "tokens_per_s": rate,
            "tokens": int(tokens) if tokens is not None else None,
            "status": run.info.status,
            "run_id": run.info.run_id,
        })
    return found.experiment_id, rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (minimising both), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_plot(rows: list[dict], path: Path, title: str) -> int:
    """Scatter L0 vs FVU, one point per row that has both, frontier drawn; returns the number of points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in rows if r["l0"] is not None and r["fvu"] is not None]
    points = [(r["l0"], r["fvu"]) for r in usable]
    front = pareto_front(points)
    figure, axes = plt.subplots(figsize=(7, 5), dpi=100)
    others = [i for i in range(len(points)) if i not in front]
    # One marker per dictionary, in exactly two colours and nowhere else (no legend markers), so the picture
    # itself can be checked: red = on the frontier, blue = dominated; the frontier line is grey.
    if front:
        axes.plot([points[i][0] for i in front], [points[i][1] for i in front], color=FRONT_LINE, linewidth=1,
                  linestyle="--", zorder=2)
    for indices, color in ((others, POINT_COLOR), (front, FRONT_COLOR)):
        if indices:
            axes.scatter([points[i][0] for i in indices], [points[i][1] for i in indices], s=60, color=color,
                         zorder=3, edgecolors="none")
    for (x, y), row in zip(points, usable, strict=True):
        axes.annotate(row["dictionary"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=7)
    axes.set_xlabel("L0 (active latents per token)")
    axes.set_ylabel("FVU (fraction of variance unexplained)")
    axes.set_title(f"{title}\nred: Pareto frontier (lower L0 and FVU are better)", fontsize=10)
    axes.grid(True, alpha=0.3)
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        pad_x, pad_y = (max(xs) - min(xs)) * 0.15 or 1.0, (max(ys) - min(ys)) * 0.15 or 0.05
        axes.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        axes.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Description": f"saeforge Pareto plot: {len(points)} points"})
    plt.close(figure)
    return len(points)


def _compare_run(client: MlflowClient, experiment_id: str) -> str:
    found = client.search_runs([experiment_id], filter_string=f"tags.`{COMPARE_TAG}` = 'compare'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=COMPARE_RUN, tags={COMPARE_TAG: "compare"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def compare(tracking_uri: str, experiment: str, job_id: str | None = None, plot_path: Path | None = None,
            log_to_mlflow: bool = True) -> dict[str, Any]:
    """The table and the plot; the PNG is written to plot_path (default a temporary file) and logged to the
    experiment's comparison run (one per experiment, the plot replaced on every comparison)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id, rows = compare_rows(client, experiment, job_id)
    scratch = None
    if plot_path is None:
        scratch = tempfile.TemporaryDirectory()
        plot_path = Path(scratch.name) / PLOT_NAME
    title = f"{experiment}: L0 vs FVU" + (f" (job {job_id})" if job_id else "")
    points = pareto_plot(rows, plot_path, title)
    usable = [r for r in rows if r["l0"] is not None and r["fvu"] is not None]
    front = {usable[i]["run_id"] for i in pareto_front([(r["l0"], r["fvu"]) for r in usable])}
    for row in rows:
        row["on_frontier"] = row["run_id"] in front
    result = {"experiment": experiment, "experiment_id": experiment_id, "job_id": job_id, "rows": rows,
              "points": points, "plot_png": plot_path.read_bytes(), "plot_run_id": None, "plot_artifact": None}
    if log_to_mlflow:
        run_id = _compare_run(client, experiment_id)
        artifact_dir = "compare" if job_id is None else f"compare/{job_id}"
        client.log_artifact(run_id, str(plot_path), artifact_dir)
        client.set_tag(run_id, "saeforge.compared_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        result["plot_run_id"], result["plot_artifact"] = run_id, f"{artifact_dir}/{plot_path.name}"
    if scratch is not None:
        scratch.cleanup()
    return result


def format_table(rows: list[dict]) -> str:
    columns = [("job_id", "job"), ("dictionary", "dictionary"), ("architecture", "arch"),
               ("matryoshka_prefixes", "prefixes"), ("site_out", "predicts"), ("latents", "latents"),
               ("k", "k"), ("l0", "L0"), ("fvu", "FVU"), ("dead_pct", "dead %"), ("delta_lm_loss", "ΔLM loss"),
               ("tokens_per_s", "tok/s"), ("status", "status"), ("on_frontier", "frontier")]

    def cell(value: Any, key: str) -> str:
        if value is None:
            return "-"
        if key == "on_frontier":
            return "*" if value else ""
        if isinstance(value, float):
            return f"{value:,.0f}" if key == "tokens_per_s" else f"{value:.4g}"
        return str(value)

    table = [[title for _, title in columns]] + [[cell(r.get(key), key) for key, _ in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table)
