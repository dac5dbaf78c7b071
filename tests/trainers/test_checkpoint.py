"""Checkpoints through real DeepSpeed engines in separate processes: saved on one layout (latent shards ×
data-parallel replicas, ZeRO stage), loaded on another, training continues as if it had never stopped."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("checkpoint_worker.py")
pytestmark = pytest.mark.slow  # about ten DeepSpeed process groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, mode: str, world: int, shards: int, stage: int, checkpoint: Path, kind: str = "topk"
         ) -> dict:
    out, port = tmp_path / f"{kind}-{mode}-{world}x{shards}-z{stage}.pt", _free_port()
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(shards), str(stage),
                               str(port), mode, str(checkpoint), str(out), kind]) for rank in range(world)]
    codes = [process.wait(timeout=300) for process in ranks]
    assert codes == [0] * world, f"{kind} {mode} on {world} ranks / {shards} shards / ZeRO-{stage} failed: {codes}"
    return torch.load(out)


def _assert_same_training(resumed: dict, straight: dict, exact: bool) -> None:
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"][-3:]), **tolerance)
    for name, value in straight["state"].items():
        torch.testing.assert_close(resumed["state"][name], value, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    assert resumed["lr"] == straight["lr"]


@pytest.fixture(scope="module")
def sharded_straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    return folder, _run(folder, "straight", 2, 2, 0, folder / "two-shards")


def test_two_shards_train_like_one_rank(sharded_straight, tmp_path):
    """Equivalence through real DeepSpeed engines: the same seed and batches on two latent shards and on one
    rank give the same losses and the same dictionary, up to the order in which the decode is summed."""
    folder, two = sharded_straight
    one = _run(tmp_path, "straight", 1, 1, 0, tmp_path / "one-rank")
    assert len(one["losses"]) == len(two["losses"]) == 6
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_resume_on_the_same_shards_is_exact(sharded_straight):
    folder, straight = sharded_straight
    _assert_same_training(_run(folder, "resume", 2, 2, 0, folder / "two-shards"), straight, exact=True)


def test_resume_on_one_rank_reshards(sharded_straight):
    folder, straight = sharded_straight
    # One rank sums the decode in another order than two shards do: equal up to float32 rounding.
    _assert_same_training(_run(folder, "resume", 1, 1, 0, folder / "two-shards"), straight, exact=False)


def test_zero1_state_across_replicas_round_trips(tmp_path):
    """ZeRO-1 splits Adam's moments over the two replicas; the checkpoint holds them whole, so it resumes
    exactly on the same layout and on a single un-partitioned rank."""
    straight = _run(tmp_path, "straight", 2, 1, 1, tmp_path / "zero1")
    assert (tmp_path / "zero1" / "shard-0-of-1.pt").is_file()
    _assert_same_training(_run(tmp_path, "resume", 2, 1, 1, tmp_path / "zero1"), straight, exact=True)
    _assert_same_training(_run(tmp_path, "resume", 1, 1, 0, tmp_path / "zero1"), straight, exact=False)


# What each kind adds to the state a resume must restore (beyond W_enc, b_enc, W_dec, b_dec).
KIND_STATE = {"abstopk": (), "matryoshka_batchtopk": ("threshold",), "skip_transcoder": ("W_skip", "target_scale")}


@pytest.mark.parametrize("kind", list(KIND_STATE))
def test_resume_of_each_kind_on_two_shards_is_exact(kind, tmp_path):
    """AbsTopK, Matryoshka BatchTopK (a prefix across the shard boundary) and a skip transcoder resume from a
    mid-training checkpoint to the straight run's parameters and buffers, bit for bit: W_skip, BatchTopK's θ
    and the transcoder's target scale included."""
    straight = _run(tmp_path, "straight", 2, 2, 0, tmp_path / kind, kind)
    for name in KIND_STATE[kind]:  # each trained or set away from its initial value, so comparing it can fail
        assert name in straight["state"], f"{kind}: {name} missing from the state"
        assert straight["state"][name].abs().sum() > 0 and not torch.equal(straight["state"][name],
                                                                          torch.ones_like(straight["state"][name]))
    _assert_same_training(_run(tmp_path, "resume", 2, 2, 0, tmp_path / kind, kind), straight, exact=True)
