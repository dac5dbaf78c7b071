"""The analysis stage: what each trained dictionary of a job learned, from a held-out slice of its corpus.

Runs at the end of a job (services/runner.py, when `analysis.enabled`) and on demand for a finished one
(`saeforge analyze JOB`, POST /v1/jobs/{id}/analyze). It uses the job's producer machinery — the model loaded
and cut at the deepest hooked layer (services/models.py), the held-out documents of `data.holdout_fraction`
packed into the same windows as training (services/windows.TokenWindows), every hook captured in one forward —
and the dictionaries as exported (`<output>/dictionaries/<name>`, SAELens layout; sparsify when that is the only
export). The encoder runs chunked over latents (trainers.kernels.topk_encode keeps a running top-k, so memory
is tokens × chunk, not tokens × latents), and the per-latent state is the bound that matters (trainers/analysis.py).

A dictionary trained on `cluster.latent_shards` = S > 1 shards is encoded on its shards: S Ray actors
(`ShardEncoder`) each hold their latent slice of the export and encode every batch — the encoder product, the
one cost that grows with tokens × latents × d, runs S-way in parallel — and the driver merges their codes as
training's selection across shards does (TopK/AbsTopK: the global top-k of every shard's candidates; JumpReLU
and ReLU codes need no merge). The codes, and so every statistic, are the ones one process would compute
(tests/test_sharded_job.py compares the two). The per-latent statistics stay with the driver, bounded as
trainers/analysis.py states, and so do the decoder-side tables (logit effects, neighbours), which need W_dec only.

The math is in trainers/analysis.py, the files in storage/analysis.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from api.jobspec import JobSpec
from services.data import documents
from services.models import capture, load_language_model, run_blocks, submodule
from services.remote_code import check_remote_code
from services.windows import TokenWindows
from storage.analysis import analysis_uri, fixed_lists, write_analysis, write_delphi_cache
from storage.export import SAELENS_CONFIG, SPARSIFY_WEIGHTS, load_saelens
from storage.uri import filesystem, join
from trainers.analysis import LatentStatistics, logit_effects, nearest_latents, sparse_code
from trainers.kernels import select_topk
from trainers.parallel import ShardMesh

DENSE_FREQUENCY = 0.1  # FIELD-NOTES: dense = fires on more than 10% of tokens
ProgressCallback = Callable[[int, int], None]  # (tokens done, tokens planned)


def load_dictionary(output_uri: str, name: str) -> tuple[dict[str, torch.Tensor], str, int | None]:
    """(SAELens-named tensors, architecture as exported, k) of a job's exported dictionary."""
    import json

    from safetensors.torch import load as load_safetensors_bytes

    saelens = join(output_uri, "dictionaries", name)
    fs, path = filesystem(saelens)
    if fs.exists(join(path, SAELENS_CONFIG)):
        tensors, config = load_saelens(saelens)
        return tensors, config["architecture"], config.get("k")
    sparsify = join(output_uri, "sparsify", name)
    fs, path = filesystem(sparsify)
    if not fs.exists(join(path, SAELENS_CONFIG)):
        raise FileNotFoundError(f"dictionary {name!r}: no export under {saelens} or {sparsify}; the job must finish "
                                "training (output.formats saelens or sparsify) before it can be analysed")
    with fs.open(join(path, SPARSIFY_WEIGHTS), "rb") as f:
        raw = load_safetensors_bytes(f.read())
    with fs.open(join(path, SAELENS_CONFIG)) as f:
        config = json.load(f)
    tensors = {"W_enc": raw["encoder.weight"].T.contiguous(), "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"],
               "b_dec": raw["b_dec"]}
    return tensors, "topk", config["k"]


def final_norm(model: torch.nn.Module) -> tuple[torch.Tensor | None, bool]:
    """(elementwise weight of the model's final norm, whether it centres: LayerNorm) — None when it has none."""
    norm = submodule(model, ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                             "model.decoder.final_layer_norm"))
    if norm is None:
        return None, False
    weight = getattr(norm, "weight", None)
    return (weight.detach() if weight is not None else None), isinstance(norm, torch.nn.LayerNorm)


