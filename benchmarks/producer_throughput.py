"""Producer and buffer throughput: what the activation stream costs.

    python benchmarks/producer_throughput.py [--batches 2] [--layer 3] [--skip-producers] [--handoff-batches 30]

1. Model forward, in this process, embedded SmolLM2-135M, 4,096-token batches (16 windows of 256): tokens/s of
   the full causal LM (all 30 blocks and the LM head) versus the model cut after the hooked layer (the producer's
   path: embeddings + blocks 0..layer, no head), activation capture included in both.
2. ActivationProducer actors on a local Ray (1 CPU each), the cut model: tokens/s of 1 producer versus 2.
3. Buffer hand-off, ms per batch: synthetic producers (a fixed [4096, d] float32 array, no compute) feeding the
   ActivationBuffer (mixing across 4 batches, pool of 4); the consumer times `buffer.next` + reading the arrays
   (zero-copy) as a trainer does; versus handing the same array over in-process (queue.Queue + torch.from_numpy),
   and versus the same reservoir mixing in-process; d = 576 and d = 2,304.
4. The buffer's per-batch overhead (consumer fetch + the buffer's CPU time mixing and putting one batch) against
   one training step of a 16,384-latent TopK dictionary at d = 576 (forward, backward, Adam), same machine.

Prints its figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.jobspec import DictionarySpec, HookSpec, JobSpec, ModelSpec  # noqa: E402
from services.models import capture, load_language_model, run_blocks  # noqa: E402

BATCH_TOKENS = 4096
CONTEXT = 256
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _windows(tokenizer, count: int) -> torch.Tensor:
    from services.data import embedded_documents
    from services.windows import TokenWindows

    windows = TokenWindows(tokenizer, embedded_documents()[:400], CONTEXT)
    return torch.from_numpy(np.stack([w for _, w in zip(range(count), windows, strict=False)]))


def forward_throughput(layer: int, batches: int, device: str = "cpu") -> dict:
    hook = HookSpec(layer=layer, site="resid_post")
    started = time.perf_counter()
    lm = load_language_model(ModelSpec(dtype="bfloat16" if device == "cuda" else "float32"), device=device)
    load_s = time.perf_counter() - started
    ids = _windows(lm.tokenizer, BATCH_TOKENS // CONTEXT).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(run) -> float:
        run(ids[:2, :32])  # warm-up
        times = []
        for _ in range(batches):
            sync()
            t = time.perf_counter()
            run(ids)
            sync()
            times.append(time.perf_counter() - t)
        return BATCH_TOKENS / statistics.median(times)

    def full(x):
        with torch.inference_mode(), capture(lm.model, [hook]) as got:
            lm.model(input_ids=x, use_cache=False)
        return got

    full_tps = timed(full)
    layers = lm.model.model.layers
    del layers[layer + 1:]  # what load_language_model(keep_layers=layer + 1) loads

    def cut(x):
        with torch.inference_mode(), capture(lm.model, [hook]) as got:
            run_blocks(lm, x)
        return got

    cut_tps = timed(cut)
    print(f"forward, {BATCH_TOKENS}-token batches, {torch.get_num_threads()} threads (load {load_s:.1f} s): "
          f"full model {full_tps:,.0f} tok/s, cut at layer {layer} {cut_tps:,.0f} tok/s: {cut_tps / full_tps:.1f}x")
    return {"full_tokens_per_s": full_tps, "cut_tokens_per_s": cut_tps, "cut_speedup": cut_tps / full_tps,
            "threads": torch.get_num_threads(), "load_s": load_s, "device": device}


def producer_scaling(layer: int, batches: int) -> dict:
    from services.model_producer import ActivationProducer

    spec = JobSpec(hook=HookSpec(layer=layer), data={"context_length": CONTEXT},
                   training={"batch_tokens": BATCH_TOKENS, "tokens": BATCH_TOKENS * 10})
    result = {}
    for n in (1, 2):
        actor = ray.remote(ActivationProducer).options(num_cpus=1)
        producers = [actor.remote(spec.model_dump_json(), i, n) for i in range(n)]
        ray.get([p.info.remote() for p in producers])  # loaded
        ray.get([p.next_batch.remote()[0] for p in producers])  # warm
        started = time.perf_counter()
        ray.get([p.next_batch.remote()[0] for p in producers for _ in range(batches)])
        seconds = time.perf_counter() - started
        result[f"producers_{n}_tokens_per_s"] = n * batches * BATCH_TOKENS / seconds
        for p in producers:
            ray.kill(p)
    print(f"producers (cut at layer {layer}, 1 CPU each): 1 producer {result['producers_1_tokens_per_s']:,.0f} "
          f"tok/s, 2 producers {result['producers_2_tokens_per_s']:,.0f} tok/s "
          f"({result['producers_2_tokens_per_s'] / result['producers_1_tokens_per_s']:.2f}x)")
    return result


class SyntheticProducer:
    """A producer with no model: the same [rows, d] arrays every call (isolates the channel's cost)."""

    def __init__(self, d: int, rows: int):
        rng = np.random.default_rng(0)
        self.batch = {"blocks.3.hook_resid_post": rng.standard_normal((rows, d), dtype=np.float32),
                      "token_ids": np.zeros(rows, np.int32), "row_ids": np.arange(rows, dtype=np.int64)}
        self.rows = rows

    @ray.method(num_returns=2)
    def next_batch(self, offset: int | None = None):
        return {"tokens": self.rows, "offset": offset or 0, "end": False, "epoch": 0, "seeks": 0}, self.batch


def handoff(d: int, batches: int) -> dict:
    from services.buffer import ActivationBuffer

    producers = [ray.remote(SyntheticProducer).options(num_cpus=0).remote(d, BATCH_TOKENS)]
    buffer = ray.remote(ActivationBuffer).options(num_cpus=0).remote(producers, 4, mix_batches=4,
                                                                     batch_rows=BATCH_TOKENS)
    name = "blocks.3.hook_resid_post"

    def fetch():
        [ref] = ray.get(buffer.next.remote())
        batch = ray.get(ref)
        return torch.from_numpy(batch[name]).sum()  # touch it, as a trainer's first op would

    for _ in range(8):
        fetch()
    times = []
    for _ in range(batches):
        time.sleep(0.02)  # let the pool refill, as it does while a trainer steps
        t = time.perf_counter()
        fetch()
        times.append(time.perf_counter() - t)
    stats = ray.get(buffer.stats.remote())
    ray.kill(buffer)
    for p in producers:
        ray.kill(p)
    # in-process: the same arrays through a queue, and the same reservoir swap
    array = np.random.default_rng(1).standard_normal((BATCH_TOKENS, d), dtype=np.float32)
    q: queue.Queue = queue.Queue(maxsize=4)
    local = []
    for _ in range(batches):
        t = time.perf_counter()
        q.put({name: array})
        torch.from_numpy(q.get()[name]).sum()
        local.append(time.perf_counter() - t)
    reservoir = np.empty((4 * BATCH_TOKENS, d), np.float32)
    rng = np.random.default_rng(0)
    mixing = []
    for _ in range(10):
        t = time.perf_counter()
        slots = np.sort(rng.choice(len(reservoir), BATCH_TOKENS, replace=False))
        out = reservoir[slots]
        reservoir[slots] = array
        torch.from_numpy(out).sum()
        mixing.append(time.perf_counter() - t)
    result = {"buffer_fetch_ms": 1000 * statistics.median(times), "buffer_mix_put_ms": stats["mix_ms_per_batch"],
              "in_process_ms": 1000 * statistics.median(local),
              "in_process_mixing_ms": 1000 * statistics.median(mixing), "mb_per_batch": BATCH_TOKENS * d * 4 / 1e6}
    print(f"hand-off d={d} ({result['mb_per_batch']:.1f} MB/batch): buffer fetch {result['buffer_fetch_ms']:.1f} ms "
          f"(+ buffer-side mix+put {result['buffer_mix_put_ms']:.1f} ms), in-process queue "
          f"{result['in_process_ms']:.2f} ms, in-process mixing {result['in_process_mixing_ms']:.1f} ms")
    return result


def trainer_step_ms(d: int, latents: int, steps: int = 3) -> float:
    from trainers.sae import SparseAutoencoder, sae_config_from_spec

    spec = DictionarySpec(latents=latents, k=32)
    cfg = sae_config_from_spec({**spec.model_dump(), "latents": latents}, d)
    sae = SparseAutoencoder(cfg, device="cpu")
    x = torch.randn(BATCH_TOKENS, d)
    sae.initialize(x[:2048], generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        out = sae(x)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2, help="timed 4,096-token batches per forward measurement")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--handoff-batches", type=int, default=30)
    parser.add_argument("--skip-forward", action="store_true")
    parser.add_argument("--skip-producers", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the forward measurement runs (cuda: bf16); producers and hand-off stay on CPU")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f} on {os.cpu_count()} cores")
    figures: dict = {"load_at_start": load, "cores": os.cpu_count(), "batch_tokens": BATCH_TOKENS}
    if not args.skip_forward:
        figures["forward"] = forward_throughput(args.layer, args.batches, args.device)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             object_store_memory=1 << 30)
    try:
        if not args.skip_producers:
            figures["producers"] = producer_scaling(args.layer, args.batches)
        figures["handoff"] = {str(d): handoff(d, args.handoff_batches) for d in (576, 2304)}
    finally:
        ray.shutdown()
    step = trainer_step_ms(576, 16384)
    h = figures["handoff"]["576"]
    overhead = h["buffer_fetch_ms"] + h["buffer_mix_put_ms"]
    figures["overhead_16k"] = {"trainer_step_ms": step, "buffer_overhead_ms": overhead,
                               "overhead_share": overhead / step, "under_10_percent": overhead < 0.1 * step}
    print(f"16,384 latents, d=576: trainer step {step:.0f} ms; buffer per-batch overhead {overhead:.1f} ms "
          f"({100 * overhead / step:.1f}% of a step; target < 10%)")
    figures["load_at_end"] = os.getloadavg()[0]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
