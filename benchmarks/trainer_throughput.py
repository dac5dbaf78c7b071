"""Trainer throughput against the encoder-matmul roofline, in one process.

    python benchmarks/trainer_throughput.py --latents 131072 [--steps 3] [--batch 4096] [--d 576] [--k 32]
        [--optimizer adam|sparse] [--dead-fraction 0.0]

Roofline: a dense x @ W_encᵀ of the same shape (N×d by d×M; above 131,072 latents computed in 65,536-latent
slabs so its output fits in memory — same FLOPs), timed on this machine; roofline tokens/s = N / its time.
Step: forward (chunked TopK encoder, sparse decoder, FVU), backward, optimizer step — everything a training
step does (the decoder needs no renormalisation pass: it is used row-normalised, see trainers/sae.py).
Optimizers: `adam` = torch.optim.Adam over dense-shaped gradients (what DeepSpeed runs); `sparse` =
trainers.optim.RowSparseAdam (lazy Adam, in chunks of rows) on W_enc/W_dec with row-sparse gradients (touched
rows only) + Adam on the biases.
The dense Adam step alone is also timed (on the real tensors when they fit, else on a slab, scaled).
Peak RSS is the process high-water mark during one step (reset through /proc/self/clear_refs), set
against parameters + optimizer state. Prints its figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from procmem import reset_peak, rss_bytes

from trainers.optim import RowSparseAdam
from trainers.sae import SAEConfig, SparseAutoencoder

GIB = 1024**3


_ROOF_OUT: list[torch.Tensor] = []


def roofline_seconds(x: torch.Tensor, W: torch.Tensor, repeats: int = 2, warm: bool = True) -> float:
    slab = W.shape[0] if W.shape[0] <= 131072 else 65536
    if not _ROOF_OUT:  # one output buffer for every pass: no page faults inside the timed product
        _ROOF_OUT.append(x.new_empty(x.shape[0], slab))
    out = _ROOF_OUT[0]
    best = float("inf")
    for _ in range(repeats + int(warm)):  # a first round warms the allocator and the BLAS
        start = time.perf_counter()
        for s in range(0, W.shape[0], slab):
            w = W[s:s + slab]
            torch.mm(x, w.T, out=out[:, :w.shape[0]])
        best = min(best, time.perf_counter() - start)
    return best


def adam_step_seconds(shape: tuple[int, int], max_rows: int) -> tuple[float, int]:
    """Time of one torch.optim.Adam step over two [M, d] params with dense grads (+ biases), scaled from a slab."""
    rows = min(shape[0], max_rows)
    params = [torch.nn.Parameter(torch.randn(rows, shape[1])) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-4)
    opt.step()
    start = time.perf_counter()
    for _ in range(2):
        opt.step()
    seconds = (time.perf_counter() - start) / 2
    del params, opt
    return seconds * shape[0] / rows, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3, help="0: time only the peak-RSS step")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--optimizer", choices=("adam", "sparse"), default=None,
                        help="default: adam up to 262,144 latents, sparse above (dense grads do not fit in 24 GiB)")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--dead-fraction", type=float, default=0.0, help="mark this share dead to include AuxK")
    parser.add_argument("--adam-probe-rows", type=int, default=262144)
    args = parser.parse_args()
    optimizer_kind = args.optimizer or ("adam" if args.latents <= 262144 else "sparse")
    torch.manual_seed(0)
    n, d, m = args.batch, args.d, args.latents
    print(f"latents={m} d={d} k={args.k} batch={n} optimizer={optimizer_kind} threads={torch.get_num_threads()} "
          f"load={os.getloadavg()[0]:.2f}", flush=True)

    adam_seconds, adam_rows = adam_step_seconds((m, d), args.adam_probe_rows)
    print(f"dense torch.optim.Adam step over W_enc+W_dec: {adam_seconds:.3f} s (measured on {adam_rows} rows)",
          flush=True)

    cfg = SAEConfig(d_in=d, latents=m, k=args.k, initialization="random", b_dec_init="mean",
                    encoder_chunk=args.chunk, sparse_grads=optimizer_kind == "sparse")
    sae = SparseAutoencoder(cfg)
    x = torch.randn(n, d)
    sae.initialize(x[:2048], torch.Generator().manual_seed(0))

    big = m > 262144  # a roofline pass at 1M latents is ~5 TFLOP: one pass, no warm-up round
    roof = roofline_seconds(x, sae.W_enc.detach(), repeats=1 if big else 2, warm=not big)
    flops = 2.0 * n * d * m
    print(f"roofline matmul: {roof:.3f} s = {flops / roof / 1e9:.1f} GFLOP/s -> {n / roof:,.0f} tokens/s", flush=True)

    if optimizer_kind == "sparse":
        optimizers = [RowSparseAdam([sae.W_enc, sae.W_dec], lr=1e-4),
                      torch.optim.Adam([sae.b_enc, sae.b_dec], lr=1e-4)]
    else:
        optimizers = [torch.optim.Adam(sae.parameters(), lr=1e-4)]
    dead = (torch.rand(m) < args.dead_fraction) if args.dead_fraction > 0 else None

    timings: dict[str, float] = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def train_step(record: bool) -> float:
        t0 = time.perf_counter()
        out = sae(x, dead)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if record:
            timings["forward"] += t1 - t0
            timings["backward"] += t2 - t1
            timings["optimizer"] += t3 - t2
        return float(out.fvu.detach())

    train_step(record=False)  # allocates the optimizer state
    state_bytes = sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values()
                      for t in s.values() if torch.is_tensor(t))
    param_bytes = sum(p.numel() * p.element_size() for p in sae.parameters())
    _ROOF_OUT.clear()  # the roofline's output buffer must not count in the step's peak RSS
    reset_peak()
    start = time.perf_counter()
    fvu = train_step(record=args.steps == 0)
    first_step = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    # Steps and roofline passes alternate so that both see the same machine: on a shared 2-core box the
    # load moves by 5x within minutes, and the ratio of neighbours is what stays meaningful.
    step_times, roof_times, ratios = [], [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        fvu = train_step(record=True)
        step_times.append(time.perf_counter() - start)
        roof_times.append(roofline_seconds(x, sae.W_enc.detach(), repeats=1, warm=False))
        ratios.append(roof_times[-1] / step_times[-1])
    if not step_times:  # --steps 0: the peak-RSS step is the only timed one, against the first roofline
        step_times, ratios = [first_step], [roof / first_step]
    steps = len(step_times)
    elapsed = sum(step_times)
    step_s = elapsed / steps
    tokens_per_s = n / min(step_times)
    roof = min([roof, *roof_times])
    roof_tokens = n / roof
    result = {
        "latents": m, "d": d, "k": args.k, "batch": n, "steps": steps, "optimizer": optimizer_kind,
        "tokens_per_s": round(tokens_per_s, 1), "roofline_tokens_per_s": round(roof_tokens, 1),
        "roofline_ratio": round(statistics.median(ratios), 3),
        "roofline_ratios": [round(r, 3) for r in ratios],
        "best_step_vs_best_roofline": round(tokens_per_s / roof_tokens, 3),
        "roofline_gflops": round(flops / roof / 1e9, 1),
        "step_s": round(step_s, 3), **{f"{k}_s": round(v / steps, 3) for k, v in timings.items()},
        "optimizer_share": round(timings["optimizer"] / elapsed, 3),
        "dense_adam_step_s": round(adam_seconds, 3),
        "dense_adam_share_of_step": round(
            adam_seconds / (step_s - timings["optimizer"] / steps + adam_seconds), 3),
        "param_gib": round(param_bytes / GIB, 3), "optimizer_state_gib": round(state_bytes / GIB, 3),
        "peak_rss_gib": round(peak / GIB, 3),
        "peak_rss_above_params_and_state_gib": round((peak - param_bytes - state_bytes) / GIB, 3),
        "fvu_last": round(fvu, 4), "load_1min": round(os.getloadavg()[0], 2),
    }
    print(f"roofline/step ratios per step: {result['roofline_ratios']} (median {result['roofline_ratio']})")
    print(f"step {step_s:.3f} s (forward {result['forward_s']}, backward {result['backward_s']}, optimizer "
          f"{result['optimizer_s']}) -> best {tokens_per_s:,.0f} tokens/s vs best roofline {roof_tokens:,.0f}")
    print(f"peak RSS {result['peak_rss_gib']} GiB; params {result['param_gib']} GiB + optimizer state "
          f"{result['optimizer_state_gib']} GiB; above them {result['peak_rss_above_params_and_state_gib']} GiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
