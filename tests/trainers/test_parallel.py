"""Latent sharding: two gloo ranks holding half of the latents each compute the same losses, reconstructions
and gradients as one unsharded dictionary, for every architecture (and AuxK)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.parallel import ShardMesh
from trainers.sae import SAEConfig, SparseAutoencoder

D, M, N, K = 16, 64, 40, 4
ARCHITECTURES = ["topk", "batchtopk", "relu", "jumprelu"]


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=generator) * 2 + 0.5
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    return x, dead


def _run(architecture: str, mesh: ShardMesh | None) -> dict:
    x, dead = _data()
    cfg = SAEConfig(d_in=D, latents=M, k=K, architecture=architecture, k_aux=8, initialization="random",
                    sparsity_warmup=0.0)
    sae = SparseAutoencoder(cfg, mesh=mesh)
    sae.initialize(x, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a trained-looking encoder: not exactly the decoder's transpose
        sae.W_enc.add_(0.3 * torch.randn(M, D, generator=torch.Generator().manual_seed(2))[
            sae.latent_start:sae.latent_stop])
    out = sae(x, dead_mask=dead[sae.latent_start:sae.latent_stop])
    out.loss.backward()
    return {"loss": out.loss.detach(), "fvu": out.fvu.detach(), "auxk": out.auxk_loss.detach(),
            "x_hat": out.x_hat.detach(), "grads": {n: p.grad.clone() for n, p in sae.named_parameters()},
            "range": (sae.latent_start, sae.latent_stop)}


def _worker(rank: int, world: int, init: str, queue) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mesh = ShardMesh.build(world, rank, shards=world)
    queue.put((rank, {arch: _run(arch, mesh) for arch in ARCHITECTURES}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    context = mp.get_context("fork")  # the children run this module's functions as they are
    queue = context.Queue()
    init = f"file://{tmp_path_factory.mktemp('pg') / 'rendezvous'}"
    processes = [context.Process(target=_worker, args=(rank, 2, init, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return results


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_two_shards_equal_one_dictionary(architecture, sharded_results):
    reference = _run(architecture, None)
    for rank in (0, 1):
        got = sharded_results[rank][architecture]
        for key in ("loss", "fvu", "auxk", "x_hat"):
            torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{key} rank {rank}")
        start, stop = got["range"]
        for name, grad in got["grads"].items():
            expected = reference["grads"][name]
            if name != "b_dec":  # b_dec is replicated: its gradient is summed over the shards
                expected = expected[start:stop]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=f"grad {name} rank {rank}")


def test_auxk_is_active_in_the_comparison(sharded_results):
    assert float(sharded_results[0]["topk"]["auxk"]) > 0
