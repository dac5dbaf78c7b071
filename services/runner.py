"""The job runner: one job from JobSpec to exported dictionaries, on a local or remote Ray cluster.

producers (ActivationProducer actors) ──► ActivationBuffer actor ──► Ray Train worker group (trainers/)
                                                  JobMonitor actor ◄── metrics / results of rank 0
The runner itself drains the monitor into MLflow and onto the progress display while training runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import yaml

from api.jobspec import JobSpec, new_job_id
from api.paths import checked_spec
from services.buffer import start_buffer
from services.buffer_stats import log_stats_periodically
from services.evaluation import SpliceEvaluator
from services.hub import is_hub_id
from services.monitor import JobMonitor
from services.placement import cluster_nodes, local_cpus, plan, trainers_see_cuda
from services.producer import start_producers
from services.tracking import JobTracking, flatten, tracking_uri, ui_command
from storage.uri import filesystem, is_local, join, local_path, pyarrow_filesystem
from trainers.sae import sae_config_from_spec

LOCAL_OBJECT_STORE_BYTES = 1 << 30


@dataclass
class JobResult:
    job_id: str
    output_uri: str
    experiment_id: str
    mlflow_run_id: str
    mlflow_uri: str
    mlflow_ui: str
    seconds: float
    dictionaries: dict[str, dict] = field(default_factory=dict)
    child_runs: dict[str, str] = field(default_factory=dict)
    stopped_at: dict[str, int] | None = None  # {"step", "tokens"} when the job checkpointed and stopped early


@dataclass
class Progress:
    tokens_done: int
    tokens_total: int
    tokens_per_s: float
    latest: dict[str, dict[str, float]]  # per dictionary, its latest metrics
    phase: str = "training"  # then "analysis" (services/analysis.py), when the job analyses its dictionaries


def service_home() -> Path:
    return Path(os.environ.get("SAEFORGE_HOME", "runs")).resolve()


def absolute_paths(spec: JobSpec) -> JobSpec:
    """Local paths made absolute, so actors started in other working directories find them."""
    updates = {}
    if spec.model.random is None and spec.model.name != "embedded" and not is_hub_id(spec.model.name):
        updates["model"] = spec.model.model_copy(update={"name": str(Path(spec.model.name).expanduser().resolve())})
    data: dict = {}
    if (spec.data.source != "embedded" and "://" not in spec.data.source and not is_hub_id(spec.data.source)
            and not Path(spec.data.source).is_absolute()):
        data["source"] = str(Path(spec.data.source).resolve())
    cache = {k: str(Path(v).resolve()) for k, v in spec.data.cache.model_dump(include={"read", "write"}).items()
             if v is not None and "://" not in v}
    if cache:
        data["cache"] = spec.data.cache.model_copy(update=cache)
    if data:
        updates["data"] = spec.data.model_copy(update=data)
    return spec.model_copy(update=updates)


def connect_ray(spec: JobSpec, quiet: bool) -> bool:
    """Join the cluster (spec, then RAY_ADDRESS) or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    address = spec.cluster.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no token
    ray.init(num_cpus=local_cpus(spec), include_dashboard=False, log_to_driver=not quiet,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    return True


def _dictionary_tags(spec: JobSpec, index: int, d_model: int) -> dict[str, str]:
    d, hook, out = spec.dictionaries[index], spec.hook_of(index), spec.hook_out_of(index)
    latents = d.resolved_latents(d_model)
    tags = {"model": spec.model.label, "site": hook.site, "layer": str(hook.layer), "hook_name": hook.name,
            "architecture": d.architecture, "latents": str(latents), "k": str(d.k)}
    cfg = sae_config_from_spec({**d.model_dump(), "latents": latents}, d_model)
    if cfg.matryoshka:  # the compare table's kind: prefix sizes, and a transcoder's target site
        tags["matryoshka_prefixes"] = ",".join(str(end) for end in cfg.prefix_ends)
    if out is not None:
        tags.update(site_out=out.site, layer_out=str(out.layer), hook_name_out=out.name, skip=str(d.skip).lower())
    return tags


def checkpoint_storage(output_uri: str) -> str:
    """Where Ray Train keeps a job's checkpoints (`train/checkpoint_*` below it)."""
    return join(output_uri, "ray_train")


def saved_checkpoints(output_uri: str) -> list[str]:
    fs, path = filesystem(checkpoint_storage(output_uri))
    return sorted(p for p in fs.glob(join(path, "train", "checkpoint_*"))  # not Ray's checkpoint_manager_snapshot.json
                  if not p.endswith(".json"))


def run_job(spec: JobSpec, job_id: str | None = None, quiet: bool = False,
            on_progress: Callable[[Progress], None] | None = None, resume: str = "no",
            stop_at_step: int | None = None) -> JobResult:
    """Run one job to the end; raises on failure (the MLflow run is then marked FAILED).

    resume: "no" (the job's output must hold no checkpoints), "yes" (continue from its latest checkpoint: the
    same job id or output.uri; the spec may change the number of ranks) or "auto" (resume when there is one —
    what the service does when it resubmits a job). stop_at_step: checkpoint at that step and stop.
    """
    started = time.perf_counter()
    spec = absolute_paths(checked_spec(spec))  # the service's path policy again, before storage is touched
    spec.check_held_out()
    home = service_home()
    job_id = job_id or new_job_id(spec.name)
    output_uri = spec.output.uri or str(home / job_id)
    if is_local(output_uri):
        output_uri = str(Path(local_path(output_uri)).resolve())
    found = saved_checkpoints(output_uri)
    if resume == "yes" and not found:
        raise ValueError(f"nothing to resume: no checkpoint under {checkpoint_storage(output_uri)}; give the id "
                         "of a job that checkpointed (training.checkpoint_every_steps) or run without --resume")
    if resume == "no" and found:
        raise ValueError(f"{output_uri} already holds {len(found)} checkpoint(s) of job {job_id}: continue it "
                         "with --resume, or give a new --job-id / output.uri")
    resuming = resume != "no" and bool(found)
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    fs, path = filesystem(output_uri)
    fs.makedirs(path, exist_ok=True)
    spec_file = f"job-resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml" if resuming else "job.yaml"
    with fs.open(join(path, spec_file), "w") as f:  # a resume keeps the spec the job started with
        f.write(spec_yaml)

    home.mkdir(parents=True, exist_ok=True)
    tracking = JobTracking(tracking_uri(home), spec.tracking.experiment, artifact_root=home / "mlartifacts")
    parent = tracking.start(job_id, flatten(spec.model_dump(mode="json")),
                            {"saeforge.output_uri": output_uri, "model": spec.model.label,
                             "saeforge.resumed": str(resuming).lower(), **spec.tracking.tags})
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "job.yaml").write_text(spec_yaml)
        tracking.log_artifact(parent, str(Path(scratch) / "job.yaml"))
    started_ray = connect_ray(spec, quiet)
    actors: list = []
    try:
        result, stopped = _run(spec, job_id, output_uri, tracking, actors, on_progress, stop_at_step)
        if not stopped and spec.analysis.enabled:
            from services.analysis import analyze_with_tracking

            for actor in actors:  # the analysis loads the model itself: free the producers' memory first
                ray.kill(actor)
            actors.clear()
            analyze_with_tracking(spec, job_id, output_uri, tracking, result, None if on_progress is None else (
                lambda done, total: on_progress(Progress(done, total, 0.0, {}, phase="analysis"))))
        tracking.end("KILLED" if stopped else "FINISHED")
    except BaseException:
        tracking.end("FAILED")
        raise
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
    return JobResult(job_id, output_uri, tracking.experiment_id, parent, tracking.uri, ui_command(tracking.uri),
                     time.perf_counter() - started, result, dict(tracking.child_runs), stopped_at=stopped)


