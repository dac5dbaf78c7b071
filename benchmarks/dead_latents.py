"""Dead latents of attention-output dictionaries by initialization (issue 14): SmolLM2-135M (embedded) layer 15
attn_out, random vs subspace vs the paper's recipe (subspace, norm search, ...), each without and with AuxK, on the same
distinct tokens in the same order with the same seed; dead = no firing in the last 25% of training tokens.

    python benchmarks/dead_latents.py [--latents 16384] [--k 32] [--batch 4096] [--tokens 200000]
        [--capture-seconds 1200] [--cache runs/bench-cache/dead-latents-l15-attn_out] [--plot PATH]

Data: the embedded corpus (Python's documentation), documents shuffled with seed 0, packed into 256-token
windows by the service's packer (BOS/EOS dropped), run through the model cut after layer 15 with the service's
capture hooks, written once as an activation cache (storage/cache.py) — up to `--tokens` tokens or
`--capture-seconds` of capture, whichever comes first. A second run reads the cache. Every arm trains one
pass over the cached tokens (no token seen twice) in a plain loop (Adam, the service's default lr), with the
project's SparseAutoencoder, FiringTracker and initialization. Prints a table, the step-0 geometry of random
vs subspace latents, then one JSON line; writes a PNG of dead fraction vs tokens per arm (logged to MLflow
when MLFLOW_TRACKING_URI is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from api.jobspec import HookSpec, ModelSpec
from storage.cache import ActivationCache, CacheWriter
from trainers.init import principal_subspace
from trainers.metrics import FiringTracker
from trainers.plots import dead_fraction_curves
from trainers.sae import SAEConfig, SparseAutoencoder

LAYER, SITE, CONTEXT = 15, "attn_out", 256


def capture_to_cache(uri: str, tokens: int, seconds: float) -> None:
    """The embedded corpus through the cut model into an activation cache at `uri` (stops at `tokens` rows or
    after `seconds`); the cache is closed (complete) either way."""
    from services.data import embedded_documents
    from services.models import capture, load_language_model, run_blocks
    from services.windows import TokenWindows

    started = time.perf_counter()
    lm = load_language_model(ModelSpec(), keep_layers=LAYER + 1)
    hook = HookSpec(layer=LAYER, site=SITE)
    documents = list(embedded_documents())
    random.Random(0).shuffle(documents)
    windows = TokenWindows(lm.tokenizer, documents, CONTEXT, cycle=False)
    manifest = {"model": "embedded", "num_layers": lm.num_layers, "d": lm.d_model,
                "hooks": [{"name": hook.name, "layer": LAYER, "site": SITE}], "extra_keys": [],
                "corpus_fingerprint": "embedded-shuffled-0"}
    writer = CacheWriter(uri, manifest, [hook.name], shard_tokens=32768)
    group: list[np.ndarray] = []
    written = 0

    def flush() -> int:
        batch = np.stack(group)
        with capture(lm.model, [hook]) as captured, torch.no_grad():
            run_blocks(lm, torch.from_numpy(batch))
        keep = torch.from_numpy(windows.keep_mask(batch))
        rows = captured[hook.name][keep].float().numpy()
        writer.add({hook.name: rows})
        group.clear()
        return len(rows)

    for window in windows:
        group.append(window)
        if len(group) == 8:
            written += flush()
            print(f"captured {written:,} tokens, {time.perf_counter() - started:.0f} s", flush=True)
            if written >= tokens or time.perf_counter() - started > seconds:
                break
    if group and written < tokens:
        written += flush()
    writer.close()
    print(f"cache {uri}: {written:,} tokens in {time.perf_counter() - started:.0f} s", flush=True)


def load_cache(uri: str) -> torch.Tensor:
    cache = ActivationCache(uri)
    name = cache.hook_names[0]
    return torch.cat([torch.from_numpy(cache.shard(i)[name]) for i in range(len(cache.shard_tokens))])


# (label, SAEConfig fields): ours (random / subspace at 99% of the variance, least-squares encoder scale) and the
# paper's recipe (rank 0.5·d, one norm by grid search, b_dec = mean, b_enc = −mean pre-activation, inputs
# normalized to unit mean squared norm).
INITS = [("random", {"initialization": "random"}),
         ("subspace", {"initialization": "subspace"}),
         ("paper recipe", {"initialization": "subspace", "subspace_rank_fraction": 0.5, "init_scale": "norm_search",
                           "b_dec_init": "mean", "b_enc_init": "mean_preactivation", "normalize_inputs": True})]
# One change of the paper's recipe at a time on top of `subspace` (--arms), to see which one moves dead latents.
ABLATIONS = [("subspace + norm search", {"initialization": "subspace", "init_scale": "norm_search"}),
             ("subspace rank 0.5d", {"initialization": "subspace", "subspace_rank_fraction": 0.5}),
             ("subspace + b_dec mean + b_enc -mean pre-act", {"initialization": "subspace", "b_dec_init": "mean",
                                                             "b_enc_init": "mean_preactivation"}),
             ("subspace + normalized inputs", {"initialization": "subspace", "normalize_inputs": True})]
AUXK = 1 / 32


def build(x0: torch.Tensor, fields: dict, alpha: float, latents: int, k: int) -> tuple[SparseAutoencoder, dict]:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=x0.shape[1], latents=latents, k=k, auxk_alpha=alpha, **fields))
    info = sae.initialize(x0, torch.Generator().manual_seed(0))
    return sae, info


def train(x: torch.Tensor, fields: dict, alpha: float, latents: int, k: int, batch: int) -> dict:
    """One pass over x in batches; dead = no firing in the last quarter of the pass (the tracker's window)."""
    sae, info = build(x[:batch], fields, alpha, latents, k)
    steps = x.shape[0] // batch
    window = steps * batch // 4
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(latents / 2**14), eps=6.25e-10)
    tracker = FiringTracker(latents, window_tokens=window)
    curve: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        out = sae(x[step * batch:(step + 1) * batch], tracker.dead_mask())
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        tracker.update(out.latent_acts.detach(), out.latent_indices)
        curve.append(tracker.dead_fraction())
        if (step + 1) % 5 == 0:
            print(f"  step {step + 1}/{steps}, {time.perf_counter() - started:.0f} s, dead {curve[-1]:.2%}", flush=True)
    return {"dead_fraction": tracker.dead_fraction(), "never_fired_fraction": tracker.never_fired_fraction(),
            "window_tokens": window, "window_complete": tracker.window_complete,
            "fvu_last_batch": float(out.fvu.detach()), "auxk_loss_last": float(out.auxk_loss.detach()),
            "steps": steps, "seconds": round(time.perf_counter() - started), "dead_curve": curve,
            "init": {key: round(float(v), 5) for key, v in info.items()}}


