"""Refuse, at submission, jobs the cluster can never hold: memory per trainer rank, CPUs and GPUs.

The memory model is `rank_memory`, one small function with its terms named, checked against the measured
figures of benchmarks/README.md (1,048,576 latents, d = 576, 4,096-token batches, 2 latent shards: 9.87 GiB
measured per rank, 9.69 GiB estimated; tests/api/test_capacity.py). When the trainer changes what it keeps
(issue 13: gradients of touched rows only), change the term here and the test's measured figure with it.
No torch here: the API imports this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from api.jobspec import JobSpec

GIB = 2**30
FLOAT_BYTES = 4  # parameters, gradients and Adam moments are fp32 (bf16 training keeps fp32 masters)
INDEX_BYTES = 8
# Python, torch, DeepSpeed and the Ray Train worker before any tensor (~0.4 GiB measured, benchmarks/README.md).
RUNTIME_BYTES = int(0.4 * GIB)
ENCODER_CHUNK = 8192  # trainers/sae.py SAEConfig.encoder_chunk: latents per encoder chunk
MAX_LATENT_SHARDS = 1024
EMBEDDED_SHAPE = (30, 576)  # SmolLM2-135M: layers, d_model


def model_shape(spec: JobSpec) -> tuple[int, int] | None:
    """(layers, d_model) when known without loading the model: random, embedded, or a folder's config.json."""
    if spec.model.random is not None:
        return spec.model.random.num_layers, spec.model.random.hidden_size
    if spec.model.name == "embedded":
        return EMBEDDED_SHAPE
    config = Path(spec.model.name) / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    layers = next((data[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(data.get(k), int)),
                  None)
    width = next((data[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(data.get(k), int)), None)
    return (layers, width) if layers and width else None


def rank_memory(spec: JobSpec, d_model: int, latent_shards: int | None = None) -> dict[str, int]:
    """Bytes one trainer rank holds at its peak, by term (every dictionary of the job lives on every rank,
    each split into latent_shards row blocks)."""
    shards = latent_shards or spec.cluster.latent_shards
    replicas = spec.cluster.trainer_ranks // spec.cluster.latent_shards
    zero = spec.cluster.zero_stage
    n = spec.training.batch_tokens
    terms = {"parameters": 0, "gradients": 0, "optimizer_state": 0, "activation_pools": 0,
             "largest_temporary": 0, "runtime": RUNTIME_BYTES}
    for d in spec.dictionaries:
        rows = math.ceil(d.resolved_latents(d_model) / shards)
        k = d.batchtopk_row_cap or 4 * d.k if d.architecture == "batchtopk" else d.k
        parameters = (2 * rows * d_model + rows + d_model) * FLOAT_BYTES  # W_enc, W_dec, b_enc, b_dec
        terms["parameters"] += parameters
        # dense gradients of every parameter (issue 13 makes these touched rows only: ≤ N·k rows per matrix)
        terms["gradients"] += parameters // (replicas if zero >= 2 else 1)
        # Adam's two moments; ZeRO-1/2 partition them over the data-parallel replicas
        terms["optimizer_state"] += 2 * parameters // (replicas if zero >= 1 else 1)
        # the batch, its reconstruction, the error and the gradient of x̂ ([N, d] each); the top-k values and
        # indices, forward and backward
        terms["activation_pools"] += 4 * n * d_model * FLOAT_BYTES + 2 * n * k * (FLOAT_BYTES + INDEX_BYTES)
        # one encoder chunk's pre-activations and its ReLU ([N, chunk] each), the largest tensor made at once
        terms["largest_temporary"] = max(terms["largest_temporary"], 2 * n * min(ENCODER_CHUNK, rows) * FLOAT_BYTES)
    return terms


def gib(value: float) -> str:
    return f"{value / GIB:,.1f} GiB"


@dataclass
class Capacity:
    """What the cluster offers: logical CPUs and GPUs, and the memory one trainer rank may use."""

    cpus: float | None
    gpus: float | None
    rank_memory: int | None  # bytes: the configured budget, or the largest node's memory
    total_memory: int | None  # bytes: every node together (ranks of one job share them)
    source: str  # "budget" (SAEFORGE_RANK_MEMORY_GIB), "cluster" (the largest Ray node) or "machine" (this one)


def check_capacity(spec: JobSpec, d_model: int, capacity: Capacity) -> None:
    """ValueError with the numbers when the job cannot run on this cluster."""
    cluster = spec.cluster
    evaluator = 1 if spec.training.splice_eval_tokens > 0 else 0
    if capacity.cpus is not None:
        gpu = cluster.use_gpu == "yes" or (cluster.use_gpu == "auto" and (capacity.gpus or 0) > 0)
        needed = cluster.producers + cluster.trainer_ranks + evaluator
        if not gpu and needed > capacity.cpus:
            raise ValueError(f"cluster.producers ({cluster.producers}) + cluster.trainer_ranks "
                             f"({cluster.trainer_ranks}){' + the splice evaluator' if evaluator else ''} need "
                             f"{needed} CPUs; the cluster has {capacity.cpus:g}: lower them")
        if cluster.use_gpu == "yes" and not capacity.gpus:
            raise ValueError("cluster.use_gpu is 'yes' but the cluster has no GPU; set it to 'auto' or 'no'")
    if capacity.rank_memory is None:
        return
    need = sum(rank_memory(spec, d_model).values())
    fits = need <= capacity.rank_memory and (
        capacity.total_memory is None or need * cluster.trainer_ranks <= capacity.total_memory)
    if fits:
        return
    largest = max(d.resolved_latents(d_model) for d in spec.dictionaries)
    shards = next((s for s in range(cluster.latent_shards + 1, MAX_LATENT_SHARDS + 1)
                   if all(d.resolved_latents(d_model) % s == 0 for d in spec.dictionaries)
                   and _fits(spec, d_model, s, capacity)), None)
    where = {"budget": f"this service allows {gib(capacity.rank_memory)} per rank (SAEFORGE_RANK_MEMORY_GIB)",
             "machine": f"this machine has {gib(capacity.rank_memory)}"}.get(
        capacity.source, f"the cluster's trainer nodes have {gib(capacity.rank_memory)}")
    if need <= capacity.rank_memory:
        where += f", {gib(capacity.total_memory)} in all for {cluster.trainer_ranks} ranks"
    terms = ", ".join(f"{name.replace('_', ' ')} {gib(v)}" for name, v in rank_memory(spec, d_model).items())
    fix = (f"raise cluster.latent_shards to {shards} (and cluster.trainer_ranks to a multiple of it) or lower latents"
           if shards else f"lower latents (largest dictionary: {largest:,})")
    raise ValueError(f"the job needs ~{gib(need)} per trainer rank ({terms}); {where}: {fix}")


def _fits(spec: JobSpec, d_model: int, shards: int, capacity: Capacity) -> bool:
    need = sum(rank_memory(spec, d_model, shards).values())
    replicas = spec.cluster.trainer_ranks // spec.cluster.latent_shards
    return need <= capacity.rank_memory and (capacity.total_memory is None or
                                             need * shards * replicas <= capacity.total_memory)


def machine_capacity() -> Capacity:
    """This machine, for `saeforge run` on a local Ray (which gets as many logical CPUs as the job needs)."""
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Capacity(cpus=None, gpus=None, rank_memory=memory, total_memory=memory, source="machine")


def cluster_capacity(info: dict[str, float] | None, budget: int | None) -> Capacity:
    """The service's view: Ray's nodes (api.rayjobs.cluster_capacity) and the operator's per-rank budget."""
    info = info or {}
    memory = int(info["node_memory"]) if info.get("node_memory") else None
    total = int(info["memory"]) if info.get("memory") else None
    return Capacity(cpus=info.get("cpus"), gpus=info.get("gpus"), rank_memory=budget or memory,
                    total_memory=None if budget else total, source="budget" if budget else "cluster")


def check_local_run(spec: JobSpec) -> None:
    """`saeforge run`'s checks before it starts anything: the model rules known without loading it and this
    machine's memory (with RAY_ADDRESS the cluster's nodes are not known here: memory only per this machine
    is not checked then). ValueError with the numbers."""
    import os

    shape = model_shape(spec)
    if shape is None:
        return
    spec.check_against_model(*shape)
    if not (spec.cluster.ray_address or os.environ.get("RAY_ADDRESS")):
        check_capacity(spec, shape[1], machine_capacity())