def _run(spec: JobSpec, job_id: str, output_uri: str, tracking: JobTracking, actors: list,
         on_progress: Callable[[Progress], None] | None,
         stop_at_step: int | None) -> tuple[dict[str, dict], dict[str, int] | None]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.worker import train_worker

    placement = plan(spec, cluster_nodes())  # refused here, before any actor starts, when the cluster cannot hold it
    cuda = trainers_see_cuda(placement)  # nccl on GPUs torch can use; gloo where Ray's GPUs are not CUDA's
    spec_json = spec.model_dump_json()
    producers = start_producers(spec, placement.producer)  # model producers, or cache readers with data.cache.read
    actors.extend(producers)
    held_out = producers[0].held_out_batch.remote(spec.training.eval_tokens) if spec.training.eval_tokens else None
    buffer = start_buffer(spec, producers, held_out, job_id)  # writes data.cache.write when given
    monitor = ray.remote(JobMonitor).options(num_cpus=0).remote()
    actors.extend([buffer, monitor])
    evaluator = None
    if placement.evaluator is not None:  # splice evaluation, unless the job reads a cache (no model)
        evaluator = ray.remote(SpliceEvaluator).options(**placement.evaluator.options()).remote(spec_json, monitor)
        actors.append(evaluator)
    log_stats_periodically(buffer, lambda stats, step: tracking.log_metrics(tracking.parent_run_id, stats, step))

    # The trainer group starts while the producers load the model: both take seconds, neither needs the other
    # until the first batch (the trainers read d from it).
    # Checkpoints go to the job's storage through the same fsspec file system as its other outputs (S3
    # endpoints included); Ray Train keeps the last keep_checkpoints and hands the latest to a restarted group
    # and to a resumed job (the same storage path and run name).
    storage_fs, storage_path = pyarrow_filesystem(checkpoint_storage(output_uri))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec_json": spec_json, "buffer": buffer, "monitor": monitor,
                           "held_out": held_out, "evaluator": evaluator, "output_uri": output_uri,
                           "job_id": job_id, "stop_at_step": stop_at_step},
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=placement.scaling_config(),
        run_config=RunConfig(name="train", storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=spec.cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.training.keep_checkpoints)),
    )
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the runner's thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name=f"fit-{job_id}", daemon=True)
    thread.start()

    info = ray.get(producers[0].info.remote())
    spec.check_against_model(info["num_layers"], info["d_model"])  # raising here kills the actors: fit fails
    corpus = {"data_epochs": spec.data.epochs, "corpus_tokens": info.get("cache_tokens"),
              "corpus_documents": info.get("corpus_documents"), "corpus_pieces": info.get("corpus_pieces")}
    tracking.log_metrics(tracking.parent_run_id, {k: v for k, v in corpus.items() if v is not None}, step=0)
    d_model = info["d_model"]
    for i in range(len(spec.dictionaries)):
        d = spec.dictionaries[i]
        tracking.start_child(spec.dictionary_name(i),
                             {**flatten(d.model_dump(mode="json")), "latents": str(d.resolved_latents(d_model)),
                              "lr": str(d.resolved_lr(d_model)), "d_in": str(d_model)},
                             _dictionary_tags(spec, i, d_model))
    latest: dict[str, dict[str, float]] = {}
    tokens_total = spec.total_tokens
    while True:
        alive = thread.is_alive()
        records = ray.get(monitor.drain.remote())
        if records:
            tracking.log_records(records)
            for record in records:
                latest.setdefault(record["dictionary"], {}).update(record["metrics"], tokens=record["tokens"])
            if on_progress is not None:
                done = max((m.get("tokens", 0) for m in latest.values()), default=0)
                rate = min((m.get("tokens_per_s", 0.0) for m in latest.values()), default=0.0)
                on_progress(Progress(int(done), tokens_total, rate, latest))
        if not alive:
            break
        time.sleep(0.5)
    if "error" in outcome:
        raise outcome["error"]
    stopped = ray.get(monitor.stopped_at.remote())
    if stopped is not None:
        return {}, stopped
    results = ray.get(monitor.final_results.remote())
    trained = max((int(r.get("tokens", 0)) for r in results.values()), default=0)
    if results and trained < spec.total_tokens:  # the stream ended first: said in MLflow and in the result
        tracking.set_tags(tracking.parent_run_id, {"saeforge.stream_ended": (
            f"trained {trained:,} of {spec.total_tokens:,} tokens: the corpus ran out after data.epochs = "
            f"{spec.data.epochs}")})
    buffer_stats = ray.get(buffer.stats.remote())
    tracking.log_metrics(tracking.parent_run_id, {f"buffer_{k}": v for k, v in buffer_stats.items()},
                         step=spec.steps)
    for name, result in results.items():
        _log_result(tracking, name, result, spec.steps, output_uri)
    return results, None


