"""The built image runs the chart's pods: the tiny job goes through the containerized API to the containerized Ray
workers, is tracked in the containerized MLflow and lands on the chart's output root; the API survives a kill.

Needs a Docker engine and the image built from this tree, named by SAEFORGE_TEST_IMAGE: `make test-image`
(.ci/image.sh) builds it and runs this file. Every container uses the host's network and listens on loopback;
tests/deploy/kube.py says how the chart's pods become containers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ..api.conftest import LOAD
from .kube import Pod, Release, free_port, ray_pods, render

pytestmark = pytest.mark.image

RELEASE = "saeforge"
VALUES = Path(__file__).with_name("values.yaml")
TOKEN = {"Authorization": "Bearer token-deploy"}
# The chart's fixed port: the API submits to the head's dashboard on 8265. Every other port is set free.
DASHBOARD_PORT = 8265


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(what: str, check, timeout: float, logs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(2)
    raise AssertionError(f"{what} not within {timeout:.0f} s\n{logs()}")


@pytest.fixture(scope="module")
def image() -> str:
    name = os.environ.get("SAEFORGE_TEST_IMAGE")
    assert name, "SAEFORGE_TEST_IMAGE is not set: run `make test-image`, which builds the image and names it"
    proc = subprocess.run(["docker", "image", "inspect", name], capture_output=True, text=True)
    assert proc.returncode == 0, f"no image {name!r} in the Docker engine: {proc.stderr.strip()}"
    return name


@pytest.fixture(scope="module")
def deployment(image, tmp_path_factory):
    """The release's pods started from the image, in the order a cluster settles into; removed afterwards."""
    assert not port_in_use(DASHBOARD_PORT), f"port {DASHBOARD_PORT} is taken: the chart's Ray dashboard needs it"
    repository, tag = image.rsplit(":", 1)
    api_port, mlflow_port = free_port(), free_port()
    # In a cluster the Service port maps to the container port; on one network they are the same number.
    release = Release(render(RELEASE, VALUES, {
        "image.repository": repository, "image.tag": tag, "image.pullPolicy": "Never",
        "api.port": api_port, "api.service.port": api_port, "mlflow.port": mlflow_port,
        "mlflow.service.port": mlflow_port, "ray.head.rayStartParams.port": free_port(),
        "ray.head.rayStartParams.ray-client-server-port": free_port()}))
    state = tmp_path_factory.mktemp("deploy")
    label = f"saeforge-deploy-test={os.getpid()}"
    prefix = f"sfdeploy{os.getpid()}"
    api = Pod(f"{prefix}-api", image, release.deployment("-api")["spec"]["template"]["spec"], release, state, label)
    mlflow = Pod(f"{prefix}-mlflow", image, release.deployment("-mlflow")["spec"]["template"]["spec"], release,
                 state, label)
    rays = ray_pods(release, image, state, label, prefix)
    pods = [mlflow, *(p for p, _ in rays), api]
    ns = {"release": release, "state": state, "api": api, "mlflow": mlflow, "rays": rays, "pods": pods,
          "api_url": f"http://127.0.0.1:{api_port}", "mlflow_url": f"http://127.0.0.1:{mlflow_port}",
          "logs": lambda: "\n".join(p.logs() for p in pods)}
    try:
        mlflow.start()
        head, head_probe = rays[0]
        head.start()
        wait_for("the Ray head's KubeRay probe", lambda: head.exec(head_probe).returncode == 0, 300, ns["logs"])
        for pod, _ in rays[1:]:
            pod.start()
        for pod, probe in rays[1:]:
            wait_for(f"{pod.name}'s KubeRay probe", lambda p=pod, c=probe: p.exec(c).returncode == 0, 300,
                     ns["logs"])
        api.start()
        wait_for("the API's readiness probe", lambda: api.exec(api.http_probe(api.container["readinessProbe"]))
                 .returncode == 0, 300, ns["logs"])
        yield ns
    finally:
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True,
                             text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120)


