"""Ray as the service sees it: the job-submission API of a cluster, and the embedded local Ray of `serve`.

The embedded Ray runs as `ray start --head --block` in its own session, so it outlives the API process:
a killed API finds it again (its address is in $SAEFORGE_HOME/ray/ray.json) and the jobs go on. Ray is
imported inside the functions that use it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path

RAY_STATES = {"PENDING": "running", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
              "STOPPED": "cancelled"}


@dataclass
class RayJobInfo:
    status: str  # Ray's: PENDING RUNNING STOPPED SUCCEEDED FAILED
    message: str | None

    @property
    def state(self) -> str:
        return RAY_STATES.get(self.status, "running")

    @property
    def terminal(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED")


class RayUnavailable(RuntimeError):
    """The job-submission server did not answer."""


def reachable(address: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=timeout) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001 - any failure means not reachable
        return False


class RayJobs:
    """A thin, retrying wrapper over ray.job_submission.JobSubmissionClient keyed by our job ids."""

    def __init__(self, address: str):
        self.address = address
        self._client = None

    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as error:  # noqa: BLE001 - connection errors come in many types
                raise RayUnavailable(f"Ray job server at {self.address} did not answer: {error}") from None
        return self._client

    def ping(self) -> bool:
        return reachable(self.address)

    def submit(self, job_id: str, entrypoint: str, env: dict[str, str]) -> None:
        """Submit with submission_id = job_id; a job Ray already has under that id counts as submitted."""
        try:
            self.client().submit_job(entrypoint=entrypoint, submission_id=job_id,
                                     runtime_env={"env_vars": env}, metadata={"saeforge.job_id": job_id})
        except RuntimeError as error:
            if "already exists" in str(error):
                return
            self._client = None
            raise RayUnavailable(str(error)) from None
        except Exception as error:  # noqa: BLE001
            self._client = None
            raise RayUnavailable(str(error)) from None

    def info(self, job_id: str) -> RayJobInfo | None:
        """Ray's view of the job; None when Ray has never heard of it (e.g. a fresh cluster)."""
        try:
            details = self.client().get_job_info(job_id)
        except RuntimeError as error:
            if "404" in str(error) or "does not exist" in str(error):
                return None
            self._client = None
            raise RayUnavailable(str(error)) from None
        except Exception as error:  # noqa: BLE001
            self._client = None
            raise RayUnavailable(str(error)) from None
        return RayJobInfo(str(getattr(details.status, "value", details.status)), details.message)

    def stop(self, job_id: str) -> bool:
        try:
            return bool(self.client().stop_job(job_id))
        except RuntimeError as error:
            if "404" in str(error) or "does not exist" in str(error):
                return False
            raise RayUnavailable(str(error)) from None

    def logs(self, job_id: str) -> str | None:
        try:
            return self.client().get_job_logs(job_id)
        except RuntimeError as error:
            if "404" in str(error) or "does not exist" in str(error):
                return None
            raise RayUnavailable(str(error)) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def local_ray_state(home: Path) -> Path:
    return home / "ray" / "ray.json"


def start_local_ray(home: Path, num_cpus: int, timeout: float = 180.0) -> str:
    """The job-submission address of this home's local Ray, started when none answers.

    All ports are picked free on loopback (other Ray clusters may share the machine); the temp dir is short
    (Ray's socket paths have a length limit) and private to this home.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster needs no token
    state = local_ray_state(home)
    if state.is_file():
        known = json.loads(state.read_text())
        if reachable(known["address"]):
            return known["address"]
    state.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path("/tmp") / f"saeforge-ray-{sha1(str(home).encode()).hexdigest()[:10]}"
    dashboard = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": _free_port(),
             "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
             "--node-manager-port": _free_port(), "--object-manager-port": _free_port(),
             "--metrics-export-port": _free_port(), "--runtime-env-agent-port": _free_port()}
    # Two per-job costs a single local node does not need (measured on 2 cores: 7% of a tiny job's CPU): the log
    # monitor tails every worker's log to stream it to drivers, but service jobs run quiet (log_to_driver off;
    # job logs are read from their files); Ray Train's preemption watcher, one actor per job, polls for node
    # drains, which only an autoscaler or KubeRay does.
    command = [_ray_executable(), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={num_cpus}",
               f"--object-store-memory={1 << 30}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               "--include-log-monitor=false", *(f"{flag}={port}" for flag, port in ports.items())]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    log = open(state.parent / "ray-start.log", "ab")  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + timeout
    while not reachable(address, timeout=1.0):
        if process.poll() is not None:
            raise RayUnavailable(f"the local Ray did not start (exit {process.returncode}); see "
                                 f"{state.parent / 'ray-start.log'}")
        if time.monotonic() > deadline:
            raise RayUnavailable(f"the local Ray did not answer within {timeout:.0f} s; see "
                                 f"{state.parent / 'ray-start.log'}")
        time.sleep(0.5)
    state.write_text(json.dumps({"address": address, "pid": process.pid, "temp_dir": str(temp_dir)}))
    return address


def stop_local_ray(home: Path, timeout: float = 60.0) -> bool:
    """Stop the local Ray this home started (SIGTERM to its `ray start --block`, which stops its processes)."""
    state = local_ray_state(home)
    if not state.is_file():
        return False
    pid = json.loads(state.read_text())["pid"]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    if b"start" not in cmdline or b"--block" not in cmdline:  # gone, or the pid now belongs to someone else
        state.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
                break
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
        time.sleep(0.2)
    state.unlink(missing_ok=True)
    return True
