"""The Ray Train worker entry: the per-rank training loop of every dictionary in a job.

Each rank pulls its own batches from the ActivationBuffer (data parallel across ranks; DeepSpeed reduces
the gradients), trains every dictionary of the job on the hook it reads, sends metrics to the JobMonitor,
checkpoints through Ray Train, and at the end evaluates on held-out activations and exports (rank 0).
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from api.jobspec import JobSpec
from storage.export import saelens_config, save_saelens
from storage.uri import join
from trainers.engine import build_engine, distributed_backend, use_bf16
from trainers.metrics import FiringTracker, l0
from trainers.sae import SparseAutoencoder, sae_config_from_spec

STATE_FILE = "trainer_state.json"


@dataclass
class Dictionary:
    name: str
    hook_name: str
    sae: SparseAutoencoder
    engine: object
    tracker: FiringTracker
    init_info: dict


def _fetch(buffer) -> dict[str, np.ndarray]:
    """The next batch; its arrays are read-only views of the object store (zero-copy), never written to."""
    [ref] = ray.get(buffer.next.remote())
    return ray.get(ref)


def _all_reduce_(tensor: torch.Tensor, world: int, op=None) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _build(spec: JobSpec, index: int, sample: np.ndarray, device: torch.device) -> Dictionary:
    dictionary = spec.dictionaries[index]
    d_model = sample.shape[1]
    latents = dictionary.resolved_latents(d_model)
    cfg = sae_config_from_spec({**dictionary.model_dump(), "latents": latents}, d_model)
    sae = SparseAutoencoder(cfg, device=device)
    generator = torch.Generator().manual_seed(spec.training.seed + index)
    info = sae.initialize(_tensor(sample).to(device), generator=generator)
    engine = build_engine(sae, lr=dictionary.resolved_lr(d_model), total_steps=spec.training.steps,
                          warmup_steps=spec.training.warmup_steps, zero_stage=spec.cluster.zero_stage,
                          bf16=use_bf16(spec.training.precision, device))
    tracker = FiringTracker(latents, dictionary.dead_window_tokens, device=device)
    return Dictionary(spec.dictionary_name(index), spec.hook_of(index).name, sae, engine, tracker, info)


def _tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only object-store memory: torch warns, but nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _input(d: Dictionary, batch: dict[str, np.ndarray], device: torch.device) -> torch.Tensor:
    dtype = next(d.engine.module.parameters()).dtype
    return _tensor(batch[d.hook_name]).to(device=device, dtype=dtype)


def _save_checkpoint(dictionaries: list[Dictionary], step: int, tokens: int, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for d in dictionaries:
            d.engine.save_checkpoint(str(Path(folder) / d.name), tag="state",
                                     client_state={"tokens_since_fired": d.tracker.tokens_since_fired.cpu()})
        rank = ray.train.get_context().get_world_rank()
        torch.save(torch.get_rng_state(), Path(folder) / f"rng_rank{rank}.pt")
        if rank == 0:
            (Path(folder) / STATE_FILE).write_text(json.dumps({"step": step, "tokens": tokens}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _restore(dictionaries: list[Dictionary], device: torch.device) -> tuple[int, int]:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as folder:
        for d in dictionaries:
            _, client = d.engine.load_checkpoint(str(Path(folder) / d.name), tag="state")
            d.tracker.tokens_since_fired.copy_(client["tokens_since_fired"].to(device))
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        rng = Path(folder) / f"rng_rank{ray.train.get_context().get_world_rank()}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng))
    return state["step"], state["tokens"]


def train_worker(config: dict) -> None:
    import deepspeed

    spec = JobSpec.model_validate_json(config["spec_json"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    deepspeed.init_distributed(dist_backend=distributed_backend(device), auto_mpi_discovery=False)
    torch.manual_seed(spec.training.seed)
    buffer, monitor = config["buffer"], config["monitor"]

    batch = _fetch(buffer)
    dictionaries = [_build(spec, i, batch[spec.hook_of(i).name], device)
                    for i in range(len(spec.dictionaries))]
    if rank == 0:
        for d in dictionaries:
            monitor.report.remote(d.name, 0, 0, {f"init_{k}": float(v) for k, v in d.init_info.items()})
    start_step, tokens = _restore(dictionaries, device)
    total_steps = spec.training.steps
    rows_per_step = spec.training.batch_tokens * world
    window: dict[str, list[torch.Tensor]] = {d.name: [] for d in dictionaries}
    window_started = loop_started = time.perf_counter()

    for step in range(start_step, total_steps):
        if step > start_step:
            batch = _fetch(buffer)
        progress = step / total_steps
        for d in dictionaries:
            x = _input(d, batch, device)
            out = d.engine(x, dead_mask=d.tracker.dead_mask(), progress=progress)
            d.engine.backward(out.loss)
            d.engine.step()
            with torch.no_grad():
                fired = _all_reduce_(d.tracker.batch_counts(out.latent_acts, out.latent_indices), world)
                d.tracker.update_counts(fired, rows_per_step)
                window[d.name].append(torch.stack([out.fvu.detach().float(), out.auxk_loss.detach().float(),
                                                   out.loss.detach().float(),
                                                   torch.tensor(l0(out.latent_acts), device=device)]))
        tokens += rows_per_step
        last = step + 1 == total_steps
        if (step + 1) % spec.training.log_every_steps == 0 or last:
            elapsed = time.perf_counter() - window_started
            for d in dictionaries:
                means = _all_reduce_(torch.stack(window[d.name]).mean(dim=0), world) / world
                window[d.name] = []
                metrics = {"fvu": float(means[0]), "explained_variance": 1 - float(means[0]),
                           "auxk_loss": float(means[1]), "loss": float(means[2]), "l0": float(means[3]),
                           "dead_fraction": d.tracker.dead_fraction(), "dense_fraction": d.tracker.dense_fraction(),
                           "lr": d.engine.get_lr()[0],
                           "tokens_per_s": spec.training.log_every_steps * rows_per_step / max(elapsed, 1e-9)}
                if rank == 0:
                    monitor.report.remote(d.name, step + 1, tokens, metrics)
            window_started = time.perf_counter()
        evaluator, every_eval = config.get("evaluator"), spec.training.eval_every_steps
        if evaluator is not None and rank == 0 and every_eval and (step + 1) % every_eval == 0 and not last:
            for index, d in enumerate(dictionaries):  # fire and forget: the evaluator reports to the monitor
                evaluator.evaluate.remote(index, d.sae.cfg, _cpu_state(d), step + 1, tokens)
        every = spec.training.checkpoint_every_steps
        if every and (step + 1) % every == 0 and not last:
            _save_checkpoint(dictionaries, step + 1, tokens, {"step": step + 1, "tokens": tokens})

    train_seconds = time.perf_counter() - loop_started
    held_out = ray.get(config["held_out"]) if config.get("held_out") is not None else None
    for index, d in enumerate(dictionaries):
        result = _finish(spec, index, d, held_out, tokens, config, device)
        result["train_seconds"] = train_seconds
        if rank == 0:
            monitor.finish.remote(d.name, result)
    ray.train.report({"step": total_steps, "tokens": tokens})


def _cpu_state(d: Dictionary) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in d.engine.module.state_dict().items()}


def _finish(spec: JobSpec, index: int, d: Dictionary, held_out: dict | None, tokens: int, config: dict,
            device: torch.device) -> dict:
    """Held-out FVU / L0 and the SAELens export of one dictionary (rank 0 writes)."""
    result = {"tokens": tokens, "dead_window_tokens": d.tracker.window_tokens,
              "dead_fraction": d.tracker.dead_fraction(), "dense_fraction": d.tracker.dense_fraction(),
              "never_fired_fraction": float((d.tracker.fire_counts == 0).float().mean()),
              "firing_frequencies": d.tracker.firing_frequencies().cpu().numpy(), **d.init_info}
    sae = d.engine.module
    if held_out is not None and len(held_out[d.hook_name]):
        with torch.no_grad():
            out = sae(_input(d, held_out, device))
        result.update(held_out_fvu=float(out.fvu), held_out_l0=l0(out.latent_acts),
                      held_out_tokens=len(held_out[d.hook_name]))
    if ray.train.get_context().get_world_rank() == 0 and config.get("evaluator") is not None:
        result.update(ray.get(config["evaluator"].evaluate.remote(index, sae.cfg, _cpu_state(d), spec.training.steps,
                                                                   tokens)))
    if ray.train.get_context().get_world_rank() == 0:
        hook = spec.hook_of(index)
        metadata = {"model_name": spec.model.label, "hook_name": hook.name, "hook_layer": hook.layer,
                    "hook_site": hook.site, "context_size": spec.data.context_length,
                    "training_tokens": tokens, "dataset_path": spec.data.source, "job_id": config["job_id"],
                    "dictionary_name": d.name, "prepend_bos": True, "sae_lens_training_version": None}
        tensors = sae.export_tensors()
        cfg = saelens_config(sae.cfg.d_in, sae.cfg.latents, sae.export_config(), metadata)
        result["saelens_uri"] = save_saelens(join(config["output_uri"], "dictionaries", d.name), tensors, cfg)
    return result
