"""Two API replicas on one PostgreSQL and one Ray (issue 17): a burst of submissions to both, one replica
SIGKILLed mid-burst. Every accepted job runs exactly once (one Ray job, one MLflow parent run), none is lost,
and the running-jobs limit holds across the replicas: in the job store and by Ray's own start and end times.
The job store and MLflow's backend are both on the PostgreSQL server, as in the chart's PostgreSQL mode.

Each job is a whole tiny Ray job (~85 CPU-seconds on a 2-core machine): the test keeps to a handful.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import httpx
import pytest

from .conftest import ALICE, LOAD, ApiServer
from .test_service_load import max_overlap

pytestmark = pytest.mark.slow

SUBMISSIONS = 8  # alternating between the replicas; replica B is killed after it accepted two
MAX_RUNNING = 2
DEADLINE_S = 2400
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.mark.timeout(DEADLINE_S + 600)
def test_two_replicas_one_killed_mid_burst(tmp_path, ray_address, postgres):
    postgres.create_database("jobs")
    postgres.create_database("mlflow")
    env = {"SAEFORGE_RAY_ADDRESS": ray_address, "SAEFORGE_DATABASE_URL": postgres.url("jobs"),
           "MLFLOW_TRACKING_URI": postgres.url("mlflow"), "SAEFORGE_MAX_RUNNING_JOBS": str(MAX_RUNNING),
           "SAEFORGE_OUTPUT_ROOT": str(tmp_path / "out"), "SAEFORGE_JOB_COMMAND": f"{sys.executable} -m api.cli"}
    a = ApiServer(tmp_path / "a", env).start()  # one at a time: the first creates MLflow's and the store's schema
    b = ApiServer(tmp_path / "b", env).start()
    try:
        started = time.monotonic()
        accepted: list[str] = []
        by_b = 0
        refused = Counter()
        for i in range(SUBMISSIONS):
            server = a if i % 2 == 0 else b
            try:
                with httpx.Client(base_url=server.url, headers=ALICE, timeout=60) as client:
                    response = client.post("/v1/jobs", json={**LOAD, "name": f"replica-{i}"})
            except httpx.TransportError:
                refused["replica gone"] += 1
                continue
            assert response.status_code == 201, response.text[:2000]
            accepted.append(response.json()["id"])
            if server is b:
                by_b += 1
                if by_b == 2:
                    b.kill()  # SIGKILL: whatever it had claimed or was submitting is left as it was
            time.sleep(0.5)
        assert refused["replica gone"] == SUBMISSIONS // 2 - 2 and len(accepted) == SUBMISSIONS - refused.total()

        peak, states = 0, Counter()
        with a.client() as client:
            while time.monotonic() < started + DEADLINE_S:
                jobs = client.get("/v1/jobs", params={"limit": 500}).json()["items"]
                stored = {j["id"] for j in jobs}
                assert set(accepted) <= stored, f"lost: {sorted(set(accepted) - stored)}"
                states = Counter(j["state"] for j in jobs)
                peak = max(peak, states["running"])
                assert peak <= MAX_RUNNING, f"{peak} jobs running at once in the job store (limit {MAX_RUNNING})"
                if sum(states[s] for s in TERMINAL) == len(stored):
                    break
                time.sleep(2)
            seconds = time.monotonic() - started
            details = [client.get(f"/v1/jobs/{i}").json() for i in sorted(stored)]
        assert all(j["state"] == "succeeded" for j in details), [(j["id"], j["state"], j["message"]) for j in details]

        from mlflow import MlflowClient
        from ray.job_submission import JobSubmissionClient

        ray_jobs = {j.submission_id: j for j in JobSubmissionClient(ray_address).list_jobs()}
        assert stored <= set(ray_jobs), f"not known to Ray: {sorted(stored - set(ray_jobs))}"
        assert all(str(ray_jobs[i].status.value) == "SUCCEEDED" for i in stored)
        intervals = [(ray_jobs[i].start_time, ray_jobs[i].end_time) for i in sorted(stored)]
        ray_peak = max_overlap(intervals)
        assert ray_peak <= MAX_RUNNING, f"Ray ran {ray_peak} at once: {intervals}"
        mlflow = MlflowClient(tracking_uri=postgres.url("mlflow"))
        experiment = mlflow.get_experiment_by_name(LOAD["tracking"]["experiment"])
        for job_id in stored:  # exactly once: one parent run per job, however often a replica looked at it
            runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`saeforge.job_id` = '{job_id}'")
            assert len(runs) == 1, (job_id, [r.info.run_id for r in runs])
        attempts = Counter(j["attempts"] for j in details)
        print(f"two replicas, one SIGKILLed mid-burst: {SUBMISSIONS} submissions, {len(accepted)} accepted, "
              f"{len(stored)} stored, {len(stored)} ran once each (attempts {dict(attempts)}), at most {peak} "
              f"running in the store and {ray_peak} on Ray (limit {MAX_RUNNING}), {seconds:.0f} s")
    finally:
        a.stop()
        b.kill()
