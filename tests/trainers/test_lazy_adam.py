"""The touched-row optimizer through real DeepSpeed engines (lazy_adam_worker.py), on one rank and on two
data-parallel gloo ranks: it equals torch.optim.Adam where every row is touched on every step, a reference lazy
Adam where rows are touched intermittently, the replicas stay identical, and a checkpoint resumes bit-for-bit."""

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("lazy_adam_worker.py")
_spec = importlib.util.spec_from_file_location("lazy_adam_worker", WORKER)
lazy_adam_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lazy_adam_worker)

pytestmark = pytest.mark.slow  # DeepSpeed process groups of their own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{world: {rank: results}}: the one-rank group and the two-rank group run side by side."""
    folder = tmp_path_factory.mktemp("lazy-adam")
    runs = {}
    for world in (1, 2):
        port = _free_port()
        runs[world] = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(port),
                                         str(folder / f"checkpoint-{world}"), str(folder / f"{world}-{rank}.pt")])
                       for rank in range(world)]
    for world, processes in runs.items():
        assert [p.wait(timeout=600) for p in processes] == [0] * world, f"the {world}-rank worker failed"
    return {world: {rank: torch.load(folder / f"{world}-{rank}.pt") for rank in range(world)} for world in (1, 2)}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", lazy_adam_worker.CASES)
def test_engine_steps_like_the_reference(case, world, results):
    """every-row: torch.optim.Adam; topk/batchtopk: the reference lazy Adam. Equal to 1e-6 after every step."""
    for rank, got in results[world].items():
        for step, (state, expected) in enumerate(zip(got[case]["engine"], got[case]["reference"], strict=True)):
            for name, value in state.items():
                torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6,
                                           msg=lambda m, n=name, s=step, r=rank: f"{n} step {s} rank {r}: {m}")


@pytest.mark.parametrize("case", lazy_adam_worker.CASES)
def test_replicas_hold_identical_parameters(case, results):
    for step, (zero, one) in enumerate(zip(results[2][0][case]["engine"], results[2][1][case]["engine"],
                                           strict=True)):
        for name, value in zero.items():
            assert torch.equal(value, one[name]), f"{name} differs between the replicas after step {step}"


@pytest.mark.parametrize("world", [1, 2])
def test_rows_are_touched_intermittently(world, results):
    """The lazy comparison means something only if some rows sit out some steps and come back later."""
    touched = torch.stack(results[world][0]["topk"]["touched"])  # [steps, latents]
    sits_out_then_returns = (~touched[:-1] & touched[1:]).any(dim=0)
    assert sits_out_then_returns.any()


def test_checkpoint_resumes_bit_for_bit(results):
    got = results[1][0]
    half = lazy_adam_worker.STEPS // 2
    assert got["resumed_at"] == half
    for step, (state, expected) in enumerate(zip(got["resumed"], got["topk"]["engine"][half:], strict=True)):
        for name, value in state.items():
            assert torch.equal(value, expected[name]), f"{name} differs {step + 1} steps after the resume"
    assert got["resumed_lrs"] == got["topk"]["lrs"][half:]  # the schedule continues where it stopped
    assert len(set(got["topk"]["lrs"])) > 2  # warm-up and decay: a schedule that moves
