"""The Ray Train worker entry: the per-rank training loop of every dictionary in a job.

Ranks form data-parallel replicas of `cluster.latent_shards` latent shards (trainers/parallel.py). The
shards of a replica take the same batch from the ActivationBuffer and each trains its slice of every
dictionary; replicas take different batches and DeepSpeed averages their gradients. Rank 0 sends metrics to
the JobMonitor; every rank checkpoints through Ray Train; at the end the shards are gathered for held-out
evaluation and the export (rank 0 writes).
"""

from __future__ import annotations

import json
import pickle
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch

from api.jobspec import JobSpec
from storage.arrays import to_torch
from storage.export import saelens_config, save_saelens, save_sparsify
from storage.uri import join
from trainers import checkpoint as checkpoints
from trainers.engine import build_engine, distributed_backend, use_bf16
from trainers.metrics import FiringTracker
from trainers.parallel import ShardMesh
from trainers.sae import LATENT_PARAMETERS, SparseAutoencoder, sae_config_from_spec

STATE_FILE = "trainer_state.json"
STREAM_FILE = "activation_stream.pkl"


@dataclass
class Dictionary:
    name: str
    hook_name: str
    sae: SparseAutoencoder
    engine: object
    tracker: FiringTracker
    init_info: dict
    target_name: str | None = None  # a transcoder's hook_out site (the rows it reconstructs)


def _fetch(buffer, mesh: ShardMesh, step: int) -> dict[str, np.ndarray] | None:
    """This replica's batch of `step` (number step · replicas + replica of the stream: the shards of a replica
    share one ObjectRef); None when the stream ended before this step (data.epochs ran out: every rank of the
    step gets None). The arrays are read-only views of the object store (zero-copy), never written to."""
    refs = ray.get(buffer.batch.remote(step * mesh.replicas + mesh.replica, mesh.replicas))
    return ray.get(refs[0]) if refs else None


def _target_name(spec: JobSpec, index: int) -> str | None:
    out = spec.hook_out_of(index)
    return out.name if out is not None else None


