"""The chart's PostgreSQL mode for real: the MLflow server exactly as the chart runs it (its command, args and
environment, with MLFLOW_BACKEND_STORE_URI from the Secret) on a real PostgreSQL server, and the API's job
store on the same server through the chart's SAEFORGE_DATABASE_URL. Only what a cluster gives (the Secret's
value, S3 for artifacts, the port) is replaced by local equivalents."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .test_chart import effective_env, helm, mlflow_deployment, render  # noqa: F401 - helm: the fixture

pytestmark = pytest.mark.slow


def test_mlflow_server_as_the_chart_runs_it_on_postgresql(helm, postgres, tmp_path):  # noqa: F811
    postgres.create_database("chart_mlflow")
    postgres.create_database("chart_jobs")
    docs = render(helm, "postgres-s3-values.yaml")
    container = mlflow_deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    env = effective_env(docs, container)
    assert env["MLFLOW_BACKEND_STORE_URI"][0] == "secret"  # what the cluster's Secret holds, here:
    secret_url = postgres.url("chart_mlflow")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = []
    for arg in container["args"]:
        if arg.startswith("--port="):
            arg = f"--port={port}"
        elif arg.startswith("--artifacts-destination="):
            arg = f"--artifacts-destination={tmp_path / 'artifacts'}"  # S3 in the chart
        elif arg.startswith("--host="):
            arg = "--host=127.0.0.1"
        args.append(arg)
    plain = {k: v[1] for k, v in env.items() if v[0] in ("value", "configmap") and not k.startswith("AWS_")
             and k != "MLFLOW_S3_ENDPOINT_URL"}
    mlflow = Path(sys.executable).parent / container["command"][0]
    log = tmp_path / "mlflow.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(mlflow), *args], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **plain, "HOME": str(tmp_path),
                                       "MLFLOW_BACKEND_STORE_URI": secret_url})
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        experiment = client.create_experiment("chart-postgres")
        run = client.create_run(experiment, tags={"saeforge.job_id": "j-1"})
        client.log_metric(run.info.run_id, "fvu", 0.25)
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=postgres.port, user=postgres.user, dbname="chart_mlflow") as db:
            names = [r[0] for r in db.execute("SELECT name FROM experiments").fetchall()]
            metric = db.execute("SELECT value FROM metrics WHERE key = 'fvu'").fetchone()
        assert "chart-postgres" in names and metric == (0.25,)  # in PostgreSQL, not a file behind the server
    finally:
        server.terminate()
        server.wait(timeout=60)

    from api.store import JobStore

    store = JobStore(postgres.url("chart_jobs"))  # the API side: SAEFORGE_DATABASE_URL from the same Secret
    store.create("j-1", "alice", "n", {}, "e", None)
    assert store.claim_next(1).id == "j-1" and store.claim_next(1) is None
    store.close()
