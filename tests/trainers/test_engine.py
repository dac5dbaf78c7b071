"""The DeepSpeed engine's options in a real DeepSpeed process group: gradient accumulation and optimizer offload
to CPU (ZeRO-1 and -2) train the same dictionary as a plain torch loop, and offloaded state survives a checkpoint."""

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("engine_worker.py")
_spec = importlib.util.spec_from_file_location("engine_worker", WORKER)
engine_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_worker)

pytestmark = pytest.mark.slow  # DeepSpeed engines in a process of their own


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.run([sys.executable, str(WORKER), str(port), str(folder / "checkpoint"),
                              str(folder / "out.pt")], timeout=600)
    assert process.returncode == 0, "the engine worker failed"
    return torch.load(folder / "out.pt")


@pytest.mark.parametrize("configuration", engine_worker.CONFIGURATIONS,
                         ids=lambda c: f"zero{c[0]}-{'offload' if c[1] else 'on-device'}-accumulate{c[2]}")
def test_engine_trains_like_the_plain_loop(configuration, results):
    expected = results["reference"][configuration[2]]
    for name, value in results[configuration].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_accumulation_changes_the_training(results):
    """The comparison above could not tell accumulation from none: here the two references differ."""
    one, two = results["reference"][1], results["reference"][engine_worker.ACCUMULATION]
    assert not torch.allclose(one["W_enc"], two["W_enc"])


def test_offloaded_optimizer_state_resumes_exactly(results):
    assert results["resumed_at"] == engine_worker.OPTIMIZER_STEPS // 2
    expected = results[(1, True, engine_worker.ACCUMULATION)]
    for name, value in results["resumed"].items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
