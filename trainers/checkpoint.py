"""Checkpoints of a dictionary's training state that any shard layout can load.

The latent shards of replica 0 each write their rows — fp32 weights, Adam's two moments and the firing
counters — to `shard-{s}-of-{S}.pt`; rank 0 writes what every shard holds alike (b_dec and its moments, the
optimizer step, the schedule, buffers) to `shared.pt`. A rank loads the rows of its own latent range from
whichever shard files overlap it, so a job checkpointed on S shards resumes on any S' that divides the latents.

Weights and moments go through DeepSpeed's safe_get/set_full_* accessors when ZeRO-1/2 partitions them across
data-parallel replicas (the get is a collective over the replicas of a shard), and straight through torch's Adam
state otherwise: the files do not depend on the ZeRO stage or the number of replicas either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from trainers.metrics import FiringTracker
from trainers.parallel import ShardMesh
from trainers.sae import LATENT_PARAMETERS

MOMENTS = ("exp_avg", "exp_avg_sq")
SHARED_FILE = "shared.pt"
COUNTERS = ("tokens_since_fired", "fire_counts")


def _base_optimizer(engine) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's Adam


def _zero_partitioned(param: Tensor) -> bool:
    # Set on every parameter under ZeRO-1/2, None on a rank whose partition holds none of it (that rank still
    # takes part in the gather)
    return hasattr(param, "_hp_mapping")


def _read(engine, param: torch.nn.Parameter, key: str | None) -> Tensor:
    """The full (this shard's) fp32 value of a parameter (key None) or of one of its Adam moments."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero_partitioned(param):
        value = safe_get_full_optimizer_state(param, key) if key else safe_get_full_fp32_param(param)
    elif key is None:
        value = param.detach()
    else:
        state = engine.optimizer.state.get(param, {})
        value = state[key] if key in state else torch.zeros_like(param)
    return value.detach().float().cpu().clone()


def _write(engine, param: torch.nn.Parameter, key: str | None, value: Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(param.device, torch.float32)
    if _zero_partitioned(param):
        if key:
            safe_set_full_optimizer_state(param, value, key)
        else:
            safe_set_full_fp32_param(param, value)  # the fp32 master partition
            param.data.copy_(value)  # and the module's copy, which the next forward reads
    elif key is None:
        param.data.copy_(value)
    else:
        engine.optimizer.state[param][key].copy_(value)


def optimizer_step(engine) -> int:
    steps = [state["step"] for state in _base_optimizer(engine).state.values() if "step" in state]
    return int(steps[0]) if steps else 0


def _create_optimizer_state(engine, step: int) -> None:
    """Adam's state on every parameter the optimizer steps (ZeRO's flat partitions, or the module's own), as
    its first step would create it, at `step` (torch keeps it per parameter as a float tensor, for the bias
    correction). A fresh engine has none: torch's Adam creates it lazily and ZeRO links the fragments of each
    module parameter to it only after that first step."""
    optimizer = _base_optimizer(engine)
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            for key in MOMENTS:
                state.setdefault(key, torch.zeros_like(param, memory_format=torch.preserve_format))
            # torch keeps `step` on the CPU, or on the parameter's device for its fused kernel
            state["step"] = torch.tensor(float(step), device=param.device if group.get("fused") else "cpu")
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def save(folder: Path, engine, mesh: ShardMesh, tracker: FiringTracker) -> None:
    """Write this rank's part of a dictionary's state (a collective: every rank of the job calls it)."""
    module = engine.module
    rows: dict[str, dict[str, Tensor]] = {}
    shared: dict[str, dict[str, Tensor]] = {}
    for name, param in module.named_parameters():  # the same order on every rank: _read may be a collective
        entry = {"value": _read(engine, param, None), **{key: _read(engine, param, key) for key in MOMENTS}}
        (rows if name in LATENT_PARAMETERS else shared)[name] = entry
    if mesh.replica != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    latents = module.cfg.latents
    torch.save({"latents": latents, "range": (module.latent_start, module.latent_stop), "rows": rows,
                "counters": {name: getattr(tracker, name).cpu() for name in COUNTERS}},
               folder / f"shard-{mesh.shard}-of-{mesh.shards}.pt")
    if mesh.shard == 0:
        torch.save({"latents": latents, "shards": mesh.shards, "params": shared,
                    "buffers": {name: b.cpu() for name, b in module.named_buffers()},
                    "optimizer_step": optimizer_step(engine), "global_steps": engine.global_steps,
                    "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None,
                    "tokens_counted": tracker.tokens_counted},
                   folder / SHARED_FILE)


def _rows(folder: Path, shards: int, latents: int, start: int, stop: int) -> list[dict]:
    """The parts of the saved shard files that hold latents [start, stop), in latent order, each with the
    slice of its rows that falls in the range."""
    size = latents // shards
    parts = []
    for shard in range(start // size, (stop - 1) // size + 1):
        saved = torch.load(folder / f"shard-{shard}-of-{shards}.pt", map_location="cpu", mmap=True)
        first, last = saved["range"]
        parts.append({"saved": saved, "slice": slice(max(start, first) - first, min(stop, last) - first)})
    return parts


def load(folder: Path, engine, mesh: ShardMesh, tracker: FiringTracker, schedule_step: int | None = None) -> int:
    """Set this rank's part of a dictionary's state from a checkpoint written with any number of shards;
    returns the optimizer step it was saved at.

    `schedule_step`: the optimizer step the LR schedule (and DeepSpeed's step counter) resumes at, when it
    differs from the saved one — a job resumed with another number of data-parallel replicas has trained the
    same tokens in another number of steps, and its schedule (built for this layout's total) must stand at the
    same fraction of training. Adam's own step count (its bias correction) stays the updates it has applied."""
    module = engine.module
    shared = torch.load(folder / SHARED_FILE, map_location="cpu")
    if shared["latents"] != module.cfg.latents:
        raise ValueError(f"the checkpoint in {folder} holds {shared['latents']} latents, the job asks for "
                         f"{module.cfg.latents}: resume with the dictionary's original latents")
    parts = _rows(folder, shared["shards"], shared["latents"], module.latent_start, module.latent_stop)
    _create_optimizer_state(engine, shared["optimizer_step"])
    for name, param in module.named_parameters():
        if name in LATENT_PARAMETERS:
            entry = {key: torch.cat([p["saved"]["rows"][name][key][p["slice"]] for p in parts])
                     for key in ("value", *MOMENTS)}
        else:
            entry = shared["params"][name]
        for key in (None, *MOMENTS):
            _write(engine, param, key, entry["value" if key is None else key])
    for name, buffer in module.named_buffers():
        buffer.copy_(shared["buffers"][name])
    for name in COUNTERS:
        getattr(tracker, name).copy_(torch.cat([p["saved"]["counters"][name][p["slice"]] for p in parts]))
    tracker.tokens_counted = shared["tokens_counted"]
    global_steps = shared["global_steps"] if schedule_step is None else schedule_step
    if shared["scheduler"] is not None and engine.lr_scheduler is not None:
        schedule = engine.lr_scheduler
        schedule.load_state_dict(shared["scheduler"])
        if global_steps != schedule.last_epoch:  # LambdaLR: the rate is a function of the position
            schedule.last_epoch = global_steps
            schedule._last_lr = [base * factor(global_steps)
                                 for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas, strict=True)]
        for group, lr in zip(engine.optimizer.param_groups, schedule.get_last_lr(), strict=True):
            group["lr"] = lr  # load_state_dict restores the schedule's position, not the rate it last set
    engine.global_steps = global_steps
    engine.global_samples = global_steps * engine.train_batch_size()
    return shared["optimizer_step"]
