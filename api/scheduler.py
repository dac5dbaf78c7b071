"""The scheduler: keeps at most SAEFORGE_MAX_RUNNING_JOBS jobs running on Ray, the rest queued, and keeps
the job store true to Ray (on start and then every few seconds).

Each job runs as a Ray job whose submission id is the job id, so every step can be repeated safely after a
crash: a job marked running that Ray has never heard of is submitted (again); a job Ray already has is
never submitted twice.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from urllib.parse import urlsplit

from api.progress import snapshot
from api.rayjobs import RayJobInfo, RayJobs, RayUnavailable
from api.settings import Settings
from api.store import Job, JobStore

log = logging.getLogger("saeforge.scheduler")
MAX_ATTEMPTS = 3
# A job claimed this recently that Ray does not know yet is being submitted (by this replica or another one
# on the same store), not lost: reconciliation leaves it alone that long.
SUBMIT_GRACE_S = 30.0
LOG_TAIL_LINES = 40


def entrypoint(command: str, job: Job) -> str:
    # A job submitted again (Ray lost it) continues from its checkpoints instead of starting over
    return (f"{command} run --quiet --resume-if-checkpointed --job-id {shlex.quote(job.id)} "
            f"--spec-json {shlex.quote(json.dumps(job.spec))}")


def failure_message(info: RayJobInfo, logs: str | None) -> str:
    lines = [line for line in (logs or "").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line or "rejected" in line]
    detail = errors[-1] if errors else (lines[-1] if lines else "")
    message = info.message or f"Ray job {info.status}"
    return f"{message}: {detail.strip()}" if detail else message


class Scheduler:
    def __init__(self, settings: Settings, store: JobStore, ray: RayJobs, mlflow_client):
        self.settings = settings
        self.store = store
        self.ray = ray
        self.mlflow = mlflow_client
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one tick at a time (the loop, and cancel from a request)
        self.reconciled = False  # the first reconciliation after start is done
        self.last_error: str | None = None
        self.submit_grace_s = SUBMIT_GRACE_S

    # --- the loop -------------------------------------------------------------------------------------
    def start(self) -> None:
        thread = threading.Thread(target=self._loop, name="saeforge-scheduler", daemon=True)
        thread.start()
        self._thread = thread  # only a started thread: stop() may come from another thread at any moment

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                self.last_error = None
            except RayUnavailable as error:
                self.last_error = f"Ray unavailable: {error}"
                log.warning("%s", self.last_error)
            except Exception as error:  # noqa: BLE001 - the loop must survive anything and retry
                self.last_error = f"{type(error).__name__}: {error}"
                log.exception("scheduler tick failed")
            self._wake.wait(self.settings.poll_seconds)
            self._wake.clear()

    def tick(self) -> None:
        with self._lock:
            self.reconcile()
            self.reconciled = True
            self.schedule()

    # --- reconciliation -------------------------------------------------------------------------------
    def reconcile(self) -> None:
        for job in self.store.in_state("running"):
            self.reconcile_job(job)

    def reconcile_job(self, job: Job) -> None:
        info = self.ray.info(job.id)
        if info is None and time.time() - job.updated_at < self.submit_grace_s and not job.cancel_requested:
            return
        if info is None:  # claimed but never submitted (a crash in between), or the cluster was replaced
            if job.cancel_requested:
                self._finish(job, "cancelled", "cancelled before it started on Ray")
            elif job.attempts >= MAX_ATTEMPTS:
                self._finish(job, "failed", f"lost: Ray no longer knows this job after {job.attempts} attempts")
            else:
                self.store.transition(job.id, ("running",), "running", attempts=job.attempts + 1,
                                      message="resubmitted: the Ray cluster did not know this job")
                self._submit(job)
            return
        if not info.terminal:
            if job.cancel_requested:
                self.ray.stop(job.id)
            return
        state = info.state
        if job.cancel_requested and state != "succeeded":
            state = "cancelled"
        message = None
        if state == "failed":
            message = failure_message(info, self._logs(job.id))
        elif state == "cancelled":
            message = "cancelled; checkpoints written so far are kept in the output folder"
        self._finish(job, state, message)

    def _logs(self, job_id: str) -> str | None:
        try:
            text = self.ray.logs(job_id)
        except RayUnavailable:
            return None
        return "\n".join((text or "").splitlines()[-LOG_TAIL_LINES:])

    def _finish(self, job: Job, state: str, message: str | None) -> None:
        result = None
        try:
            result = snapshot(self.mlflow, job.experiment, job.id, self.settings.mlflow_ui_url)
            if result is not None and state != "succeeded":
                self._close_runs(result, "KILLED" if state == "cancelled" else "FAILED")
        except Exception as error:  # noqa: BLE001 - MLflow down must not block the state change
            log.warning("job %s: could not read MLflow: %s", job.id, error)
        if self.store.transition(job.id, ("running",), state, message=message, result=result):
            log.info("job %s %s", job.id, state)

    def _close_runs(self, snap: dict, status: str) -> None:
        """Runs the killed driver left RUNNING are marked FAILED/KILLED, so MLflow tells the truth too."""
        runs = [(snap["run_id"], snap["run_status"])] + [(d["run_id"], d["run_status"]) for d in snap["dictionaries"]]
        for run_id, run_status in runs:
            if run_status == "RUNNING":
                self.mlflow.set_terminated(run_id, status=status)
        snap["run_status"] = status if snap["run_status"] == "RUNNING" else snap["run_status"]
        for d in snap["dictionaries"]:
            d["run_status"] = status if d["run_status"] == "RUNNING" else d["run_status"]

    # --- scheduling -----------------------------------------------------------------------------------
    def schedule(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_next(self.settings.max_running)
            if job is None:
                return
            try:
                self._submit(job)
            except RayUnavailable as error:
                # back to the queue, as if never claimed; the next tick tries again
                self.store.transition(job.id, ("running",), "queued", started_at=None, attempts=job.attempts - 1,
                                      message=f"waiting for Ray: {error}")
                raise

    def _submit(self, job: Job) -> None:
        # The path policy travels with the job: the runner checks every place again before it touches storage.
        env = {"SAEFORGE_HOME": str(self.settings.home), **self.settings.paths.env()}
        if "@" not in urlsplit(self.settings.mlflow_uri).netloc:
            # A URI with credentials is not copied into the Ray job (Ray shows a job's env in its dashboard):
            # the cluster's pods get MLFLOW_TRACKING_URI from their own configuration (the Helm chart sets it).
            env["MLFLOW_TRACKING_URI"] = self.settings.mlflow_uri
        self.ray.submit(job.id, entrypoint(self.settings.job_command, job), env)
        log.info("job %s submitted to Ray (attempt %d)", job.id, job.attempts)

    # --- requests -------------------------------------------------------------------------------------
    def cancel(self, job: Job, wait_s: float = 10.0) -> None:
        """Queued: cancelled at once. Running: Ray is asked to stop it; the state turns cancelled when Ray
        reports the job stopped (waits up to wait_s for that, then the loop finishes it)."""
        if job.state == "queued" and self.store.transition(job.id, ("queued",), "cancelled",
                                                           message="cancelled while queued"):
            return
        self.store.request_cancel(job.id)
        try:
            self.ray.stop(job.id)
        except RayUnavailable:
            return
        try:
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                info = self.ray.info(job.id)
                if info is None or info.terminal:
                    break
                time.sleep(0.5)
            current = self.store.get(job.id)
            if current is not None and current.state == "running":
                with self._lock:
                    self.reconcile_job(current)
        except RayUnavailable:
            pass  # the loop finishes it once Ray answers
        self.wake()
