"""Fixtures of the service tests: a local Ray shared by the slow tests, and real API servers (uvicorn in a
subprocess on loopback) that a test can kill and start again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from api.rayjobs import start_local_ray, stop_local_ray

TOKENS = {"token-alice": "alice", "token-bob": "bob"}
ALICE = {"Authorization": "Bearer token-alice"}
BOB = {"Authorization": "Bearer token-bob"}

TINY_MODEL = {"random": {"family": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                         "intermediate_size": 64, "seed": 0}}
# The smallest real job: one layer, one dictionary, two steps, no splice evaluation (its actor would load the
# model a second time); the held-out batch stays, for the final L0 the tests check.
LOAD = {
    "name": "load", "model": {"random": {**TINY_MODEL["random"], "num_layers": 1}}, "hook": {"layer": 0},
    "data": {"context_length": 64}, "dictionaries": [{"name": "d", "latents": 64, "k": 4, "initialization": "random"}],
    "training": {"tokens": 512, "batch_tokens": 256, "warmup_steps": 0, "log_every_steps": 1, "eval_tokens": 256,
                 "splice_eval_tokens": 0},
    "tracking": {"experiment": "load"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """`saeforge serve` in a subprocess; kill() is SIGKILL (no clean shutdown), start() again on the same port."""

    def __init__(self, home: Path, env: dict[str, str], port: int | None = None):
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SAEFORGE_HOME": str(home), "SAEFORGE_TOKENS": ",".join(
            f"{t}:{o}" for t, o in TOKENS.items()), "SAEFORGE_POLL_SECONDS": "1", "RAY_AUTH_MODE": "disabled", **env}
        if "MLFLOW_TRACKING_URI" not in env:  # the service's own SQLite file under its home
            self.env.pop("MLFLOW_TRACKING_URI", None)
        self.process: subprocess.Popen | None = None
        self.log = home / f"serve-{self.port}.log"

    def start(self, timeout: float = 240.0) -> ApiServer:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "warning"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited: {self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the server was not ready in {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers or ALICE, timeout=60)


@pytest.fixture(scope="session")
def ray_home(tmp_path_factory):
    """A local Ray started the way `serve` starts it; servers with SAEFORGE_HOME = this home find it again
    through $home/ray/ray.json, as a restarted `serve` does."""
    home = tmp_path_factory.mktemp("service-home")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start_local_ray(home, num_cpus=6)  # two default jobs at once (3 logical CPUs each)
    yield home
    stop_local_ray(home)


@pytest.fixture(scope="session")
def ray_address(ray_home) -> str:
    import json

    return json.loads((ray_home / "ray" / "ray.json").read_text())["address"]


def wait_for(client: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f} s: {job}")


def count_markers(png: bytes, colors: tuple[str, ...], tolerance: float = 0.06) -> int:
    """Connected blobs of pixels in any of the colours: the markers of a Pareto plot."""
    import io

    import matplotlib.image
    from scipy import ndimage

    image = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    mask = np.zeros(image.shape[:2], dtype=bool)
    for color in colors:
        rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        mask |= np.abs(image - rgb).max(-1) < tolerance
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= 20).sum())  # markers, not stray anti-aliased pixels