def quantiles(values: torch.Tensor, qs=(0.05, 0.5, 0.95)) -> list[float]:
    return [round(float(v), 4) for v in torch.quantile(values.double(), torch.tensor(qs, dtype=torch.float64))]


@torch.no_grad()
def step0_geometry(x0: torch.Tensor, latents: int, k: int) -> dict:
    """Before any step: per latent, the share of its (unit) decoder row's squared norm inside the active subspace
    (the 99%-variance principal directions), the std of its projection ŵ·(x − b_dec) over the first batch (the
    pre-activation before the common encoder scale) and whether it is among any token's top k, for random and
    subspace rows."""
    basis, subspace = principal_subspace(x0, 0.99)
    out = {"subspace_rank": int(subspace["subspace_rank"])}
    for label, fields in INITS[:2]:
        sae, info = build(x0, fields, 0.0, latents, k)
        rows = sae.decoder_directions()
        share = (rows @ basis.T).pow(2).sum(dim=1)
        pre = (x0 - sae.b_dec) @ rows.T
        fired = FiringTracker(latents, 1)
        result = sae(x0)
        fired.update(result.latent_acts, result.latent_indices)
        out[label] = {"subspace_share_q05_q50_q95": quantiles(share),
                      "preact_std_q05_q50_q95": quantiles(pre.std(dim=0)),
                      "preact_mean_abs_q50": quantiles(pre.mean(dim=0).abs(), (0.5,))[0],
                      "fired_at_step0_fraction": round(1 - fired.never_fired_fraction(), 4),
                      "encoder_scale": round(info["encoder_scale"], 5)}
    return out


