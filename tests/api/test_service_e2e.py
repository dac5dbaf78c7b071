"""The service end to end: real `saeforge serve` processes on loopback, a real local Ray (job submission) and
MLflow on SQLite. Fuzzing from the OpenAPI document, auth, keep-alive, durability across a killed API, compare.
The load test (20 jobs at once) is in test_service_load.py, in a pytest process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.compare import FRONT_COLOR, POINT_COLOR

from .conftest import ALICE, BOB, LOAD, TINY_MODEL, ApiServer, count_markers, wait_for

pytestmark = pytest.mark.slow

SWEEP = {
    "name": "sweep", "model": TINY_MODEL, "hook": {"layer": 1, "site": "resid_post"}, "data": {"context_length": 64},
    "dictionaries": [{"name": f"topk-k{k}", "latents": 128, "k": k, "initialization": "random"} for k in (4, 8, 16)],
    "training": {"tokens": 4096, "batch_tokens": 512, "warmup_steps": 0, "log_every_steps": 2, "eval_tokens": 1024},
    "tracking": {"experiment": "sweep-e2e"},
}


# --- schema-driven fuzzing ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, ray_address):
    """A server on the shared Ray whose Ray jobs are a no-op command (fuzzed specs are accepted and run, but
    cost nothing), with model and data roots configured."""
    home = tmp_path_factory.mktemp("fuzz-home")
    for name in ("models", "data"):
        (home / name).mkdir()
    (home / "data" / "corpus.txt").write_text("text\n")
    server = ApiServer(home, {"SAEFORGE_RAY_ADDRESS": ray_address, "SAEFORGE_MAX_RUNNING_JOBS": "1",
                              "SAEFORGE_JOB_COMMAND": f"{sys.executable} -c pass",
                              "SAEFORGE_MODEL_ROOTS": str(home / "models"), "SAEFORGE_DATA_ROOTS": str(home / "data")})
    server.start()
    yield server
    server.stop()


REQUESTS: list[int] = []
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_fuzz_the_running_api_from_its_openapi_document(fuzz_server):
    """Every operation of the served OpenAPI document, with valid (positive) and invalid (negative) inputs."""
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures = []
    for result in api.get_all_operations():
        operation = result.ok()
        strategies = []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                strategies.append(operation.as_strategy(generation_mode=mode))
            except Exception:  # noqa: BLE001 - nothing to negate (no parameters)
                pass

        @given(case=st.one_of(strategies))
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None, phases=[Phase.generate])
        def fuzz(case):
            response = case.call_and_validate(headers=ALICE, timeout=60, checks=CHECKS)
            REQUESTS.append(response.status_code)

        try:
            fuzz()
        except Exception as error:  # noqa: BLE001 - report every operation's failure, not just the first
            failures.append(f"{operation.method.upper()} {operation.path}: {error}")
    assert not failures, "\n\n".join(failures)


def test_fuzzing_made_several_hundred_requests(fuzz_server):
    print(f"fuzzing: {len(REQUESTS)} requests, status codes {sorted(set(REQUESTS))}")
    assert len(REQUESTS) >= 300, len(REQUESTS)
    assert not [code for code in REQUESTS if code >= 500]
    assert {201, 401, 404, 422} <= set(REQUESTS) or {201, 404, 422} <= set(REQUESTS), sorted(set(REQUESTS))


def test_auth_on_the_running_server(fuzz_server):
    paths = httpx.get(f"{fuzz_server.url}/openapi.json").json()["paths"]
    with httpx.Client(base_url=fuzz_server.url) as anonymous:
        for path, methods in paths.items():
            for method in methods:
                response = anonymous.request(method.upper(), path.replace("{job_id}", "x"),
                                             params={"experiment": "x"})
                expected = 200 if path in ("/healthz", "/readyz") else 401
                assert response.status_code == expected, (method, path, response.text)
    with fuzz_server.client(ALICE) as alice, fuzz_server.client(BOB) as bob:
        job = alice.post("/v1/jobs", json=LOAD)
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/logs")):
            assert bob.request(method, f"/v1/jobs/{job_id}{path}").status_code == 403
        assert job_id not in [j["id"] for j in bob.get("/v1/jobs", params={"limit": 500}).json()["items"]]
        assert alice.get(f"/v1/jobs/{job_id}").status_code == 200


def test_the_server_keeps_idle_connections_longer_than_clients_reuse_them(fuzz_server):
    """httpx reuses an idle connection for up to 5 s. Had the server closed it at 5 s too (uvicorn's default),
    a request sent as the server's timer fired was reset ("Connection reset by peer": the load test's failure).
    The second request must reach the server on the same, still-open connection."""
    with httpx.Client(base_url=fuzz_server.url, limits=httpx.Limits(keepalive_expiry=60)) as client:
        first = client.get("/healthz")
        port = first.extensions["network_stream"].get_extra_info("client_addr")[1]
        time.sleep(6)  # longer than the 5 s both httpx and uvicorn use by default
        second = client.get("/healthz")
        ports = [port, second.extensions["network_stream"].get_extra_info("client_addr")[1]]
    assert second.status_code == 200
    assert ports[0] == ports[1], "the server closed a connection idle for 6 s; a client reusing one can be reset"


def test_cancel_stops_the_ray_job(tmp_path, ray_address):
    """A running job (here a Ray job that would sleep for minutes) is stopped on Ray and ends cancelled."""
    server = ApiServer(tmp_path / "home", {"SAEFORGE_RAY_ADDRESS": ray_address,
                                           "SAEFORGE_JOB_COMMAND": "sleep 300 #"}).start()
    try:
        with server.client() as client:
            job_id = client.post("/v1/jobs", json=LOAD).json()["id"]
            from ray.job_submission import JobSubmissionClient

            ray = JobSubmissionClient(ray_address)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if str(ray.get_job_status(job_id).value) == "RUNNING":
                        break
                except RuntimeError:  # not submitted yet
                    pass
                time.sleep(0.5)
            cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            job = wait_for(client, job_id, ("cancelled", "failed", "succeeded"), timeout=60)
            assert job["state"] == "cancelled" and "checkpoints" in job["message"]
            assert str(ray.get_job_status(job_id).value) == "STOPPED"
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    finally:
        server.stop()


# --- durability and comparison ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_job(ray_home):
    """A three-dictionary sweep on the tiny model; the API is SIGKILLed while the job runs and started again.

    The servers run in embedded mode (no SAEFORGE_RAY_ADDRESS) in the home whose local Ray is already up, as
    a restarted `serve` would: they find that Ray through $SAEFORGE_HOME/ray/ray.json."""
    started = time.monotonic()
    server = ApiServer(ray_home, {}).start()
    with server.client() as client:
        created = client.post("/v1/jobs", json=SWEEP)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 600
        seen = created.json()
        while time.monotonic() < deadline:  # wait until it trains on Ray and reports to MLflow
            seen = client.get(f"/v1/jobs/{job_id}").json()
            if seen["state"] != "queued" and (seen["mlflow"] or seen["state"] != "running"):
                break
            time.sleep(1)
    server.kill()
    killed_while = seen["state"]
    server.start()  # a new process, the same database, the same Ray
    with server.client() as client:
        job = wait_for(client, job_id, ("succeeded", "failed", "cancelled"), timeout=900)
        logs = client.get(f"/v1/jobs/{job_id}/logs").json()["logs"]
    yield {"server": server, "job": job, "killed_while": killed_while, "logs": logs,
           "seconds": time.monotonic() - started}
    server.stop()


def test_a_job_survives_a_killed_api(sweep_job):
    job = sweep_job["job"]
    assert sweep_job["killed_while"] == "running"
    assert job["state"] == "succeeded", (job["message"], sweep_job["logs"][-3000:])
    assert job["attempts"] == 1  # Ray kept running it; it was not started again
    assert job["progress"]["tokens_done"] == job["progress"]["tokens_total"] == 4096
    assert job["mlflow"]["run_status"] == "FINISHED"
    dictionaries = {d["name"]: d for d in job["dictionaries"]}
    assert sorted(dictionaries) == ["topk-k16", "topk-k4", "topk-k8"]
    for name, d in dictionaries.items():
        k = int(name.removeprefix("topk-k"))
        assert d["run_status"] == "FINISHED" and d["tags"]["k"] == str(k) and d["tags"]["architecture"] == "topk"
        assert 0.9 * k <= d["metrics"]["final_held_out_l0"] <= k  # top-k keeps at most k (ReLU may zero some)
        assert 0 < d["metrics"]["final_held_out_fvu"] < 1
        assert d["metrics"]["tokens"] == 4096
        assert (Path(d["output_uri"]) / "cfg.json").is_file() and Path(d["output_uri"]).is_relative_to(
            Path(job["output_uri"]))
    assert "finished" in sweep_job["logs"]


def test_compare_a_sweep_of_three_dictionaries(sweep_job, tmp_path):
    server = sweep_job["server"]
    with server.client() as client:
        result = client.get("/v1/compare", params={"experiment": "sweep-e2e"}).json()
        png = client.get(result["plot_path"]).content
    assert len(result["rows"]) == 3 and result["points"] == 3
    assert sorted(r["k"] for r in result["rows"]) == [4, 8, 16]
    assert all(r["status"] == "FINISHED" and r["architecture"] == "topk" for r in result["rows"])
    assert count_markers(png, (FRONT_COLOR, POINT_COLOR)) == 3
    assert any(r["on_frontier"] for r in result["rows"])
    from mlflow import MlflowClient

    mlflow = MlflowClient(f"sqlite:///{server.home / 'mlflow.db'}")
    assert [a.path for a in mlflow.list_artifacts(result["plot_run_id"], "compare")] == [result["plot_artifact"]]
    # the same through the CLI
    env = {**os.environ, "SAEFORGE_API_URL": server.url, "SAEFORGE_API_TOKEN": "token-alice"}
    plot = tmp_path / "plot.png"
    shown = subprocess.run([sys.executable, "-m", "api.cli", "compare", "--experiment", "sweep-e2e", "--plot",
                            str(plot)], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert sum(f"topk-k{k}" in shown.stdout for k in (4, 8, 16)) == 3 and count_markers(plot.read_bytes(), (
        FRONT_COLOR, POINT_COLOR)) == 3
    status = subprocess.run([sys.executable, "-m", "api.cli", "status", sweep_job["job"]["id"]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "succeeded" in status.stdout and "4,096 / 4,096" in status.stdout
