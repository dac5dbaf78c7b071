"""AuxK on and off (issue 19's table): SmolLM2-135M (embedded) layer 15 attn_out, every token of Python's pydoc
topics captured once (no repetition), a TopK dictionary trained in a plain loop (no DeepSpeed) with the
project's SparseAutoencoder, FiringTracker and initialization; dead = no firing in the last `--window` tokens.

    python benchmarks/auxk_dead_latents.py [--latents 32768] [--k 32] [--batch 4096] [--window 24576]
        [--cache activations.pt]

Arms: random / subspace initialization × AuxK off, AuxK (per-token fit scale, the default), AuxK without the
fit scale (Gao et al.'s form, `auxk_fit_scale: false`). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from subspace_init import capture_activations  # the sibling script (this folder is on sys.path)

from trainers.metrics import FiringTracker
from trainers.sae import SAEConfig, SparseAutoencoder

ARMS = [("random", 0.0, True), ("random", 1 / 32, True), ("random", 1 / 32, False),
        ("subspace", 0.0, True), ("subspace", 1 / 32, True), ("subspace", 1 / 32, False)]


def train(x: torch.Tensor, init: str, alpha: float, fit: bool, latents: int, k: int, batch: int, window: int) -> dict:
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=x.shape[1], latents=latents, k=k, initialization=init, auxk_alpha=alpha,
                    auxk_fit_scale=fit)
    sae = SparseAutoencoder(cfg)
    sae.initialize(x[:batch], torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(latents / 2**14), eps=6.25e-10)
    tracker = FiringTracker(latents, window_tokens=window)
    started = time.perf_counter()
    for step in range(x.shape[0] // batch):
        out = sae(x[step * batch:(step + 1) * batch], tracker.dead_mask())
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        tracker.update(out.latent_acts.detach(), out.latent_indices)
    return {"init": init, "auxk_alpha": alpha, "auxk_fit_scale": fit, "dead_fraction": tracker.dead_fraction(),
            "fvu_last_batch": float(out.fvu.detach()), "auxk_loss_last": float(out.auxk_loss.detach()),
            "steps": x.shape[0] // batch, "seconds": round(time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--window", type=int, default=24576)
    parser.add_argument("--cache", type=Path, default=None, help="save/load the captured activations here")
    args = parser.parse_args()
    if args.cache and args.cache.exists():
        x = torch.load(args.cache)
    else:
        x = capture_activations(15, 10**9, 256)["attn_out"].clone()  # every window of the corpus, once
        if args.cache:
            torch.save(x, args.cache)
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]
    print(f"{x.shape[0]} distinct tokens, load {os.getloadavg()[0]:.1f}", flush=True)
    runs = []
    print("| init | AuxK α | fit scale | dead at the end | FVU (last batch) |\n|---|---|---|---|---|")
    for init, alpha, fit in ARMS:
        r = train(x, init, alpha, fit, args.latents, args.k, args.batch, args.window)
        runs.append(r)
        print(f"| {init} | {alpha:g} | {'yes' if fit else 'no'} | {r['dead_fraction']:.2%} | "
              f"{r['fvu_last_batch']:.4f} |", flush=True)
    print(json.dumps({"tokens": x.shape[0], "latents": args.latents, "k": args.k, "batch": args.batch,
                      "window": args.window, "runs": runs}))


if __name__ == "__main__":
    main()