def analysis_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ShardEncoder:
    """One latent shard's encoder in the analysis stage (a Ray actor): the slice [start, stop) of an exported
    dictionary, encoding batches into codes with global latent indices."""

    def __init__(self, tensors: dict[str, torch.Tensor], start: int, architecture: str, k: int | None):
        self.device = analysis_device()
        self.tensors = {key: value.to(self.device) for key, value in tensors.items()}
        self.start, self.architecture, self.k = start, architecture, k

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            values, indices = sparse_code(torch.from_numpy(x).to(self.device), self.tensors, self.architecture,
                                          self.k)
        return values.float().cpu().numpy(), (indices + self.start).cpu().numpy()


def shard_slices(tensors: dict[str, torch.Tensor], shards: int) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """(first latent, tensors of the slice) of each shard's latent range, as training split them
    (ShardMesh.latent_range). SAELens layout: W_enc [d, M], W_dec [M, d], per-latent vectors."""
    latents = tensors["W_dec"].shape[0]
    slices = []
    for shard in range(shards):
        lo, hi = ShardMesh(world=shards, rank=shard, shards=shards).latent_range(latents)
        part = {"W_enc": tensors["W_enc"][:, lo:hi].contiguous(), "b_enc": tensors["b_enc"][lo:hi].contiguous(),
                "b_dec": tensors["b_dec"]}
        if "threshold" in tensors:
            part["threshold"] = tensors["threshold"][lo:hi].contiguous()
        slices.append((lo, part))
    return slices


class ShardedCode:
    """The codes of a dictionary encoded on S ShardEncoder actors, merged as one process's would be."""

    def __init__(self, tensors: dict[str, torch.Tensor], architecture: str, k: int | None, shards: int):
        import ray

        # a GPU each where the cluster has one per shard (training's GPUs are free again by now), else CPUs
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= shards else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(ShardEncoder)
        self.architecture, self.k = architecture, k
        self.actors = [actor.remote({key: value.cpu() for key, value in part.items()}, start, architecture, k)
                       for start, part in shard_slices(tensors, shards)]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import ray

        ref = ray.put(x.float().cpu().numpy())  # once in the object store, read by every shard
        parts = ray.get([actor.encode.remote(ref) for actor in self.actors])
        # torch.tensor copies: the arrays are read-only object-store memory, and small ([N, k] per shard)
        values = torch.cat([torch.tensor(v) for v, _ in parts], dim=1).to(x.device)
        indices = torch.cat([torch.tensor(i) for _, i in parts], dim=1).to(x.device)
        if self.architecture in ("topk", "abstopk"):
            return select_topk(values, indices, int(self.k), by_magnitude=self.architecture == "abstopk")
        return values, indices

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def analyze_job(spec: JobSpec, output_uri: str, names: list[str] | None = None,
                on_progress: ProgressCallback | None = None, run_ids: dict[str, str] | None = None,
                device: torch.device | str | None = None, job_id: str | None = None,
                shards: int | None = None) -> dict[str, dict[str, Any]]:
    """Analyse the job's dictionaries (all, or `names`); returns {name: manifest}. Writes
    `<output>/analysis/<name>/` for each (storage/analysis.py). `shards`: encode each dictionary on this many
    ShardEncoder actors (default: the job's cluster.latent_shards; 1: in this process). Shards need Ray: the
    connected cluster, or a local one started here for the analysis and stopped after it."""
    started = time.perf_counter()
    shards = spec.cluster.latent_shards if shards is None else shards
    started_ray = False
    if shards > 1:
        from services.runner import connect_ray

        started_ray = connect_ray(spec, quiet=True)
    encoders: list[ShardedCode] = []  # closed however the analysis ends
    try:
        return _analyze(spec, output_uri, names, on_progress, run_ids, device, job_id, shards, encoders, started)
    finally:
        for encoder in encoders:
            encoder.close()
        if started_ray:
            import ray

            ray.shutdown()