def log_to_mlflow(summary: dict, plot: Path) -> None:
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    import mlflow

    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="dead_latents"):
        mlflow.log_params({k: summary[k] for k in ("latents", "k", "batch", "tokens", "window_tokens")})
        for run in summary["runs"]:
            name = run["arm"].replace(" ", "_").replace("+", "_")
            mlflow.log_metric(f"{name}_dead_fraction", run["dead_fraction"])
            mlflow.log_metric(f"{name}_never_fired_fraction", run["never_fired_fraction"])
        mlflow.log_artifact(str(plot), "plots")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=200_000, help="most tokens to capture")
    parser.add_argument("--capture-seconds", type=float, default=1200)
    parser.add_argument("--cache", default="runs/bench-cache/dead-latents-l15-attn_out")
    parser.add_argument("--capture-only", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=0, help="train on the first N cached tokens only")
    parser.add_argument("--step0-latents", default="", help="only the step-0 geometry at these sizes (1,2,...)")
    parser.add_argument("--arms", default="", help="comma-separated arm labels (default: the three inits); "
                        "ablations: " + "; ".join(label for label, _ in ABLATIONS))
    parser.add_argument("--no-auxk", action="store_true", help="the arms without AuxK only")
    parser.add_argument("--plot", type=Path, default=Path("runs/bench-plots/dead_latents.png"))
    args = parser.parse_args()
    if not Path(args.cache, "manifest.json").exists():
        capture_to_cache(args.cache, args.tokens, args.capture_seconds)
    if args.capture_only:
        return
    x = load_cache(args.cache)
    if args.max_tokens:
        x = x[:args.max_tokens]
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]  # one order for every arm
    steps = x.shape[0] // args.batch
    if args.step0_latents:  # no training: how the step-0 picture moves with the dictionary's size
        for latents in (int(m) for m in args.step0_latents.split(",")):
            print(json.dumps({"latents": latents, **step0_geometry(x[:args.batch], latents, args.k)}), flush=True)
        return
    print(f"{x.shape[0]:,} distinct tokens ({steps} steps of {args.batch}), {args.latents:,} latents, k={args.k}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    geometry = step0_geometry(x[:args.batch], args.latents, args.k)
    print(f"step 0: {json.dumps(geometry)}", flush=True)
    runs = []
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
    arms = [(label, fields) for label, fields in INITS + ABLATIONS if label in chosen] if chosen else INITS
    for alpha in (0.0,) if args.no_auxk else (0.0, AUXK):
        for label, fields in arms:
            run = {"arm": label + (" + AuxK" if alpha else ""), "auxk_alpha": alpha,
                   **train(x, fields, alpha, args.latents, args.k, args.batch)}
            runs.append(run)
            print(f"{run['arm']}: dead {run['dead_fraction']:.2%}, never fired {run['never_fired_fraction']:.2%}, "
                  f"FVU {run['fvu_last_batch']:.4f}, {run['seconds']} s", flush=True)
            print("arm " + json.dumps({k: v for k, v in run.items() if k != "dead_curve"}), flush=True)
    window = runs[0]["window_tokens"]
    print(f"\n| arm | dead (no firing in the last {window:,} tokens) | never fired | FVU (last batch) |")
    print("|---|---|---|---|")
    for r in runs:
        print(f"| {r['arm']} | {r['dead_fraction']:.2%} | {r['never_fired_fraction']:.2%} "
              f"| {r['fvu_last_batch']:.4f} |")
    tokens = [args.batch * (i + 1) for i in range(steps)]
    dead_fraction_curves({r["arm"]: (tokens, r["dead_curve"]) for r in runs}, args.plot,
                         f"attn_out L{LAYER}, {args.latents:,} latents, k={args.k}: dead (window {window:,} tokens)",
                         window_tokens=window)
    print(f"plot: {args.plot}")
    dead = {r["arm"]: r["dead_fraction"] for r in runs}
    random_dead, subspace_dead = dead.get("random"), dead.get("subspace")
    summary = {"layer": LAYER, "site": SITE, "tokens": steps * args.batch, "latents": args.latents, "k": args.k,
               "batch": args.batch, "window_tokens": window, "step0": geometry,
               "subspace_over_random_dead_no_auxk": subspace_dead / random_dead
               if random_dead and subspace_dead is not None else None,
               "runs": [{k: v for k, v in r.items() if k != "dead_curve"} for r in runs], "plot": str(args.plot),
               "load_1min": round(os.getloadavg()[0], 2)}
    log_to_mlflow(summary, args.plot)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