def test_the_pods_run_as_the_chart_says(deployment):
    """Non-root uid, read-only root where the chart says so, and the chart's probes answer inside."""
    for pod in deployment["pods"]:
        assert pod.running(), pod.logs()
        c = pod.container
        sc = {**pod.spec["securityContext"], **c["securityContext"]}
        ident = pod.exec("id -u; id -g")
        assert ident.stdout.split() == [str(sc["runAsUser"]), str(sc["runAsGroup"])], (pod.name, ident)
        root_write = pod.exec("touch /home/saeforge/.probe-write")  # the image user's own home
        if sc["readOnlyRootFilesystem"]:
            assert "Read-only file system" in root_write.stderr, (pod.name, root_write)
        else:
            assert root_write.returncode == 0, (pod.name, root_write)
        for mount in c["volumeMounts"]:
            if not mount.get("readOnly"):
                wrote = pod.exec(f"touch {mount['mountPath']}/.probe-write && rm {mount['mountPath']}/.probe-write")
                assert wrote.returncode == 0, (pod.name, mount["mountPath"], wrote.stderr)
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            if kind in c:
                answer = pod.exec(pod.http_probe(c[kind]))
                assert answer.returncode == 0, (pod.name, kind, answer.stderr, pod.logs())
    for pod, probe in deployment["rays"]:  # the probes KubeRay gives Ray pods
        answer = pod.exec(probe)
        assert answer.returncode == 0 and "success" in answer.stdout, (pod.name, probe, answer, pod.logs())


def test_tiny_job_through_the_containers(deployment):
    api_url, mlflow_url = deployment["api_url"], deployment["mlflow_url"]
    release: Release = deployment["release"]
    with httpx.Client(base_url=api_url, headers=TOKEN, timeout=30) as client:
        created = client.post("/v1/jobs", json=LOAD)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 900
        job = created.json()
        while job["state"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(3)
            job = client.get(f"/v1/jobs/{job_id}").json()
        logs = client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 400}).json().get("logs", "")
        assert job["state"] == "succeeded", f"{job}\n{logs}\n{deployment['logs']()}"

    # Its actors ran on the worker pods, placed by their custom resources.
    from ray.util.state import list_actors, list_nodes

    dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
    nodes = {n.node_id: n for n in list_nodes(address=dashboard, detail=True)}
    pools = {nid: {r for r in ("producer", "trainer") if r in (n.resources_total or {})} for nid, n in nodes.items()}
    assert sorted(p for ps in pools.values() for p in ps) == ["producer", "trainer"], pools
    used = {}
    for actor in list_actors(address=dashboard, detail=True, limit=1000):
        used.setdefault(actor.class_name, set()).update(pools.get(actor.node_id, set()) or {"head"})
    assert any("producer" in where for where in used.values()), used
    assert any("trainer" in where for where in used.values()), used

    # Tracked in the containerized MLflow: the job's run and its dictionary's run, finished, with metrics.
    import mlflow

    tracking = mlflow.MlflowClient(tracking_uri=mlflow_url)
    assert job["mlflow"]["run_id"], job
    assert tracking.get_run(job["mlflow"]["run_id"]).info.status == "FINISHED"
    [dictionary] = job["dictionaries"]
    run = tracking.get_run(dictionary["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics, run
    claims = deployment["state"] / "claims"
    mlflow_claim = claims / next(v["persistentVolumeClaim"]["claimName"] for v in deployment["mlflow"].spec["volumes"]
                                 if "persistentVolumeClaim" in v)
    assert (mlflow_claim / "mlflow.db").is_file(), "MLflow's SQLite store is not on its claim"

    # The dictionary lands on the chart's output root: the shared claim, seen from the host.
    config = next(d for d in release.docs if d["kind"] == "ConfigMap")["data"]
    root = config["SAEFORGE_OUTPUT_ROOT"]
    assert root == "file:///shared/outputs", config
    output = dictionary["output_uri"].removeprefix("file://")  # the service reports local URIs as paths
    assert output.startswith("/shared/outputs/"), (root, dictionary)
    on_host = claims / "saeforge-shared" / output.removeprefix("/shared/")
    files = sorted(p.name for p in on_host.iterdir())
    assert "cfg.json" in files and any(f.endswith(".safetensors") for f in files), (on_host, files)

    # The API pod killed and started again on its claim: the job and its results are still there.
    api: Pod = deployment["api"]
    api.kill()
    assert not api.running()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{api_url}/healthz", timeout=5)
    api.start(restart=1)
    wait_for("the restarted API's readiness probe",
             lambda: api.exec(api.http_probe(api.container["readinessProbe"])).returncode == 0, 300,
             deployment["logs"])
    with httpx.Client(base_url=api_url, headers=TOKEN, timeout=30) as client:
        again = client.get(f"/v1/jobs/{job_id}")
        assert again.status_code == 200, again.text
        after = again.json()
        assert after["state"] == "succeeded", after
        assert after["dictionaries"][0]["output_uri"] == dictionary["output_uri"]
        assert after["mlflow"]["run_id"] == job["mlflow"]["run_id"]
        assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [job_id]
