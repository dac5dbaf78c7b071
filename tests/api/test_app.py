"""The API in-process (fast): auth, validation and domain errors, path policy, listing, cancel of queued jobs,
the OpenAPI document; and the comparison (table and Pareto plot) on a real MLflow SQLite backend.

Ray is configured at an address nothing answers, so submitted jobs stay queued.
"""

import json
import time

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from api.app import create_app
from api.settings import Settings
from services.compare import FRONT_COLOR, POINT_COLOR, compare, format_table, pareto_front

from .conftest import ALICE, BOB, TOKENS, count_markers


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("roots")
    for name in ("models", "data", "elsewhere"):
        (base / name).mkdir()
    (base / "data" / "corpus.txt").write_text("some text\n" * 10)
    (base / "elsewhere" / "secret.txt").write_text("no")
    (base / "data" / "link.txt").symlink_to(base / "elsewhere" / "secret.txt")
    return base


@pytest.fixture(scope="module")
def client(tmp_path_factory, roots):
    home = tmp_path_factory.mktemp("app-home")
    settings = Settings.from_env({
        "SAEFORGE_HOME": str(home), "SAEFORGE_RAY_ADDRESS": "http://127.0.0.1:1", "SAEFORGE_POLL_SECONDS": "30",
        "SAEFORGE_TOKENS": ",".join(f"{t}:{o}" for t, o in TOKENS.items()),
        "SAEFORGE_MODEL_ROOTS": str(roots / "models"), "SAEFORGE_DATA_ROOTS": str(roots / "data"),
    })
    with TestClient(create_app(settings)) as test_client:
        service = test_client.app.state.service
        deadline = time.monotonic() + 120
        while service.scheduler is None and service.startup_error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        service.scheduler.stop()  # jobs stay queued: these tests look at the API, not at scheduling
        yield test_client


TINY = {"name": "tiny", "model": {"random": {"hidden_size": 16, "num_layers": 2, "num_heads": 2,
                                             "intermediate_size": 32}},
        "hook": {"layer": 1}, "dictionaries": [{"latents": 64, "k": 4}], "training": {"tokens": 2048,
                                                                                     "batch_tokens": 1024}}


def _routes(app):
    for path, methods in app.openapi()["paths"].items():
        for method in methods:
            yield method.upper(), path.replace("{job_id}", "some-job")  # {name}, {index} stay: 401 before a 422


def test_every_v1_route_needs_a_token_and_health_does_not(client):
    routes = list(_routes(client.app))
    assert len(routes) == 13  # 12 paths, /v1/jobs with GET and POST (4 of them the analysis, api/pages.py)
    for method, path in routes:
        if path in ("/healthz", "/readyz"):
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dG9rZW4tYWxpY2U="}):
            response = client.request(method, path, headers=headers, params={"experiment": "x"})
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "token-alice" not in response.text
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["store"] is True


def test_submit_list_get_and_another_owners_job(client):
    created = client.post("/v1/jobs", json=TINY, headers=ALICE)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["state"] == "queued" and job["owner"] == "alice" and job["id"].startswith("tiny-")
    assert job["progress"]["tokens_total"] == 2048 and job["progress"]["tokens_done"] == 0
    assert job["output_uri"].endswith(job["id"])
    assert client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["spec"]["model"]["random"]["hidden_size"] == 16
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/logs")):
        response = client.request(method, f"/v1/jobs/{job['id']}{path}", headers=BOB)
        assert response.status_code == 403, response.text
    assert client.get("/v1/jobs/no-such-job", headers=ALICE).status_code == 404
    listing = client.get("/v1/jobs", headers=ALICE, params={"state": ["queued"]}).json()
    assert job["id"] in [j["id"] for j in listing["items"]]
    assert client.get("/v1/jobs", headers=BOB).json()["total"] == 0
    assert client.get("/v1/jobs", headers=ALICE, params={"limit": 0}).status_code == 422
    assert client.get("/v1/jobs", headers=ALICE, params={"state": "done"}).status_code == 422
    logs = client.get(f"/v1/jobs/{job['id']}/logs", headers=ALICE).json()
    assert logs == {"id": job["id"], "state": "queued", "logs": ""}


def test_cancel_a_queued_job_then_conflict(client):
    job = client.post("/v1/jobs", json=TINY, headers=ALICE).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