def _build(spec: JobSpec, index: int, sample: np.ndarray, device: torch.device, mesh: ShardMesh,
           target: np.ndarray | None = None) -> Dictionary:
    """`target`: a transcoder's rows of its hook_out site, aligned with `sample`."""
    dictionary = spec.dictionaries[index]
    d_model = sample.shape[1]
    latents = dictionary.resolved_latents(d_model)
    bf16 = use_bf16(spec.training.precision, device)
    cfg = sae_config_from_spec({**dictionary.model_dump(), "latents": latents}, d_model,
                               sparse_grads=spec.lazy_adam(index, bf16))
    sae = SparseAutoencoder(cfg, device=device, mesh=mesh)
    generator = torch.Generator().manual_seed(spec.training.seed + index)
    if target is None:
        info = sae.initialize(_tensor(sample).to(device), generator=generator)
    else:
        info = sae.initialize_transcoder(_tensor(sample).to(device), _tensor(target).to(device), generator=generator)
    accumulation = spec.training.gradient_accumulation_steps
    engine = build_engine(sae, lr=dictionary.resolved_lr(d_model), total_steps=spec.optimizer_steps,
                          warmup_steps=-(-spec.training.warmup_steps // accumulation),  # batches → optimizer steps
                          zero_stage=spec.cluster.zero_stage, bf16=bf16,
                          mpu=mesh if mesh.world > 1 else None, gradient_accumulation_steps=accumulation,
                          offload_optimizer=spec.cluster.offload_optimizer,
                          grad_clip_norm=spec.training.grad_clip_norm)
    tracker = FiringTracker(sae.latent_stop - sae.latent_start, spec.dead_window_tokens(index), device=device)
    return Dictionary(spec.dictionary_name(index), spec.hook_of(index).name, sae, engine, tracker, info,
                      _target_name(spec, index))


def _sample(batches: list[dict[str, np.ndarray]], hook_name: str, tokens: int | None) -> np.ndarray:
    """The first `tokens` rows of the batches at one hook (all of the first batch when tokens is None)."""
    if tokens is None:
        return batches[0][hook_name]
    return np.concatenate([b[hook_name] for b in batches])[:tokens]


def _tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only object-store memory: torch warns, but nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return to_torch(array)  # float32, or bf16 from a GPU stream


def _input(d: Dictionary, batch: dict[str, np.ndarray], device: torch.device, name: str | None = None
           ) -> torch.Tensor:
    dtype = next(d.engine.module.parameters()).dtype
    return _tensor(batch[name or d.hook_name]).to(device=device, dtype=dtype)


def _target(d: Dictionary, batch: dict[str, np.ndarray], device: torch.device) -> torch.Tensor | None:
    """A transcoder's target rows (its hook_out site, row-aligned with its input); None for an autoencoder."""
    return None if d.target_name is None else _input(d, batch, device, d.target_name)


def _save_checkpoint(dictionaries: list[Dictionary], mesh: ShardMesh, buffer, step: int, tokens: int,
                     metrics: dict) -> None:
    """Every rank's part of every dictionary (trainers/checkpoint.py), its RNG, and from rank 0 the position
    and the activation stream from batch step · replicas on; Ray Train uploads the folders of all ranks into
    one checkpoint under the job's storage URI and prunes old ones."""
    with tempfile.TemporaryDirectory() as folder:
        for d in dictionaries:
            checkpoints.save(Path(folder) / d.name, d.engine, mesh, d.tracker)
        torch.save(torch.get_rng_state(), Path(folder) / f"rng_rank{mesh.rank}.pt")
        if mesh.rank == 0:
            stream = ray.get(buffer.snapshot.remote(step * mesh.replicas))
            with open(Path(folder) / STREAM_FILE, "wb") as f:
                pickle.dump(stream, f)
            (Path(folder) / STATE_FILE).write_text(json.dumps(
                {"step": step, "tokens": tokens, "latent_shards": mesh.shards, "replicas": mesh.replicas}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _checkpointed_position(spec: JobSpec, mesh: ShardMesh) -> tuple[int, int]:
    """(step, tokens) of the checkpoint Ray Train starts this group from; (0, 0) on a fresh start.

    A step is one batch of every replica: a checkpoint saved with another number of replicas resumes at the
    step of this group that has trained the same tokens (and the stream from the same batch)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
    tokens, per_step = state["tokens"], spec.training.batch_tokens * mesh.replicas
    step, rest = divmod(tokens, per_step)
    if rest or step % spec.training.gradient_accumulation_steps:
        raise ValueError(f"the checkpoint at {tokens:,} tokens ({state['replicas']} data-parallel replicas) is not "
                         f"a whole optimizer step of {mesh.replicas} replicas × training.batch_tokens "
                         f"({spec.training.batch_tokens}) × training.gradient_accumulation_steps: resume with "
                         f"{state['replicas']} replicas (cluster.trainer_ranks / cluster.latent_shards)")
    return step, tokens


def _restore_stream(buffer, mesh: ShardMesh, step: int) -> None:
    """Rank 0 puts the buffer back where the checkpoint left the stream (batch step · replicas of this group,
    which may have another number of replicas than the one that saved it); the others wait for it."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    if mesh.rank == 0:
        with checkpoint.as_directory() as folder, open(Path(folder) / STREAM_FILE, "rb") as f:
            ray.get(buffer.restore.remote(pickle.load(f), step * mesh.replicas))
    if mesh.world > 1:
        torch.distributed.barrier()


def _restore(dictionaries: list[Dictionary], mesh: ShardMesh, optimizer_step: int) -> None:
    """Weights, optimizer state, firing statistics and RNG from the checkpoint, if Ray Train passed one; the LR
    schedule at `optimizer_step` of this group."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        for d in dictionaries:
            checkpoints.load(Path(folder) / d.name, d.engine, mesh, d.tracker, schedule_step=optimizer_step)
        rng = Path(folder) / f"rng_rank{mesh.rank}.pt"
        if rng.is_file():  # a rank the saving layout did not have keeps its own
            torch.set_rng_state(torch.load(rng))


def train_worker(config: dict) -> None:
    import deepspeed

    spec = JobSpec.model_validate_json(config["spec_json"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # A GPU from Ray that torch cannot use (a CPU build, GPUs declared to Ray by hand) trains on the CPU.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    deepspeed.init_distributed(dist_backend=distributed_backend(device), auto_mpi_discovery=False)
    mesh = ShardMesh.build(world, rank, spec.cluster.latent_shards)
    torch.manual_seed(spec.training.seed)
    buffer, monitor = config["buffer"], config["monitor"]

    start_step, tokens = _checkpointed_position(spec, mesh)
    _restore_stream(buffer, mesh, start_step)
    batch = _fetch(buffer, mesh, start_step)
    if batch is None:
        raise RuntimeError(f"the activation stream ended before step {start_step}: the corpus holds less than one "
                           "batch per replica in data.epochs; lower training.batch_tokens, raise data.epochs or "
                           "add data")
    # The initialization sample: training.init_tokens from the first batches of this replica (kept, and
    # trained on in their turn), or the first batch. On a resume the checkpoint overwrites what it sets.
    first = [batch]
    wanted = -(-(spec.training.init_tokens or 0) // spec.training.batch_tokens)
    while not start_step and len(first) < min(wanted, spec.steps):
        more = _fetch(buffer, mesh, len(first))
        if more is None:
            break
        first.append(more)
    dictionaries = []
    for i in range(len(spec.dictionaries)):
        target, init_tokens = _target_name(spec, i), spec.training.init_tokens
        dictionaries.append(_build(spec, i, _sample(first, spec.hook_of(i).name, init_tokens), device, mesh,
                                   None if target is None else _sample(first, target, init_tokens)))
    if rank == 0:
        for d in dictionaries:
            monitor.report.remote(d.name, 0, 0, {f"init_{k}": float(v) for k, v in d.init_info.items()})
    _restore(dictionaries, mesh, start_step // spec.training.gradient_accumulation_steps)
    if rank == 0 and start_step:  # a restarted worker group or a resumed job: MLflow shows where it took up
        for d in dictionaries:
            monitor.report.remote(d.name, start_step, tokens, {"resumed_from_step": float(start_step)})
    total_steps = spec.steps
    rows_per_step = spec.training.batch_tokens * mesh.replicas
    window: dict[str, list[torch.Tensor]] = {d.name: [] for d in dictionaries}
    extra_names: dict[str, list[str]] = {}  # a dictionary's own scalars (SAEOutput.metrics), logged as they are
    window_started = loop_started = time.perf_counter()

    for step in range(start_step, total_steps):
        if step > start_step:
            batch = first[step - start_step] if step - start_step < len(first) else _fetch(buffer, mesh, step)
            if batch is None:  # data.epochs ran out: the job ends here, with the steps it trained
                if rank == 0:
                    for d in dictionaries:
                        monitor.report.remote(d.name, step, tokens, {"stream_ended_at_step": float(step)})
                break
        progress = step / total_steps
        for d in dictionaries:
            x = _input(d, batch, device)
            out = d.engine(x, dead_mask=d.tracker.dead_mask(), progress=progress, target=_target(d, batch, device))
            d.engine.backward(out.loss)
            d.engine.step()
            with torch.no_grad():
                fired = mesh.sum_over(d.tracker.batch_counts(out.latent_acts, out.latent_indices), "replicas")
                d.tracker.update_counts(fired, rows_per_step)
                active = (out.latent_acts != 0).sum(dim=-1).float().mean()  # this shard's part of L0 (AbsTopK: signed)
                window[d.name].append(torch.stack([out.fvu.detach().float(), out.auxk_loss.detach().float(),
                                                   out.loss.detach().float(), active.float(),
                                                   *(value.detach().float() for value in out.metrics.values())]))
                extra_names[d.name] = list(out.metrics)  # Matryoshka: FVU and L0 per prefix; BatchTopK: θ
        tokens += rows_per_step
        last = step + 1 == total_steps
        if (step + 1) % spec.training.log_every_steps == 0 or last:
            elapsed = time.perf_counter() - window_started
            for d in dictionaries:
                means = mesh.sum_over(torch.stack(window[d.name]).mean(dim=0), "replicas") / mesh.replicas
                window[d.name] = []
                l0, dead, dense, never = _across_shards(mesh, d, means[3])
                metrics = {"fvu": float(means[0]), "explained_variance": 1 - float(means[0]),
                           "auxk_loss": float(means[1]), "loss": float(means[2]), "l0": l0,
                           "dead_fraction": dead, "never_fired_fraction": never, "dense_fraction": dense,
                           "lr": d.engine.get_lr()[0],
                           "tokens_per_s": spec.training.log_every_steps * rows_per_step / max(elapsed, 1e-9),
                           **{name: float(value) for name, value in zip(extra_names[d.name], means[4:], strict=True)}}
                if rank == 0:
                    monitor.report.remote(d.name, step + 1, tokens, metrics)
            window_started = time.perf_counter()
        evaluator, every_eval = config.get("evaluator"), spec.training.eval_every_steps
        if evaluator is not None and every_eval and (step + 1) % every_eval == 0 and not last:
            for index, d in enumerate(dictionaries):  # fire and forget: the evaluator reports to the monitor
                state = _full_state(d, mesh)  # every rank takes part in the gather
                if rank == 0:
                    evaluator.evaluate.remote(index, d.sae.cfg, state, step + 1, tokens)
        every, stop_at = spec.training.checkpoint_every_steps, config.get("stop_at_step")
        # A stop waits for the end of the optimizer step: accumulated gradients are not part of a checkpoint.
        boundary = (step + 1) % spec.training.gradient_accumulation_steps == 0
        stopping = stop_at is not None and step + 1 >= stop_at and boundary and not last
        if (every and (step + 1) % every == 0 and not last) or stopping:
            _save_checkpoint(dictionaries, mesh, buffer, step + 1, tokens, {"step": step + 1, "tokens": tokens})
        if stopping:  # checkpointed; the job is resumed later (saeforge run --resume)
            if rank == 0:
                monitor.stop.remote(step + 1, tokens)
            return

    train_seconds = time.perf_counter() - loop_started
    held_out = ray.get(config["held_out"]) if config.get("held_out") is not None else None
    for index, d in enumerate(dictionaries):
        result = _finish(spec, index, d, held_out, tokens, config, device, mesh)
        result["train_seconds"] = train_seconds
        if rank == 0:
            monitor.finish.remote(d.name, result)
    ray.train.report({"step": total_steps, "tokens": tokens})


def _across_shards(mesh: ShardMesh, d: Dictionary, local_l0: torch.Tensor) -> tuple[float, float, float, float]:
    """L0, dead, dense and never-fired fractions of the whole dictionary from this shard's parts."""
    counts = torch.stack([local_l0.float(), d.tracker.dead_mask().sum().float(),
                          (d.tracker.firing_frequencies() > 0.1).sum().float(),
                          d.tracker.never_fired_mask().sum().float()])
    counts = mesh.sum_over(counts, "shards")
    latents = d.sae.cfg.latents
    return float(counts[0]), float(counts[1]) / latents, float(counts[2]) / latents, float(counts[3]) / latents


# Per-latent export tensors and the dimension they are split along.
EXPORT_LATENT_DIMS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}


def _full_state(d: Dictionary, mesh: ShardMesh) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU (a collective: every rank of the shard group calls it)."""
    state = {}
    for key, value in d.engine.module.state_dict().items():
        value = value.detach().float()
        state[key] = (mesh.gather_latents(value) if key in LATENT_PARAMETERS else value).cpu()
    return state


def _finish(spec: JobSpec, index: int, d: Dictionary, held_out: dict | None, tokens: int, config: dict,
            device: torch.device, mesh: ShardMesh) -> dict:
    """Held-out FVU / L0, splice metrics and the SAELens export of one dictionary (collective; rank 0 writes)."""
    _, dead, dense, never = _across_shards(mesh, d, torch.zeros(()))
    frequencies = mesh.gather_latents(d.tracker.firing_frequencies())
    # dead_fraction counts latents silent for the whole last window; a job shorter than its window cannot
    # have any (dead_window_complete False says so), never_fired_fraction is measurable either way.
    result = {"tokens": tokens, "dead_window_tokens": d.tracker.window_tokens,
              "dead_window_complete": d.tracker.window_complete, "dead_fraction": dead,
              "dense_fraction": dense, "never_fired_fraction": never,
              "firing_frequencies": frequencies.cpu().numpy(), "latent_shards": mesh.shards,
              "replicas": mesh.replicas, **d.init_info}
    sae = d.engine.module
    if held_out is not None and len(held_out[d.hook_name]):
        sae.eval()
        with torch.no_grad():
            out = sae(_input(d, held_out, device), target=_target(d, held_out, device))
        sae.train()
        active = mesh.sum_over((out.latent_acts != 0).sum(dim=-1).float().mean(), "shards")
        result.update(held_out_fvu=float(out.fvu), held_out_l0=float(active),
                      held_out_tokens=len(held_out[d.hook_name]))
        result.update({f"held_out_{name}": float(value) for name, value in out.metrics.items() if "prefix" in name})
    rank = ray.train.get_context().get_world_rank()
    if config.get("evaluator") is not None:
        state = _full_state(d, mesh)
        if rank == 0:
            result.update(ray.get(config["evaluator"].evaluate.remote(index, sae.cfg, state, spec.steps, tokens)))
    tensors = {name: mesh.gather_latents(t, EXPORT_LATENT_DIMS[name]) if name in EXPORT_LATENT_DIMS else t
               for name, t in sae.export_tensors().items()}
    if rank == 0:
        hook = spec.hook_of(index)
        metadata = {"model_name": spec.model.label, "hook_name": hook.name, "hook_layer": hook.layer,
                    "hook_site": hook.site, "context_size": spec.data.context_length,
                    "training_tokens": tokens, "dataset_path": spec.data.source, "job_id": config["job_id"],
                    "dictionary_name": d.name, "prepend_bos": True, "sae_lens_training_version": None}
        if d.target_name is not None:  # a transcoder: where its prediction goes (SAELens's key)
            metadata["hook_name_out"] = d.target_name
        if sae.cfg.normalize_inputs:  # trained on f·x; f is folded into the exported biases (raw inputs in)
            metadata["input_norm_factor_folded"] = float(sae.input_norm_factor)
        if "saelens" in spec.output.formats:
            cfg = saelens_config(sae.cfg.d_in, sae.cfg.latents, sae.export_config(), metadata)
            result["saelens_uri"] = save_saelens(join(config["output_uri"], "dictionaries", d.name), tensors, cfg)
        if "sparsify" in spec.output.formats:
            result["sparsify_uri"] = save_sparsify(join(config["output_uri"], "sparsify", d.name), tensors,
                                                   sae.cfg.k, metadata, transcode=sae.cfg.transcoder)
    return result
