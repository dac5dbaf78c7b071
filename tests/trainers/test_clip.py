"""Gradient clipping (training.grad_clip_norm) through real DeepSpeed engines (clip_worker.py): two latent
shards clip by the same global norm as one unsharded dictionary, so they train to the same parameters, with
the touched-row lazy Adam (which clips itself) and with dense Adam (DeepSpeed's gradient_clipping)."""

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.sae import LATENT_PARAMETERS

WORKER = Path(__file__).with_name("clip_worker.py")
_spec = importlib.util.spec_from_file_location("clip_worker", WORKER)
clip_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clip_worker)

pytestmark = pytest.mark.slow  # DeepSpeed process groups of their own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{world: {rank: results}}: one unsharded rank and two latent shards, side by side."""
    folder = tmp_path_factory.mktemp("clip")
    runs = {world: [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(port),
                                      str(folder / f"{world}-{rank}.pt")]) for rank in range(world)]
            for world, port in ((1, _free_port()), (2, _free_port()))}
    for world, processes in runs.items():
        assert [p.wait(timeout=300) for p in processes] == [0] * world, f"the {world}-rank worker failed"
    return {world: {rank: torch.load(folder / f"{world}-{rank}.pt") for rank in range(world)} for world in (1, 2)}


def test_every_step_is_clipped(results):
    norms = results[1][0]["lazy_adam"]["norms"]
    assert results[1][0]["lazy_adam"]["optimizer"] == "RowSparseAdam"
    assert len(norms) == clip_worker.STEPS and min(norms) > 10 * clip_worker.CLIP, norms


@pytest.mark.parametrize("optimizer", ["lazy_adam", "adam"])
def test_two_shards_clip_like_one_dictionary(optimizer, results):
    reference = results[1][0][optimizer]["params"]
    for rank in (0, 1):
        got = results[2][rank][optimizer]
        start, stop = got["range"]
        for name, value in got["params"].items():
            expected = reference[name][start:stop] if name in LATENT_PARAMETERS else reference[name]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=f"{optimizer} {name} rank {rank}")
    if optimizer == "lazy_adam":  # the norm each shard clipped by is the whole dictionary's
        for rank in (0, 1):
            torch.testing.assert_close(torch.tensor(results[2][rank][optimizer]["norms"]),
                                       torch.tensor(results[1][0][optimizer]["norms"]), rtol=1e-5, atol=0)