@pytest.mark.parametrize("body, status, words", [
    ({"training": {"tokens": 0}}, 422, "training.tokens: Input should be greater than 0"),
    ({"bogus": 1}, 422, "bogus: unknown field"),
    ({"dictionaries": [{"latents": 8, "k": 8}]}, 422, "k (8) must be smaller than latents (8)"),
    ([1, 2], 422, "must be a JSON object"),
    ({**TINY, "hook": {"layer": 5}}, 400, "hook.layer (5) is beyond the model, which has 2 layers"),
    ({**TINY, "dictionaries": [{"latents": 63, "k": 4}], "cluster": {"trainer_ranks": 2, "latent_shards": 2}}, 422,
     "divisible by cluster.latent_shards"),
    ({**TINY, "cluster": {"ray_address": "ray://elsewhere:10001"}}, 400, "cluster.ray_address"),
    ({"model": {"name": "MODELS/missing-model"}}, 404, "does not exist"),
    ({"data": {"source": "DATA/missing.txt"}}, 404, "does not exist"),
    ({"model": {"name": "ELSEWHERE/secret.txt"}}, 403, "outside the allowed folders"),
    ({"data": {"source": "DATA/../elsewhere/secret.txt"}}, 403, "'..' is not allowed"),
    ({"data": {"source": "DATA/link.txt"}}, 403, "outside the allowed folders"),
    ({"data": {"source": "DATA/*.txt"}}, 403, "links outside"),
    ({**TINY, "model": {**TINY["model"], "trust_remote_code": True}}, 403, "trust_remote_code"),
    ({**TINY, "output": {"uri": "/tmp/not-under-the-root"}}, 403, "output.uri"),
])
def test_submit_errors_say_what_and_where(client, roots, body, status, words):
    text = json.dumps(body).replace("MODELS", str(roots / "models")).replace("DATA", str(roots / "data")) \
        .replace("ELSEWHERE", str(roots / "elsewhere"))
    before = client.get("/v1/jobs", headers=ALICE).json()["total"]
    response = client.post("/v1/jobs", content=text, headers={**ALICE, "content-type": "application/json"})
    assert response.status_code == status, response.text
    payload = response.json()
    message = payload.get("message") if status == 422 else payload["detail"]
    assert words in message, message
    if status == 422 and isinstance(body, dict):
        assert all(item["loc"][0] == "body" for item in payload["detail"])
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == before  # nothing half-created


def test_data_inside_the_roots_is_accepted(client, roots):
    body = {**TINY, "data": {"source": str(roots / "data" / "corpus.txt")}}
    assert client.post("/v1/jobs", json=body, headers=ALICE).status_code == 201


def test_openapi_publishes_the_jobspec_and_bearer_auth(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    assert "DictionarySpec" in schema["components"]["schemas"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# --- comparison ---------------------------------------------------------------------------------------------
def test_pareto_front():
    points = [(4, 0.5), (8, 0.3), (16, 0.35), (32, 0.1), (8, 0.6)]
    assert pareto_front(points) == [0, 1, 3]


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory):
    """An experiment shaped as the runner writes it: a parent run per job, a child per dictionary."""
    home = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep", artifact_location=(home / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="job-1", tags={"saeforge.job_id": "job-1"}).info.run_id
    for k, fvu, dead in ((4, 0.5, 0.1), (8, 0.3, 0.0), (16, 0.35, 0.02)):
        child = client.create_run(experiment, run_name=f"topk-k{k}", tags={
            "mlflow.parentRunId": parent, "architecture": "topk", "latents": "256", "k": str(k), "model": "m",
            "site": "resid_post", "layer": "1"}).info.run_id
        for key, value in {"final_held_out_l0": float(k), "final_held_out_fvu": fvu, "final_dead_fraction": dead,
                           "final_tokens": 2048, "final_train_seconds": 2.0, "fvu": fvu + 0.1,
                           "final_never_fired_fraction": dead / 2,
                           "final_dead_window_tokens": 512 if k > 4 else 4096}.items():
            client.log_metric(child, key, value)
        client.set_terminated(child)
    client.set_terminated(parent)
    other = client.create_run(experiment, run_name="job-2", tags={"saeforge.job_id": "job-2"}).info.run_id
    client.create_run(experiment, run_name="relu", tags={"mlflow.parentRunId": other, "architecture": "relu"})
    return uri


def test_compare_gives_a_row_per_dictionary_and_a_plot_with_a_point_each(sweep_runs, tmp_path):
    result = compare(sweep_runs, "sweep", job_id="job-1", plot_path=tmp_path / "plot.png")
    rows = result["rows"]
    assert [r["k"] for r in rows] == [4, 8, 16] and result["points"] == 3
    assert rows[1]["fvu"] == 0.3 and rows[0]["dead_pct"] == pytest.approx(10.0) and rows[0]["tokens_per_s"] == 1024
    assert rows[0]["never_fired_pct"] == pytest.approx(5.0) and rows[1]["dead_window_tokens"] == 512
    # k=4's window (4,096 tokens) is longer than its 2,048 tokens: its dead figure cannot mean anything
    assert [r["dead_window_complete"] for r in rows] == [False, True, True]
    assert [r["on_frontier"] for r in rows] == [True, True, False]
    assert count_markers(result["plot_png"], (FRONT_COLOR,)) == 2
    assert count_markers(result["plot_png"], (POINT_COLOR,)) == 1
    client = MlflowClient(sweep_runs)
    logged = [a.path for a in client.list_artifacts(result["plot_run_id"], "compare/job-1")]
    assert logged == ["compare/job-1/plot.png"]
    table = format_table(rows)
    assert len(table.splitlines()) == 4 and "topk-k8" in table
    everything = compare(sweep_runs, "sweep", log_to_mlflow=False)
    assert len(everything["rows"]) == 4 and everything["points"] == 3  # the relu run has no metrics yet
    assert compare(sweep_runs, "sweep")["plot_run_id"] == result["plot_run_id"]  # one comparison run


def test_compare_route(client):
    assert client.get("/v1/compare", params={"experiment": "no-such"}, headers=ALICE).status_code == 404
    assert client.get("/v1/compare", params={"experiment": ""}, headers=ALICE).status_code == 422
