"""Latent sharding: two gloo ranks (two processes) holding half of the latents each compute the same losses,
reconstructions and gradients as one unsharded dictionary, for every architecture
(and AuxK, also with dead latents on one shard only; Matryoshka: every prefix's FVU and L0, a prefix
spanning the shard boundary; skip transcoders, plain and Matryoshka)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.sae import LATENT_PARAMETERS

WORKER = Path(__file__).with_name("sharded_worker.py")
_spec = importlib.util.spec_from_file_location("sharded_worker", WORKER)
sharded_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sharded_worker)


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    init = f"file://{folder / 'rendezvous'}"
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", init, str(folder / f"rank{rank}.pt")])
             for rank in range(2)]
    for process in ranks:
        assert process.wait(timeout=300) == 0, "a sharded rank failed"
    return {rank: torch.load(folder / f"rank{rank}.pt") for rank in range(2)}


@pytest.mark.parametrize("case", sharded_worker.CASES)
def test_two_shards_equal_one_dictionary(case, sharded_results):
    reference = sharded_worker.run(case, None)
    for rank in (0, 1):
        got = sharded_results[rank][case]
        for key in ("loss", "fvu", "auxk", "x_hat"):
            torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{key} rank {rank}")
        for key in (key for key in reference["metrics"] if "prefix" in key):  # Matryoshka: FVU and L0 per prefix
            torch.testing.assert_close(got["metrics"][key], reference["metrics"][key], rtol=1e-5, atol=1e-6,
                                       msg=f"{key} rank {rank}")
        start, stop = got["range"]
        for name, grad in got["grads"].items():
            expected = reference["grads"][name]
            if name in LATENT_PARAMETERS:  # b_dec, W_skip are replicated: their gradients summed over the shards
                expected = expected[start:stop]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=f"grad {name} rank {rank}")


def test_auxk_is_active_in_the_comparison(sharded_results):
    assert float(sharded_results[0]["topk"]["auxk"]) > 0
    assert float(sharded_results[0]["abstopk"]["auxk"]) > 0


def test_a_matryoshka_prefix_spans_the_shard_boundary(sharded_results):
    metrics = sharded_results[0]["matryoshka_topk"]["metrics"]
    assert sharded_results[0]["matryoshka_topk"]["range"] == (0, 32)
    # the prefix of 40 holds codes of latents beyond the boundary: more of them than the prefix of 24
    assert float(metrics["l0_prefix_40"]) > float(metrics["l0_prefix_24"]) > 0
    assert float(sharded_results[1]["topk-dead-on-one-shard"]["auxk"]) > 0  # shard 1 has none dead itself
