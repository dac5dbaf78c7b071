"""Buffers that are not parameters stay identical across data-parallel replicas that see different batches
(DeepSpeed keeps the parameters in step, not these): BatchTopK's θ and JumpReLU's input scale."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("replica_buffers_worker.py")
pytestmark = pytest.mark.slow  # two gloo processes


def test_threshold_and_input_scale_are_the_same_on_every_replica(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(port), str(out)],
                              cwd=Path(__file__).resolve().parents[2]) for rank, out in enumerate(outs)]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0], "a replica failed"
    first, second = (torch.load(out) for out in outs)
    assert abs(first["batch_mean"] - second["batch_mean"]) > 0.5  # the replicas do see different data
    assert float(first["batchtopk"]["threshold"]) > 0 and float(first["jumprelu"]["input_scale"]) > 1
    for arch in ("batchtopk", "jumprelu"):
        for name, value in first[arch].items():
            torch.testing.assert_close(second[arch][name], value, rtol=0, atol=0, msg=f"{arch}.{name} differs")
