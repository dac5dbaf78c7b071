"""Gradient exchange between data-parallel replicas: touched rows (all-gather) against a dense all-reduce.

    python benchmarks/replica_exchange.py [--latents 131072,1048576] [--d 576] [--shares 0.62,0.12]
        [--replicas 2] [--repeats 3]

R processes (gloo on loopback, as the CPU trainer ranks) each hold a row-sparse gradient of one [M, d] matrix
touching share × M rows (random rows, each replica its own). Timed per exchange, best of `--repeats`:
- rows: what DeepSpeed's engine.sparse_allreduce does with the lazy Adam's gradients (the job's path) — an
  all-gather of each replica's row count, then padded all-gathers of the indices and of the rows — plus the
  optimizer's coalesce of the R·U gathered rows (trainers/optim.py `_unique_rows`);
- dense: the alternative — zero-fill an [M, d] buffer, copy the rows in, all-reduce it (gloo's ring).
Bytes each rank receives: rows (R − 1)·U·(d + 1)·4; dense ~2(R − 1)/R·M·d·4 (ring all-reduce).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

GIB = 1024**3


def rows_exchange(rows: torch.Tensor, values: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed's sparse all-gather pattern, then the coalesce the optimizer does."""
    from trainers.optim import _unique_rows

    size = torch.tensor([rows.numel()])
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    most = int(torch.cat(sizes).max())
    pad = most - rows.numel()
    rows = torch.cat([rows, rows.new_zeros(pad)])
    values = torch.cat([values, values.new_zeros(pad, values.shape[1])])
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_values = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_values, values)
    rows = torch.cat([r[:int(n)] for r, n in zip(all_rows, sizes, strict=True)])
    values = torch.cat([v[:int(n)] for v, n in zip(all_values, sizes, strict=True)])
    grad = torch.sparse_coo_tensor(rows[None], values, (int(rows.max()) + 1, values.shape[1]))
    return _unique_rows(grad)


def dense_exchange(rows: torch.Tensor, values: torch.Tensor, latents: int) -> torch.Tensor:
    dense = values.new_zeros(latents, values.shape[1]).index_copy_(0, rows, values)
    dist.all_reduce(dense)
    return dense


def best_seconds(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        function()
        dist.barrier()
        best = min(best, time.perf_counter() - start)
    return best


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for latents in (int(m) for m in args.latents.split(",")):
        for share in (float(s) for s in args.shares.split(",")):
            generator = torch.Generator().manual_seed(rank)
            rows = torch.randperm(latents, generator=generator)[:int(share * latents)].sort().values
            values = torch.randn(rows.numel(), args.d, generator=generator)
            rows_s = best_seconds(lambda: rows_exchange(rows, values, world), args.repeats)  # noqa: B023
            dense_s = best_seconds(lambda: dense_exchange(rows, values, latents), args.repeats)  # noqa: B023
            touched = rows.numel()
            results.append({"latents": latents, "d": args.d, "share": share, "touched_rows": touched,
                            "replicas": world, "rows_s": round(rows_s, 4), "dense_s": round(dense_s, 4),
                            "rows_received_gib": round((world - 1) * touched * (args.d + 1) * 4 / GIB, 3),
                            "dense_received_gib": round(2 * (world - 1) / world * latents * args.d * 4 / GIB, 3),
                            "faster": "rows" if rows_s < dense_s else "dense"})
    if rank == 0:
        print(f"{'latents':>9} {'share':>6} {'touched':>9} {'rows s':>8} {'dense s':>8} {'rows GiB':>9} "
              f"{'dense GiB':>9}  faster")
        for r in results:
            print(f"{r['latents']:>9} {r['share']:>6} {r['touched_rows']:>9} {r['rows_s']:>8} {r['dense_s']:>8} "
                  f"{r['rows_received_gib']:>9} {r['dense_received_gib']:>9}  {r['faster']}")
        print(json.dumps({"load_1min": round(os.getloadavg()[0], 2), "results": results}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", default="131072,1048576")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--shares", default="0.62,0.12", help="touched rows / latents (random inputs: 0.62 at "
                                                              "131,072 latents, 4,096 tokens, k 32; ~0.12 at 1M)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(args.replicas, port, args), nprocs=args.replicas, join=True)


if __name__ == "__main__":
    main()
