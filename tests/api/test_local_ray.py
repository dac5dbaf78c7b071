"""The service's own processes are always accounted for (issue 17): `serve`'s embedded local Ray is recorded
the moment it is spawned, so `serve --stop-local-ray` finds and stops it whenever `serve` was stopped, even
while that Ray was still starting; `serve` shuts down cleanly on SIGTERM, and nothing of Ray is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from api.rayjobs import reachable

from .conftest import LOAD, ApiServer, wait_for

pytestmark = pytest.mark.slow
# uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so that the parent sees what ended it
CLEAN = (0, -signal.SIGTERM)


def group_members(pgid: int) -> list[int]:
    """Processes whose process group is pgid (the local Ray runs in a session of its own)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def stop_local_ray(home: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--stop-local-ray"], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "SAEFORGE_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_sigterm_while_the_local_ray_is_starting_leaves_nothing_behind(tmp_path):
    home = tmp_path / "home"
    server = ApiServer(home, {"SAEFORGE_LOCAL_RAY_CPUS": "2"})
    server.home.mkdir(parents=True)
    with open(server.log, "ab") as log:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(server.port)],
            env=server.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    state = home / "ray" / "ray.json"
    deadline = time.monotonic() + 180
    while not state.is_file():  # written when `ray start` is spawned, before that Ray answers
        assert time.monotonic() < deadline and server.process.poll() is None, server.log.read_text()[-3000:]
        time.sleep(0.05)
    known = json.loads(state.read_text())
    pid = known["pid"]
    assert not reachable(known["address"], timeout=0.5)  # still starting: recorded before it answers
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) in CLEAN, server.log.read_text()[-3000:]
    assert "Application shutdown complete" in server.log.read_text()  # the lifespan's shutdown ran to its end
    assert "Traceback" not in server.log.read_text()
    assert state.is_file()  # the Ray it spawned is still accounted for
    assert "stopped the local Ray" in stop_local_ray(home)
    assert not state.exists() and group_members(pid) == []
    assert "no local Ray" in stop_local_ray(home)  # and a second stop finds nothing to do


def test_sigterm_of_a_serving_api_keeps_jobs_and_ray_and_stop_finds_it(tmp_path):
    home = tmp_path / "home"
    env = {"SAEFORGE_LOCAL_RAY_CPUS": "3", "SAEFORGE_JOB_COMMAND": f"{sys.executable} -c pass"}
    server = ApiServer(home, env).start()
    with server.client() as client:
        job = client.post("/v1/jobs", json=LOAD).json()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) in CLEAN, server.log.read_text()[-3000:]
    assert "Traceback" not in server.log.read_text()
    state = json.loads((home / "ray" / "ray.json").read_text())
    again = ApiServer(home, env, port=server.port).start()  # finds the same Ray; the job is still there
    try:
        assert json.loads((home / "ray" / "ray.json").read_text()) == state
        with again.client() as client:
            assert wait_for(client, job["id"], ("succeeded",), timeout=300)["attempts"] == 1
    finally:
        again.stop()
    assert again.process.returncode in CLEAN
    assert "stopped the local Ray" in stop_local_ray(home)
    assert group_members(state["pid"]) == []
