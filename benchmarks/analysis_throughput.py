"""The analysis stage's speed against the training stream's, on the same job, and its memory at 131,072 latents.

    python benchmarks/analysis_throughput.py [--latents 16384] [--d 256] [--tokens 65536] [--k 32]
        [--memory-latents 131072] [--memory-batches 8] [--skip-job]

1. One job, run as `saeforge run` runs it (services.runner.run_job, a local Ray), on a random Llama of width d
   (2 layers, hook layer 1) with one TopK dictionary: the training stream's tokens/s is the trainer's own
   figure (tokens / train_seconds of the dictionary's result); the analysis' tokens/s is the held-out tokens it
   streamed over the seconds the stage took (model load, forward, encoder, statistics and the files).
   Target: analysis / training ≥ 0.5. The held-out slice of the embedded corpus (2%) bounds the analysed tokens.
2. Memory: trainers.analysis.LatentStatistics at --memory-latents, N = 20, context 24 + 1 + 8, fed batches of
   4,096 synthetic TopK codes (k = 32, latents drawn Zipf-like, as real firing frequencies are); the peak RSS
   growth over the process before (VmHWM through /proc/self/clear_refs) against the state's size and its bound
   latents × (2·N·(4 + 4 + 8 + 2·C) + 8·bins + 24) bytes. Also the statistics update's own tokens/s.
Prints its figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from procmem import reset_peak, rss_bytes

GIB = 1024**3


def job_ratio(latents: int, d: int, tokens: int, k: int) -> dict:
    from api.jobspec import JobSpec
    from services.runner import run_job

    spec = JobSpec.model_validate({
        "name": "analysis-bench",
        "model": {"random": {"family": "llama", "hidden_size": d, "num_layers": 2, "num_heads": 4,
                             "intermediate_size": 2 * d, "seed": 0}},
        "hook": {"layer": 1}, "data": {"context_length": 256},
        "dictionaries": [{"name": "d", "latents": latents, "k": k, "initialization": "random"}],
        "training": {"tokens": tokens, "batch_tokens": 4096, "warmup_steps": 0, "log_every_steps": 4,
                     "eval_tokens": 4096, "splice_eval_tokens": 0},
        "tracking": {"experiment": "analysis-bench"}, "analysis": {"tokens": tokens},
    })
    with tempfile.TemporaryDirectory() as home:
        os.environ["SAEFORGE_HOME"] = home
        result = run_job(spec, quiet=True)
        r = result.dictionaries["d"]
        with open(os.path.join(r["analysis_uri"], "manifest.json")) as f:
            manifest = json.load(f)
    train = r["tokens"] / r["train_seconds"]
    analysis = manifest["tokens"] / manifest["seconds"]
    return {"latents": latents, "d": d, "k": k, "train_tokens": r["tokens"], "train_tokens_per_s": round(train, 1),
            "analysis_tokens": manifest["tokens"], "analysis_seconds": manifest["seconds"],
            "analysis_forward_seconds": manifest["forward_seconds"], "analysis_tokens_per_s": round(analysis, 1),
            "ratio": round(analysis / train, 3)}


def memory(latents: int, batches: int, k: int = 32, tokens: int = 4096, top_n: int = 20) -> dict:
    from trainers.analysis import LatentStatistics

    before, after, bins = 24, 8, 32
    context = before + 1 + after
    generator = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, latents + 1, dtype=torch.float64) ** 0.8  # Zipf-like firing frequencies
    weights = weights[torch.randperm(latents, generator=generator)]
    codes = []
    for _ in range(batches):  # made before the peak is reset: only the statistics' memory is measured
        indices = torch.multinomial(weights, tokens * k, replacement=True, generator=generator).view(tokens, k)
        codes.append((torch.rand(tokens, k, generator=generator) * 3, indices))
    keep = torch.ones(tokens, dtype=torch.bool)
    reset_peak()
    base = rss_bytes()
    stats = LatentStatistics(latents, top_n, before, after, bins)
    seconds = []
    for b, (values, indices) in enumerate(codes):
        started = time.perf_counter()
        stats.update(values, indices, b * tokens, 256, keep)
        seconds.append(time.perf_counter() - started)
    peak = rss_bytes("VmHWM") - base
    bound = latents * (2 * top_n * (4 + 4 + 8 + 2 * context) + 8 * bins + 24)
    steady = sorted(seconds[1:])[len(seconds[1:]) // 2] if len(seconds) > 1 else seconds[0]
    return {"memory_latents": latents, "top_n": top_n, "context": context, "state_bytes": stats.bytes(),
            "bound_bytes": bound, "peak_rss_growth_bytes": peak, "update_seconds": [round(s, 3) for s in seconds],
            "update_tokens_per_s_median": round(tokens / steady, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--memory-latents", type=int, default=131072)
    parser.add_argument("--memory-batches", type=int, default=8)
    parser.add_argument("--skip-job", action="store_true", help="only the memory figures")
    args = parser.parse_args()
    figures: dict = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    mem = memory(args.memory_latents, args.memory_batches, args.k)
    figures.update(mem)
    print(f"statistics at {mem['memory_latents']:,} latents: state {mem['state_bytes'] / GIB:.3f} GiB "
          f"(bound {mem['bound_bytes'] / GIB:.3f} GiB = latents × (2·N·(16 + 2·C) + 8·bins + 24) B), peak RSS "
          f"growth {mem['peak_rss_growth_bytes'] / GIB:.3f} GiB; update {mem['update_tokens_per_s_median']:,.0f} "
          f"tok/s (median of {args.memory_batches - 1} batches after the first: {mem['update_seconds']})")
    if not args.skip_job:
        job = job_ratio(args.latents, args.d, args.tokens, args.k)
        figures.update(job)
        print(f"job at {job['latents']:,} latents, d={job['d']}: training stream {job['train_tokens_per_s']:,.0f} "
              f"tok/s, analysis {job['analysis_tokens_per_s']:,.0f} tok/s ({job['analysis_tokens']:,} held-out "
              f"tokens in {job['analysis_seconds']:.1f} s, {job['analysis_forward_seconds']:.1f} s of it forward + "
              f"encoder + statistics): ratio {job['ratio']:.2f} (target ≥ 0.5)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
