"""Subspace initialization on SmolLM2-135M (embedded): (a) how many principal directions hold 99% of the
variance at attn_out / mlp_out / resid_post of a middle layer; (b) dead latents after the same tokens with
`random` versus `subspace` initialization of an attn_out TopK dictionary.

    python benchmarks/subspace_init.py [--layer 15] [--tokens 32768] [--latents 65536] [--steps 40]
        [--batch 4096] [--k 32] [--context 256]

Activations: Python's bundled documentation (pydoc_data.topics) packed into `--context`-token windows, the
model cut after the hooked layer, the first position of each window dropped (attention-sink outliers).
Training re-reads the captured tokens in shuffled epochs (a 2-core machine forwards ~400 tokens/s through
16 blocks), `--steps` Adam steps of `--batch` tokens with the service's default lr 2e-4/sqrt(M/2^14).
Dead = did not fire (act > 1e-3) during the second half of training (window printed). Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from api.jobspec import HookSpec, ModelSpec
from services.models import capture, load_language_model, run_blocks
from trainers.init import principal_subspace
from trainers.metrics import FiringTracker
from trainers.sae import SAEConfig, SparseAutoencoder

SITES = ("attn_out", "mlp_out", "resid_post")


def corpus_windows(tokenizer, context: int, windows: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    usable = min(windows, ids.numel() // context)
    return ids[: usable * context].view(usable, context)


def capture_activations(layer: int, tokens: int, context: int) -> dict[str, torch.Tensor]:
    lm = load_language_model(ModelSpec(), keep_layers=layer + 1)
    hooks = [HookSpec(layer=layer, site=site) for site in SITES]
    windows = corpus_windows(lm.tokenizer, context, math.ceil(tokens / (context - 1)))
    rows: dict[str, list[torch.Tensor]] = {site: [] for site in SITES}
    with capture(lm.model, hooks) as captured, torch.no_grad():
        for start in range(0, windows.shape[0], 16):
            run_blocks(lm, windows[start:start + 16])
            for hook in hooks:
                rows[hook.site].append(captured[hook.name][:, 1:].reshape(-1, lm.d_model).float())
    return {site: torch.cat(parts)[:tokens] for site, parts in rows.items()}


def train_dead_fraction(x: torch.Tensor, init: str, latents: int, k: int, steps: int, batch: int) -> dict:
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=x.shape[1], latents=latents, k=k, initialization=init)
    sae = SparseAutoencoder(cfg)
    info = sae.initialize(x[:16384], torch.Generator().manual_seed(0))
    lr = 2e-4 / math.sqrt(latents / 2**14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    window = (steps - steps // 2) * batch
    tracker = FiringTracker(latents, window_tokens=window)
    ever = torch.zeros(latents, dtype=torch.bool)
    order = torch.cat([torch.randperm(x.shape[0]) for _ in range(math.ceil(steps * batch / x.shape[0]))])
    start = time.perf_counter()
    fvu = float("nan")
    for step in range(steps):
        xb = x[order[step * batch:(step + 1) * batch]]
        out = sae(xb, tracker.dead_mask(), progress=step / steps)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        acts, idx = out.latent_acts.detach(), out.latent_indices
        tracker.update(acts, idx)
        ever[idx[acts > 1e-3]] = True
        fvu = float(out.fvu.detach())
    return {"init": init, "dead_fraction": tracker.dead_fraction(),
            "never_fired_fraction": 1 - float(ever.float().mean()),
            "dead_window_tokens": window, "fvu_last_batch": fvu, "seconds": time.perf_counter() - start,
            "subspace_rank": info.get("subspace_rank")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--latents", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    print(f"load {os.getloadavg()[0]:.2f}; capturing {args.tokens} tokens at layer {args.layer}", flush=True)
    t0 = time.perf_counter()
    acts = capture_activations(args.layer, args.tokens, args.context)
    print(f"captured {acts['attn_out'].shape[0]} tokens in {time.perf_counter() - t0:.0f} s", flush=True)

    shares = {}
    print("\n(a) principal directions holding 99% of the variance")
    print("| site | d | rank (99%) | share of directions |\n|---|---|---|---|")
    for site in SITES:
        _, info = principal_subspace(acts[site], 0.99)
        shares[site] = {"rank": int(info["subspace_rank"]), "share": round(info["subspace_rank_fraction"], 3)}
        print(f"| {site} | {acts[site].shape[1]} | {shares[site]['rank']} | {shares[site]['share']:.1%} |", flush=True)

    print(f"\n(b) attn_out, {args.latents} latents, k={args.k}, {args.steps} steps x {args.batch} tokens")
    runs = []
    for init in ("random", "subspace"):
        result = train_dead_fraction(acts["attn_out"], init, args.latents, args.k, args.steps, args.batch)
        runs.append(result)
        print(f"{init}: dead {result['dead_fraction']:.1%} (window {result['dead_window_tokens']} tokens), never "
              f"fired {result['never_fired_fraction']:.1%}, FVU {result['fvu_last_batch']:.3f}, "
              f"{result['seconds']:.0f} s", flush=True)
    print("| initialization | dead (last half) | never fired | FVU (last batch) |\n|---|---|---|---|")
    for r in runs:
        print(f"| {r['init']} | {r['dead_fraction']:.1%} | {r['never_fired_fraction']:.1%} "
              f"| {r['fvu_last_batch']:.3f} |")
    print(json.dumps({"layer": args.layer, "tokens": acts["attn_out"].shape[0], "variance_99": shares,
                      "latents": args.latents, "k": args.k, "steps": args.steps, "batch": args.batch,
                      "runs": runs, "load_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
