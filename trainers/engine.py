"""The DeepSpeed engine of one dictionary on one rank.

Why DeepSpeed: it owns the optimizer step, the ZeRO partitioning of Adam's state across data-parallel
replicas (stage 1/2: each replica keeps 1/R of the moments), bf16 with fp32 master weights on GPU, and
checkpoints that hold every rank's optimizer shard. The decoder is row-normalised inside the model's forward
(see trainers/sae.py), so nothing has to reach into DeepSpeed's master copy after a step.

The client optimizer is either torch's dense Adam or, for TopK/BatchTopK dictionaries with row-sparse
gradients, the touched-row lazy Adam of trainers/optim.py: DeepSpeed still runs it, its LR schedule and the
exchange between data-parallel replicas (an all-gather of touched rows), and our checkpoints read its state.
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.optim import RowSparseAdam

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 6.25e-10  # Gao et al.'s value for TopK SAEs


def distributed_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def deepspeed_config(zero_stage: int, bf16: bool, gradient_accumulation_steps: int = 1,
                     offload_optimizer: bool = False, pin_memory: bool = False, gradient_clipping: float = 1.0) -> dict:
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        # ZeRO-Offload: fp32 master weights and Adam's moments (3/4 of a dictionary's training state) live in host
        # memory and the step runs there, so a GPU holds only the bf16 weights and gradients of its latents.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    return {
        "train_micro_batch_size_per_gpu": 1,  # one activation batch (batch_tokens rows) per micro-step
        # Micro-steps whose gradients add up before one optimizer step: a larger effective batch than the
        # [batch_tokens, latents] pre-activations of one micro-step would fit in memory.
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # Set always: DeepSpeed's default is 1.0, a clip nobody asked for. 0 where the client optimizer clips.
        "gradient_clipping": gradient_clipping,
        "zero_allow_untested_optimizer": True,  # torch's Adam: no C++ extension build needed on CPU
        # Offload with torch's (fused, CPU) Adam rather than DeepSpeedCPUAdam, which is a C++ extension to build.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_lambda(total_steps: int, warmup_steps: int, decay_fraction: float = 0.2):
    """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction` of training."""
    decay_start = int(total_steps * (1 - decay_fraction))

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= decay_start and total_steps > decay_start:
            return max(0.0, (total_steps - step) / (total_steps - decay_start))
        return 1.0

    return factor


def build_engine(model: nn.Module, lr: float, total_steps: int, warmup_steps: int, zero_stage: int, bf16: bool,
                 mpu=None, gradient_accumulation_steps: int = 1, offload_optimizer: bool = False,
                 grad_clip_norm: float = 1.0):
    """deepspeed.initialize with our client optimizer and schedule; returns the engine. `total_steps` and
    `warmup_steps` count optimizer steps (micro-steps / gradient_accumulation_steps). `grad_clip_norm`: the
    global gradient norm a step is scaled down to (0: no clipping); RowSparseAdam clips itself, without a pass
    of its own, dense Adam through DeepSpeed's gradient_clipping. Per-latent parameters carry `model_parallel`
    (trainers/sae.py), so both add their norms over the latent shards.

    The optimizer follows the model: a dictionary built with `cfg.sparse_grads` (row-sparse W_enc/W_dec
    gradients; the job decides with JobSpec.lazy_adam) gets RowSparseAdam, whose step costs O(touched rows × d);
    otherwise torch's Adam over dense gradients. `mpu` (a trainers.parallel.ShardMesh) tells DeepSpeed which ranks are
    data-parallel replicas of the same parameters: it reduces gradients and partitions ZeRO state over those
    only, never across latent shards. With row-sparse gradients DeepSpeed's exchange between replicas is an
    all-gather of each replica's touched rows and their indices (engine.sparse_allreduce), summed by the
    optimizer's coalesce.
    """
    import deepspeed

    replicas = mpu.get_data_parallel_world_size() if mpu is not None else 1
    sparse = bool(getattr(getattr(model, "cfg", None), "sparse_grads", False))
    if sparse:
        if bf16 or offload_optimizer or (zero_stage > 0 and replicas > 1):
            raise ValueError("row-sparse gradients (cfg.sparse_grads) need fp32, no offload, and ZeRO stage 0 "
                             f"with {replicas} replicas; got bf16={bf16}, offload_optimizer={offload_optimizer}, "
                             f"zero_stage={zero_stage}")
        zero_stage = 0  # one replica: ZeRO partitions nothing, and its flat buffers would make gradients dense
        sharded = mpu is not None and mpu.get_model_parallel_world_size() > 1
        optimizer = RowSparseAdam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                  max_grad_norm=grad_clip_norm,
                                  norm_group=mpu.get_model_parallel_group() if sharded else None,
                                  counts_shared=not sharded or mpu.get_model_parallel_rank() == 0)
    else:
        # fused: torch's single-tensor Adam builds its denominator out of place, two temporaries the size of the
        # largest parameter (2 x 2.25 GiB per rank at 1M latents on 2 shards); the fused kernel has none.
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    # A callable: DeepSpeed builds the schedule on the optimizer it wraps (ZeRO's), not on the bare one.
    schedule = lr_lambda(total_steps, warmup_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(
            zero_stage, bf16, gradient_accumulation_steps, offload_optimizer,
            pin_memory=next(model.parameters()).device.type == "cuda",
            gradient_clipping=0.0 if sparse else grad_clip_norm),
        mpu=mpu,
        lr_scheduler=lambda wrapped: torch.optim.lr_scheduler.LambdaLR(wrapped, schedule))
    if zero_stage == 0 and replicas == 1:
        # One replica: nothing to average, but DeepSpeed would still flatten every gradient into its all-reduce
        # buckets (a copy of both [M/S, d] matrices). b_dec's sum over shards is the model's own hook. (ZeRO-1/2
        # move gradients into their partitions on that same path, so they keep it.)
        engine.enable_backward_allreduce = False
    return engine
