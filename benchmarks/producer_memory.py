"""Producer memory: the model cut after the hooked layer versus the whole model, peak RSS of a fresh process.

    python benchmarks/producer_memory.py [--layer 3] [--model embedded|PATH] [--device cpu|cuda]

Each load runs in its own subprocess (so one's pages do not count towards the other's peak): the producer's
load (`load_language_model(keep_layers=layer + 1, lm_head=False)`: embedding + blocks 0..layer) and the whole
causal LM, followed by one forward of a 4,096-token batch capturing blocks.<layer>.hook_resid_post. Reported:
parameters held, peak RSS of the process (VmHWM) and, on CUDA, peak GPU memory. The default model is the
embedded SmolLM2-135M GGUF; `--model` takes a local Hugging Face folder (safetensors) too.

Prints its figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(model: str, layer: int, cut: bool, device: str) -> dict:
    """In this process: load, one forward, the figures."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import time

    import torch
    from procmem import rss_bytes

    from api.jobspec import HookSpec, ModelSpec
    from services.models import capture, load_language_model, run_blocks

    spec = ModelSpec(name=model, dtype="bfloat16" if device == "cuda" else "float32")
    started = time.perf_counter()
    lm = (load_language_model(spec, keep_layers=layer + 1, device=device, lm_head=False) if cut
          else load_language_model(spec, device=device))
    load_s = time.perf_counter() - started
    ids = torch.randint(10, 1000, (16, 256), generator=torch.Generator().manual_seed(0))
    hook = HookSpec(layer=layer, site="resid_post")
    with torch.inference_mode(), capture(lm.model, [hook]) as got:
        run_blocks(lm, ids)
        rows = got[hook.name].shape[0] * got[hook.name].shape[1]
    out = {"parameters": sum(p.numel() for p in lm.model.parameters()), "blocks": lm.kept_layers,
           "num_layers": lm.num_layers, "peak_rss_bytes": rss_bytes("VmHWM"), "load_s": load_s, "rows": rows}
    if device == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["cut", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.layer, args.child == "cut", args.device)))
        return
    results = {}
    for kind in ("cut", "full"):
        done = subprocess.run([sys.executable, __file__, "--child", kind, "--layer", str(args.layer), "--model",
                               args.model, "--device", args.device], capture_output=True, text=True, check=True)
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 1 << 30
    for kind, r in results.items():
        gpu = f", peak GPU {r['peak_gpu_bytes'] / gib:.3f} GiB" if "peak_gpu_bytes" in r else ""
        print(f"{kind:>4}: {r['blocks']} of {r['num_layers']} blocks, {r['parameters'] / 1e6:.1f}M parameters, "
              f"peak RSS {r['peak_rss_bytes'] / gib:.3f} GiB{gpu}, load {r['load_s']:.1f} s")
    cut, full = results["cut"], results["full"]
    summary = {"model": args.model, "layer": args.layer, "device": args.device, "cut": cut, "full": full,
               "parameter_ratio": cut["parameters"] / full["parameters"],
               "peak_rss_ratio": cut["peak_rss_bytes"] / full["peak_rss_bytes"]}
    if "peak_gpu_bytes" in cut:
        summary["peak_gpu_ratio"] = cut["peak_gpu_bytes"] / full["peak_gpu_bytes"]
    print(f"cut / full: parameters {summary['parameter_ratio']:.3f}, peak RSS {summary['peak_rss_ratio']:.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