def _analyze(spec: JobSpec, output_uri: str, names: list[str] | None, on_progress: ProgressCallback | None,
             run_ids: dict[str, str] | None, device: torch.device | str | None, job_id: str | None, shards: int,
             encoders: list[ShardedCode], started: float) -> dict[str, dict[str, Any]]:
    settings = spec.analysis
    device = torch.device(device) if device is not None else analysis_device()
    all_names = [spec.dictionary_name(i) for i in range(len(spec.dictionaries))]
    unknown = sorted(set(names or []) - set(all_names))
    if unknown:
        raise ValueError(f"no dictionary {unknown} in this job; it has {all_names}")
    chosen = [i for i, n in enumerate(all_names) if names is None or n in names]
    hooks = [spec.hook_of(i) for i in chosen]
    check_remote_code(spec.model)
    lm = load_language_model(spec.model, keep_layers=max(h.layer for h in hooks) + 1, device=device)
    if not spec.data.holdout_fraction:
        raise ValueError("analysis needs held-out documents, which training never saw: set data.holdout_fraction "
                         "above 0 (it is 0 in this job)")
    context = spec.data.context_length
    held_out = documents(spec.data, spec.training.seed, held_out=True)  # read lazily, as far as needed
    windows = TokenWindows(lm.tokenizer, held_out, context, epochs=1)
    planned = math.ceil(settings.tokens / context) * context

    dictionaries = {}
    for i in chosen:
        name = all_names[i]
        tensors, architecture, k = load_dictionary(output_uri, name)
        tensors = {key: value.to(device) for key, value in tensors.items()}
        stats = LatentStatistics(tensors["W_dec"].shape[0], settings.top_n, settings.context_before,
                                 settings.context_after, device=device, signed=architecture == "abstopk")
        sharded = ShardedCode(tensors, architecture, k, shards) if shards > 1 else None
        if sharded is not None:  # the driver keeps the decoder side only (logit effects, neighbours)
            encoders.append(sharded)
            tensors = {"W_dec": tensors["W_dec"]}
        dictionaries[name] = {"tensors": tensors, "architecture": architecture, "k": k, "stats": stats,
                              "hook": spec.hook_of(i), "firings": [], "shards": sharded}

    per_forward = max(1, spec.training.batch_tokens // context)
    all_tokens: list[np.ndarray] = []
    done = 0
    iterator = iter(windows)
    forward_seconds = 0.0
    while done < planned:
        group = [w for _, w in zip(range(min(per_forward, (planned - done) // context)), iterator, strict=False)]
        if not group:
            break
        stacked = np.stack(group)
        keep = torch.from_numpy(windows.keep_mask(stacked).reshape(-1)).to(device)
        tick = time.perf_counter()
        with torch.inference_mode(), capture(lm.model, hooks) as captured:
            run_blocks(lm, torch.from_numpy(stacked))
            for entry in dictionaries.values():
                x = captured[entry["hook"].name].reshape(-1, lm.d_model).float()
                if entry["shards"] is not None:
                    values, indices = entry["shards"].encode(x)
                else:
                    values, indices = sparse_code(x, entry["tensors"], entry["architecture"], entry["k"])
                entry["stats"].update(values, indices, done, context, keep)
                if settings.delphi_cache:
                    entry["firings"].append(_firings(values, indices, keep, done, context))
        forward_seconds += time.perf_counter() - tick
        all_tokens.append(stacked)
        done += stacked.size
        if on_progress is not None:
            on_progress(done, planned)
    if on_progress is not None and 0 < done < planned:  # the held-out documents ended first: that is all of it
        on_progress(done, done)
    if not all_tokens:
        raise ValueError("analysis: the held-out documents fill no context window; use more data or a larger "
                         "data.holdout_fraction")
    tokens = np.concatenate(all_tokens)  # [windows, context]
    for encoder in encoders:  # the streaming is over: free the shards' CPUs and memory before the tables
        encoder.close()

    W_U = lm.model.get_output_embeddings().weight.detach()
    norm_weight, centre = final_norm(lm.model)
    manifests = {}
    for name, entry in dictionaries.items():
        uri = analysis_uri(output_uri, name)
        cos, neighbours, method = nearest_latents(entry["tensors"]["W_dec"], settings.neighbours)
        effects = logit_effects(entry["tensors"]["W_dec"], W_U.to(device), norm_weight, centre, settings.logit_tokens)
        stats: LatentStatistics = entry["stats"]
        manifest = {
            "dictionary": name, "job_id": job_id or output_uri.rstrip("/").split("/")[-1], "model": spec.model.label,
            "hook": entry["hook"].name,
            "architecture": entry["architecture"], "k": entry["k"], "latents": stats.latents,
            "signed": stats.signed,  # AbsTopK: top examples, max_activation and the histogram by |activation|
            "tokens": stats.tokens, "windows": len(tokens), "context_length": context,
            "top_n": settings.top_n, "context_before": settings.context_before,
            "context_after": settings.context_after, "bins": stats.bins, "dense_frequency": DENSE_FREQUENCY,
            "neighbours_method": method, "corpus": "held-out documents (data.holdout_fraction "
                                                   f"{spec.data.holdout_fraction}, seed {spec.training.seed})",
            "logit_effects": "W_U · (final-norm weight ⊙ W_dec,i); the norm's 1/RMS left out",
            "mlflow_run_id": (run_ids or {}).get(name), "seconds": round(time.perf_counter() - started, 3),
            "forward_seconds": round(forward_seconds, 3), "state_bytes": stats.bytes(),
            "encoded_on": f"{shards} latent shards (Ray actors)" if entry["shards"] is not None else "one process",
        }
        latents, examples, vocabulary = _tables(stats, tokens, effects, cos, neighbours, lm.tokenizer)
        write_analysis(uri, latents, examples, vocabulary, manifest)
        if settings.delphi_cache:
            firings = np.concatenate(entry["firings"]) if entry["firings"] else np.zeros((0, 4))
            write_delphi_cache(join(uri, "delphi"), entry["hook"].name, firings[:, :3].astype(np.int64),
                               firings[:, 3].astype(np.float32), tokens, stats.latents,
                               {"dataset_repo": spec.data.source, "dataset_split": "held-out",
                                "dataset_name": "", "dataset_column": spec.data.text_field,
                                "batch_size": per_forward, "cache_ctx_len": context, "n_tokens": int(tokens.size),
                                "n_splits": 5, "model_name": spec.model.label})
        manifests[name] = manifest
    return manifests


def _firings(values: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor, first: int, context: int) -> np.ndarray:
    """[n, 4] float64 (window, position, latent, activation) of a batch's firings (delphi's locations)."""
    values = values.float() * keep[:, None]
    token, slot = torch.nonzero(values != 0, as_tuple=True)  # a zero code is no firing (AbsTopK's are signed)
    flat = (token + first).double()
    return torch.stack([torch.div(flat, context, rounding_mode="floor"), flat % context,
                        indices[token, slot].double(), values[token, slot].double()], 1).cpu().numpy()


def _tables(stats: LatentStatistics, tokens: np.ndarray, effects, cos, neighbours, tokenizer):
    """(latents columns, examples columns, vocabulary) for storage/analysis.write_analysis."""
    top_v, top_i, low_v, low_i = (t.cpu().numpy() for t in effects)
    flat_tokens = tokens.reshape(-1)
    context = tokens.shape[1]
    before, after = stats.before, stats.after
    offsets = np.arange(-before, after + 1)
    examples: dict[str, list] = {k: [] for k in ("latent", "kind", "rank", "activation", "position", "window",
                                                  "offset", "tokens", "activations")}
    top = stats.top_examples()
    for kind, slots in (("top", top), ("quantile", stats.quantile_examples())):
        positions = slots.positions.cpu().numpy()
        latent, rank = np.nonzero(positions >= 0)
        pos = positions[latent, rank]
        where = pos[:, None] + offsets
        valid = (where >= 0) & (where < len(flat_tokens)) & (where // context == (pos // context)[:, None])
        ctx_tokens = np.where(valid, flat_tokens[np.clip(where, 0, len(flat_tokens) - 1)], -1).astype(np.int32)
        examples["latent"].append(latent.astype(np.int32))
        examples["kind"].append(np.full(len(latent), kind))
        examples["rank"].append(rank.astype(np.int16))
        examples["activation"].append(slots.values.cpu().numpy()[latent, rank].astype(np.float32))
        examples["position"].append(pos)
        examples["window"].append((pos // context).astype(np.int64))
        examples["offset"].append((pos % context).astype(np.int32))
        examples["tokens"].append(ctx_tokens)
        examples["activations"].append(slots.contexts.float().cpu().numpy()[latent, rank])
    joined = {k: np.concatenate(v) for k, v in examples.items()}
    order = np.lexsort((joined["rank"], joined["kind"] != "top", joined["latent"]))  # by latent, top first
    joined = {k: v[order] for k, v in joined.items()}
    used = set(np.unique(joined["tokens"]).tolist()) | set(np.unique(top_i).tolist()) | set(np.unique(low_i).tolist())
    used.discard(-1)
    vocabulary = {int(t): tokenizer.decode([int(t)]) for t in sorted(used)}

    m = stats.latents
    frequency = stats.frequency().cpu().numpy()
    search = [set() for _ in range(m)]
    top_positions = top.positions.cpu().numpy()
    for latent, rank in zip(*np.nonzero(top_positions >= 0), strict=True):
        search[latent].add(vocabulary[int(flat_tokens[top_positions[latent, rank]])].strip().lower())
    for latent in range(m):
        search[latent].update(vocabulary[int(t)].strip().lower() for t in top_i[latent])
    latents = {
        "latent": np.arange(m, dtype=np.int32),
        "count": stats.count.cpu().numpy(),
        "frequency": frequency,
        "mean_activation": stats.mean().cpu().numpy(),
        "max_activation": stats.max.cpu().numpy(),
        "dead": stats.count.cpu().numpy() == 0,
        "dense": frequency > DENSE_FREQUENCY,
        "histogram": fixed_lists(stats.histogram.cpu().numpy()),
        "histogram_upper": stats.histogram_upper().cpu().numpy(),
        "top_logit_tokens": fixed_lists(top_i.astype(np.int32)), "top_logit_values": fixed_lists(top_v),
        "bottom_logit_tokens": fixed_lists(low_i.astype(np.int32)), "bottom_logit_values": fixed_lists(low_v),
        "neighbours": fixed_lists(neighbours.cpu().numpy().astype(np.int32)),
        "neighbour_cosines": fixed_lists(cos.cpu().numpy().astype(np.float32)),
        "search": ["\x1f".join(sorted(s - {""})) for s in search],
    }
    joined["tokens"] = fixed_lists(joined["tokens"])  # one Arrow array over the flat block: no object per row
    joined["activations"] = fixed_lists(joined["activations"].astype(np.float32))
    return latents, joined, vocabulary


def analyze_with_tracking(spec: JobSpec, job_id: str, output_uri: str, tracking, results: dict[str, dict],
                          on_progress: ProgressCallback | None = None) -> dict[str, dict[str, Any]]:
    """The end-of-job stage: analyse, report progress to MLflow (each dictionary's child run: the metrics
    analysis_tokens / analysis_fraction, which the job's status shows) and to `on_progress`, tag each child run
    with `saeforge.analysis_uri`, and add `analysis_uri` to each dictionary's result."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(done, total)
        now = time.monotonic()
        if now - last[0] >= 2.0 or done >= total:
            last[0] = now
            for run_id in tracking.child_runs.values():
                tracking.log_metrics(run_id, {"analysis_tokens": done, "analysis_fraction": done / max(total, 1)},
                                     step=done)

    manifests = analyze_job(spec, output_uri, on_progress=report, run_ids=dict(tracking.child_runs), job_id=job_id)
    for name, manifest in manifests.items():
        uri = analysis_uri(output_uri, name)
        run_id = tracking.child_runs.get(name)
        if run_id is not None:
            tracking.log_metrics(run_id, {"analysis_fraction": 1.0, "analysis_tokens": manifest["tokens"]},
                                 step=manifest["tokens"])
            tracking.set_tags(run_id, {"saeforge.analysis_uri": uri})
        results.setdefault(name, {})["analysis_uri"] = uri
    return manifests