def _log_result(tracking: JobTracking, name: str, result: dict, step: int, output_uri: str) -> None:
    """Final metrics, the firing-frequency histogram, the result and the exported files, to the child run."""
    from trainers.plots import firing_frequency_histogram

    run_id = tracking.child_runs[name]
    scalars = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    tracking.log_metrics(run_id, {f"final_{k}": v for k, v in scalars.items()}, step=step)
    frequencies = np.asarray(result.pop("firing_frequencies"))
    with tempfile.TemporaryDirectory() as scratch:
        plots = Path(local_path(output_uri)) / "plots" if is_local(output_uri) else Path(scratch)
        plots.mkdir(parents=True, exist_ok=True)
        result["firing_plot"] = str(plots / f"{name}_firing_frequencies.png")
        firing_frequency_histogram(frequencies, Path(result["firing_plot"]),
                                   title=f"{name}: latent firing frequencies")
        tracking.log_artifact(run_id, result["firing_plot"], "plots")
        (Path(scratch) / "result.json").write_text(json.dumps(result, indent=2, default=str))
        tracking.log_artifact(run_id, str(Path(scratch) / "result.json"))
    uri = result.get("saelens_uri")
    if uri:  # the service reads output URIs back from MLflow
        tracking.set_tags(run_id, {"saeforge.saelens_uri": str(uri)})
    if uri and is_local(uri):
        tracking.log_artifacts(run_id, local_path(uri), "saelens")
