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


def _read_state(state: Path) -> dict | None:
    try:
        return json.loads(state.read_text())
    except (OSError, ValueError):
        return None


def _write_state(state: Path, data: dict) -> None:
    """Atomically: a reader never sees half a file, whenever this process is stopped."""
    partial = state.with_suffix(".json.partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, state)


def _is_ray_start(pid: int) -> bool:
    """The pid is (still) a `ray start --block`, not a recycled pid of something else."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"start" in cmdline and b"--block" in cmdline


def _wait_answering(address: str, process: subprocess.Popen | None, pid: int, state: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not reachable(address, timeout=1.0):
        exited = process.poll() is not None if process is not None else not _is_ray_start(pid)
        if exited:
            state.unlink(missing_ok=True)
            raise RayUnavailable(f"the local Ray did not start; see {state.parent / 'ray-start.log'}")
        if time.monotonic() > deadline:
            stop_local_ray(state.parent.parent)
            raise RayUnavailable(f"the local Ray did not answer within {timeout:.0f} s (stopped it); see "
                                 f"{state.parent / 'ray-start.log'}")
        time.sleep(0.5)


def start_local_ray(home: Path, num_cpus: int, timeout: float = 180.0) -> str:
    """The job-submission address of this home's local Ray, started when none answers.

    All ports are picked free on loopback (other Ray clusters may share the machine); the temp dir is short
    (Ray's socket paths have a length limit) and private to this home. The state file ($home/ray/ray.json:
    address, pid, temp dir) is written the moment the process is spawned, before it answers, so that
    `stop_local_ray` finds it whenever the caller was stopped; a second caller finds a Ray that is still
    starting and waits for it instead of starting another.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster needs no token
    state = local_ray_state(home)
    known = _read_state(state)
    if known is not None:
        if reachable(known["address"]):
            return known["address"]
        if _is_ray_start(known["pid"]):  # spawned, not answering yet (or hung: stopped after the timeout)
            _wait_answering(known["address"], None, known["pid"], state, timeout)
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
    address = f"http://127.0.0.1:{dashboard}"
    with open(state.parent / "ray-start.log", "ab") as log:  # the child has its own copy of the descriptor
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    _write_state(state, {"address": address, "pid": process.pid, "temp_dir": str(temp_dir)})
    _wait_answering(address, process, process.pid, state, timeout)
    return address


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_local_ray(home: Path, timeout: float = 60.0) -> bool:
    """Stop the local Ray this home started: SIGTERM to its `ray start --block` (which stops the processes it
    started), then to what is left of its process group (it runs in a session of its own, so its group holds
    exactly Ray's processes: a `ray start` stopped before it could clean up leaves none behind), SIGKILL after
    the timeout."""
    state = local_ray_state(home)
    known = _read_state(state)
    if known is None:
        state.unlink(missing_ok=True)
        return False
    pid = int(known["pid"])
    if not _is_ray_start(pid) and not _group_alive(pid):  # gone (its pid may now be someone else's)
        state.unlink(missing_ok=True)
        return False
    if _is_ray_start(pid):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    signalled_group = False
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # our own child: reap it
        except ChildProcessError:
            pass
        if not _is_ray_start(pid):
            if not _group_alive(pid):
                break
            if not signalled_group:
                os.killpg(pid, signal.SIGTERM)
                signalled_group = True
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    state.unlink(missing_ok=True)
    return True


def cluster_capacity(address: str, timeout: float = 10.0) -> dict[str, float] | None:
    """What the Ray cluster offers, from its dashboard: {"cpus", "gpus", "node_memory" (bytes, the largest
    node), "memory" (bytes, all nodes)}; None when it cannot be read."""
    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/nodes?view=summary", timeout=timeout) as response:
            data = json.loads(response.read())
    except Exception:  # noqa: BLE001 - the capacity check is skipped then, and says so
        return None
    cpus = gpus = memory = node_memory = 0.0
    for node in data.get("data", {}).get("summary", []):
        if node.get("raylet", {}).get("state") != "ALIVE":
            continue
        total = node.get("raylet", {}).get("resourcesTotal", {})
        cpus += float(total.get("CPU", 0))
        gpus += float(total.get("GPU", 0))
        mem = float((node.get("mem") or [0])[0])
        memory += mem
        node_memory = max(node_memory, mem)
    if not cpus:
        return None
    return {"cpus": cpus, "gpus": gpus, "node_memory": node_memory, "memory": memory}
