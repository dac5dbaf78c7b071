"""Trainer throughput against the encoder-matmul roofline, through the job's own DeepSpeed engine, in one process.

    python benchmarks/trainer_throughput.py --latents 131072 [--steps 5] [--batch 4096] [--d 576] [--k 32]
        [--optimizer auto|lazy_adam|adam] [--zero-stage 1] [--dead-fraction 0.0] [--device cpu|cuda]
        [--precision fp32|bf16]
        [--architecture topk|batchtopk|abstopk|matryoshka_topk|matryoshka_batchtopk|transcoder]
        [--matryoshka-prefixes 4]

`--architecture transcoder` is a TopK skip transcoder (mlp_in -> mlp_out, W_skip [d, d]) fed a random target;
the Matryoshka kinds use `--matryoshka-prefixes` doubling groups.

The step is built as the Ray Train worker builds it — trainers.worker._build on a JobSpec of one dictionary:
the optimizer JobSpec.lazy_adam picks (auto: the touched-row lazy Adam for TopK/BatchTopK in fp32, dense Adam
otherwise), trainers.engine.build_engine with the job's ZeRO stage, schedule and Adam constants — and runs as
the worker runs it: engine(x, dead_mask), engine.backward(loss), engine.step(), then the firing counts.
Roofline: a dense x @ W_encᵀ of the same shape (N×d by d×M; above 131,072 latents computed in 65,536-latent
slabs so its output fits in memory — same FLOPs), timed on this machine; roofline tokens/s = N / its time.
Steps and roofline passes alternate, so each ratio compares neighbours on a machine whose load moves.
Also timed: one torch.optim.Adam step over dense W_enc + W_dec gradients (on a slab, scaled), for reference.
Peak RSS is the process high-water mark during one step (reset through /proc/self/clear_refs), set against
parameters + optimizer state. On CUDA (--device cuda, nccl; --precision bf16: DeepSpeed's bf16 with fp32 master
weights, the roofline a bf16 product) every timing synchronizes the GPU and the peak is torch's peak GPU memory.
Prints its figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import numpy as np
import torch
from procmem import reset_peak, rss_bytes
from sharded_memory import optimizer_state_bytes, tensor_bytes

GIB = 1024**3


_ROOF_OUT: list[torch.Tensor] = []


def sync() -> None:
    """Wait for the GPU's queued work, so that wall-clock times measure it (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def roofline_seconds(x: torch.Tensor, W: torch.Tensor, repeats: int = 2, warm: bool = True) -> float:
    slab = W.shape[0] if W.shape[0] <= 131072 else 65536
    if not _ROOF_OUT:  # one output buffer for every pass: no page faults inside the timed product
        _ROOF_OUT.append(x.new_empty(x.shape[0], slab))
    out = _ROOF_OUT[0]
    best = float("inf")
    for _ in range(repeats + int(warm)):  # a first round warms the allocator and the BLAS
        sync()
        start = time.perf_counter()
        for s in range(0, W.shape[0], slab):
            w = W[s:s + slab]
            torch.mm(x, w.T, out=out[:, :w.shape[0]])
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def adam_step_seconds(shape: tuple[int, int], max_rows: int, device: str = "cpu") -> tuple[float, int]:
    """Time of one torch.optim.Adam step over two [M, d] params with dense grads, scaled from a slab."""
    rows = min(shape[0], max_rows)
    params = [torch.nn.Parameter(torch.randn(rows, shape[1], device=device)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)
    opt.step()
    sync()
    start = time.perf_counter()
    for _ in range(2):
        opt.step()
    sync()
    seconds = (time.perf_counter() - start) / 2
    del params, opt
    return seconds * shape[0] / rows, rows


def job_spec(args: argparse.Namespace):
    from api.jobspec import JobSpec

    dictionary = {"name": "bench", "architecture": args.architecture, "latents": args.latents, "k": args.k,
                  "initialization": "random", "b_dec_init": "mean", "dead_window_tokens": 10**12}
    output = {}
    if args.architecture == "transcoder":  # a TopK skip transcoder: SAELens has no TopK one, sparsify does
        dictionary.update(architecture="topk", hook={"layer": 1, "site": "mlp_in"},
                          hook_out={"layer": 1, "site": "mlp_out"}, skip=True)
        output = {"formats": ["sparsify"]}
    if args.architecture.startswith("matryoshka_"):
        dictionary["matryoshka_prefixes"] = args.matryoshka_prefixes
    return JobSpec.model_validate({
        "dictionaries": [dictionary], "output": output,
        "training": {"tokens": args.batch * max(args.steps + 2, 2), "batch_tokens": args.batch,
                     "warmup_steps": 0, "precision": args.precision, "optimizer": args.optimizer},
        "cluster": {"zero_stage": args.zero_stage}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=int, required=True)
    parser.add_argument("--steps", type=int, default=5, help="0: time only the peak-RSS step")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--architecture", default="topk", choices=(
        "topk", "batchtopk", "abstopk", "matryoshka_topk", "matryoshka_batchtopk", "transcoder"))
    parser.add_argument("--matryoshka-prefixes", type=int, default=4, help="doubling groups (matryoshka_*)")
    parser.add_argument("--optimizer", choices=("auto", "lazy_adam", "adam"), default="auto",
                        help="training.optimizer of the job (auto: lazy_adam here)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=1, help="cluster.zero_stage")
    parser.add_argument("--dead-fraction", type=float, default=0.0, help="mark this share dead to include AuxK")
    parser.add_argument("--adam-probe-rows", type=int, default=65536)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training.precision")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import logging

    import deepspeed

    from trainers.parallel import ShardMesh
    from trainers.worker import _build

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    n, d, m = args.batch, args.d, args.latents
    spec = job_spec(args)
    lazy = spec.lazy_adam(0, bf16=args.precision == "bf16")
    print(f"latents={m} d={d} k={args.k} batch={n} architecture={args.architecture} optimizer={args.optimizer} "
          f"({'lazy Adam' if lazy else 'dense Adam'}) zero_stage={args.zero_stage} "
          f"device={args.device} precision={args.precision} threads={torch.get_num_threads()} "
          f"load={os.getloadavg()[0]:.2f}", flush=True)

    adam_seconds, adam_rows = adam_step_seconds((m, d), args.adam_probe_rows, args.device)
    print(f"dense torch.optim.Adam step over W_enc+W_dec: {adam_seconds:.3f} s (measured on {adam_rows} rows)",
          flush=True)

    device = torch.device(args.device)
    x = torch.randn(n, d)
    # a transcoder's target: another site's rows, here a fixed random function of x (aligned row for row)
    y = torch.tanh(x @ torch.randn(d, d) / d**0.5) if args.architecture == "transcoder" else None
    dictionary = _build(spec, 0, x[:2048].numpy().astype(np.float32), device, ShardMesh(1, 0, 1),
                        None if y is None else y[:2048].numpy().astype(np.float32))
    engine, sae, tracker = dictionary.engine, dictionary.sae, dictionary.tracker
    x = x.to(device, sae.W_enc.dtype)  # as the worker's _input: the engine's dtype (bf16 under DeepSpeed's bf16)
    y = None if y is None else y.to(device, sae.W_enc.dtype)
    if args.dead_fraction > 0:  # "dead" latents: the AuxK path runs
        dead = torch.rand(m) < args.dead_fraction
        tracker.tokens_since_fired[dead] = tracker.window_tokens

    big = m > 262144  # a roofline pass at 1M latents is ~5 TFLOP: one pass, no warm-up round
    roof = roofline_seconds(x, sae.W_enc.detach(), repeats=1 if big else 2, warm=not big)
    flops = 2.0 * n * d * m
    print(f"roofline matmul: {roof:.3f} s = {flops / roof / 1e9:.1f} GFLOP/s -> {n / roof:,.0f} tokens/s", flush=True)

    timings: dict[str, float] = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "metrics": 0.0}
    touched: list[int] = []

    def train_step(record: bool) -> float:
        sync()
        t0 = time.perf_counter()
        out = engine(x, dead_mask=tracker.dead_mask(), progress=0.5, target=y)
        sync()
        t1 = time.perf_counter()
        engine.backward(out.loss)
        sync()
        t2 = time.perf_counter()
        if sae.W_enc.grad is not None and sae.W_enc.grad.is_sparse:  # bf16: DeepSpeed took the grads already
            touched.append(sae.W_enc.grad._nnz())
        engine.step()
        sync()
        t3 = time.perf_counter()
        with torch.no_grad():  # as the worker: firing counts of this batch
            tracker.update_counts(tracker.batch_counts(out.latent_acts, out.latent_indices), n)
        sync()
        t4 = time.perf_counter()
        if record:
            timings["forward"] += t1 - t0
            timings["backward"] += t2 - t1
            timings["optimizer"] += t3 - t2
            timings["metrics"] += t4 - t3
        return float(out.fvu.detach())

    train_step(record=False)  # allocates the optimizer state
    state_bytes = optimizer_state_bytes(engine)
    param_bytes = tensor_bytes(sae.parameters())
    _ROOF_OUT.clear()  # the roofline's output buffer must not count in the step's peak RSS
    reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fvu = train_step(record=args.steps == 0)
    first_step = time.perf_counter() - start
    peak = rss_bytes("VmHWM") if device.type == "cpu" else torch.cuda.max_memory_allocated()
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
        "latents": m, "d": d, "k": args.k, "batch": n, "steps": steps, "architecture": args.architecture,
        "device": args.device, "precision": args.precision,
        "optimizer": "lazy_adam" if lazy else "adam", "zero_stage_asked": args.zero_stage,
        "engine": type(engine.optimizer).__name__,
        "tokens_per_s": round(tokens_per_s, 1), "roofline_tokens_per_s": round(roof_tokens, 1),
        "roofline_ratio": round(statistics.median(ratios), 3),
        "roofline_ratios": [round(r, 3) for r in ratios],
        "best_step_vs_best_roofline": round(tokens_per_s / roof_tokens, 3),
        "roofline_gflops": round(flops / roof / 1e9, 1),
        "step_s": round(step_s, 3), **{f"{k}_s": round(v / steps, 3) for k, v in timings.items()},
        "optimizer_share": round(timings["optimizer"] / elapsed, 3),
        "touched_rows": int(statistics.median(touched)) if touched else None,
        "touched_share": round(statistics.median(touched) / m, 3) if touched else None,
        "dense_adam_step_s": round(adam_seconds, 3),
        "param_gib": round(param_bytes / GIB, 3), "optimizer_state_gib": round(state_bytes / GIB, 3),
        "peak_rss_gib": round(peak / GIB, 3),
        "peak_rss_above_params_and_state_gib": round((peak - param_bytes - state_bytes) / GIB, 3),
        "fvu_last": round(fvu, 4), "load_1min": round(os.getloadavg()[0], 2),
    }
    print(f"roofline/step ratios per step: {result['roofline_ratios']} (median {result['roofline_ratio']})")
    print(f"step {step_s:.3f} s (forward {result['forward_s']}, backward {result['backward_s']}, optimizer "
          f"{result['optimizer_s']}, metrics {result['metrics_s']}) -> best {tokens_per_s:,.0f} tokens/s vs best "
          f"roofline {roof_tokens:,.0f}; touched rows of W_enc {result['touched_rows']} "
          f"(share {result['touched_share']})")
    print(f"peak RSS {result['peak_rss_gib']} GiB; params {result['param_gib']} GiB + optimizer state "
          f"{result['optimizer_state_gib']} GiB; above them {result['peak_rss_above_params_and_state_gib']} GiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
