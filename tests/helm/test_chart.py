"""Render the Helm chart with the real helm binary and check what the cluster would receive.

Needs helm (run `.ci/install_helm.sh`, which puts it at `.tools/bin/helm`), the PyPI packages
`kubernetes-validate` and `jsonschema`, and the KubeRay CRDs in `<repo>/../shared/kuberay-crds/`.
Everything runs offline.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "saeforge"
CI_DIR = CHART / "ci"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
KUBE_VERSION = "1.33.0"
RELEASE = "sf"
NAMESPACE = "ml"
CI_FILES = ["default-values.yaml", "gpu-values.yaml", "postgres-s3-values.yaml"]
WORKER_GROUPS = {"producers", "trainers"}
CORE_KINDS = {
    "Deployment",
    "Service",
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "PersistentVolumeClaim",
    "Ingress",
}


# --- helm ------------------------------------------------------------------------------------------


def _find_helm() -> str | None:
    local = ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    path = _find_helm()
    if path is None:
        pytest.fail(
            "helm is not installed: run `bash .ci/install_helm.sh` (it puts helm at .tools/bin/helm)",
            pytrace=False,
        )
    return path


def _run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def _template_args(values_file: str | None, sets: tuple[str, ...]) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if values_file:
        args += ["-f", str(CI_DIR / values_file)]
    for s in sets:
        args += ["--set", s]
    return args


@cache
def _render_cached(helm: str, values_file: str | None, sets: tuple[str, ...] = ()) -> tuple[dict, ...]:
    proc = _run_helm(helm, *_template_args(values_file, sets))
    assert proc.returncode == 0, f"helm template failed for {values_file} {sets}:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, "helm template rendered nothing"
    return tuple(docs)


def render(helm: str, values_file: str | None = None, *sets: str) -> list[dict]:
    return copy.deepcopy(list(_render_cached(helm, values_file, tuple(sets))))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    names = [d["metadata"]["name"] for d in found]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {names}"
    return found[0]


# --- pods, containers and their environment --------------------------------------------------------


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod spec the release creates, keyed by a readable name."""
    pods = {}
    for d in by_kind(docs, "Deployment"):
        pods[f"Deployment/{d['metadata']['name']}"] = d["spec"]["template"]["spec"]
    for rc in by_kind(docs, "RayCluster"):
        pods["ray/head"] = rc["spec"]["headGroupSpec"]["template"]["spec"]
        for g in rc["spec"].get("workerGroupSpecs", []):
            pods[f"ray/{g['groupName']}"] = g["template"]["spec"]
    return pods


def ray_pods(docs: list[dict]) -> dict[str, dict]:
    return {k: v for k, v in pod_specs(docs).items() if k.startswith("ray/")}


def containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def effective_env(docs: list[dict], container: dict) -> dict[str, tuple]:
    """name -> ("value", v) | ("secret", secret, key) | ("configmap", v)."""
    env: dict[str, tuple] = {}
    for src in container.get("envFrom", []):
        assert "secretRef" not in src, "secrets must be referenced key by key, not through envFrom"
        cm = one(docs, "ConfigMap", src["configMapRef"]["name"])
        for k, v in cm.get("data", {}).items():
            env[k] = ("configmap", v)
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = ("value", e["value"])
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = ("secret", ref["name"], ref["key"])
        else:
            env[e["name"]] = ("other", e.get("valueFrom"))
    return env


def env_value(docs: list[dict], container: dict, name: str) -> str | None:
    entry = effective_env(docs, container).get(name)
    return entry[1] if entry and entry[0] in ("value", "configmap") else None


def api_container(docs: list[dict]) -> dict:
    dep = one(docs, "Deployment", "-api")
    return dep["spec"]["template"]["spec"]["containers"][0]


def mlflow_deployment(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "-mlflow")


# --- CRD schema --------------------------------------------------------------------------------------


def _close(schema):
    """Make every object schema that lists properties reject unknown fields (see the CRDs' README)."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in schema
        ):
            schema["additionalProperties"] = False
        for key, value in schema.items():
            if key == "properties":
                for sub in value.values():
                    _close(sub)
            elif key in ("items", "additionalProperties", "not"):
                _close(value)
            elif key in ("allOf", "anyOf", "oneOf"):
                for sub in value:
                    _close(sub)
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (shared/ must sit beside the repo)", pytrace=False)
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != kind:
            continue
        for version in crd["spec"]["versions"]:
            if version["name"] == "v1":
                schema = _close(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                return jsonschema.Draft7Validator(schema)
    pytest.fail(f"no ray.io/v1 {kind} CRD in {CRD_DIR}", pytrace=False)


def crd_errors(obj: dict) -> list[str]:
    validator = crd_validator(obj["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# --- tests: lint, render, schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("values_file", CI_FILES)
def test_lint_strict(helm, values_file):
    proc = _run_helm(helm, "lint", "--strict", str(CHART), "-f", str(CI_DIR / values_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values_file", CI_FILES)
def test_renders_the_expected_objects(helm, values_file):
    docs = render(helm, values_file)
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    assert {d["metadata"]["name"] for d in by_kind(docs, "Deployment")} == {
        f"{RELEASE}-saeforge-api",
        f"{RELEASE}-saeforge-mlflow",
    }
    assert not (kinds - CORE_KINDS - {"RayCluster"}), f"unexpected kinds {kinds}"


@pytest.mark.parametrize("kube_version", [KUBE_VERSION, kubernetes_validate.utils.latest_version()])
@pytest.mark.parametrize("values_file", CI_FILES)
def test_core_objects_pass_kubernetes_validate_strict(helm, values_file, kube_version):
    docs = render(helm, values_file)
    checked = 0
    for obj in docs:
        if obj["kind"] == "RayCluster":
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({values_file}, k8s {kube_version}): {exc}")
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("values_file", CI_FILES)
def test_raycluster_passes_the_kuberay_crd_with_unknown_fields_rejected(helm, values_file):
    clusters = by_kind(render(helm, values_file), "RayCluster")
    assert len(clusters) == 1
    for rc in clusters:
        assert rc["apiVersion"] == "ray.io/v1"
        errors = crd_errors(rc)
        assert not errors, "\n".join(errors)


def test_crd_check_rejects_a_misspelt_field(helm):
    rc = by_kind(render(helm, "default-values.yaml"), "RayCluster")[0]
    rc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    errors = "\n".join(crd_errors(rc))
    assert "maxReplica" in errors and "volumeMount" in errors


# --- tests: the facts that matter ---------------------------------------------------------------------


@pytest.mark.parametrize("values_file", CI_FILES)
def test_every_ray_pod_has_an_in_memory_dev_shm(helm, values_file):
    pods = ray_pods(render(helm, values_file))
    assert set(pods) == {"ray/head"} | {f"ray/{g}" for g in WORKER_GROUPS}
    for name, pod in pods.items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(mounts) == 1, f"{name}: no /dev/shm mount"
        vol = volumes[mounts[0]["name"]]
        assert vol["emptyDir"]["medium"] == "Memory", name
        assert vol["emptyDir"]["sizeLimit"], f"{name}: /dev/shm has no sizeLimit"
        tmp = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}: /tmp must be a writable emptyDir"


def test_shm_size_follows_the_values(helm):
    pods = ray_pods(render(helm, "gpu-values.yaml"))
    sizes = {
        name: next(v for v in pod["volumes"] if v["name"] == "shared-mem")["emptyDir"]["sizeLimit"]
        for name, pod in pods.items()
    }
    assert sizes == {"ray/head": "4Gi", "ray/producers": "16Gi", "ray/trainers": "32Gi"}


UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(quantity: str) -> float:
    for unit, mult in UNITS.items():
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * mult
    return float(quantity)


@pytest.mark.parametrize("values_file", CI_FILES)
def test_object_store_fits_in_dev_shm(helm, values_file):
    rc = by_kind(render(helm, values_file), "RayCluster")[0]
    groups = [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]
    for group in groups:
        shm = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == "shared-mem")
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store == int(0.8 * _bytes(shm["emptyDir"]["sizeLimit"])), group.get("groupName", "head")


def test_object_store_override_and_decimal_sizes(helm):
    docs = render(
        helm,
        None,
        "ray.head.shmSizeLimit=1.5G",
        "ray.workerGroups.trainers.rayStartParams.object-store-memory=1000",
    )
    rc = by_kind(docs, "RayCluster")[0]
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["object-store-memory"] == "1200000000"
    trainers = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "trainers")
    assert trainers["rayStartParams"]["object-store-memory"] == "1000"


def test_gpu_groups_request_gpus(helm):
    docs = render(helm, "gpu-values.yaml")
    rc = by_kind(docs, "RayCluster")[0]
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == WORKER_GROUPS
    for name, group in groups.items():
        pod = group["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) == 1, name
        assert int(res["requests"]["nvidia.com/gpu"]) == 1, name
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head.get("limits", {})
    assert rc["spec"]["enableInTreeAutoscaling"] is True


def test_cpu_defaults_request_no_gpus(helm):
    text = json.dumps(render(helm, "default-values.yaml"))
    assert "nvidia.com/gpu" not in text


@pytest.mark.parametrize("values_file", CI_FILES)
def test_worker_groups_advertise_their_custom_resources(helm, values_file):
    rc = by_kind(render(helm, values_file), "RayCluster")[0]
    want = {"producers": {"producer": 1}, "trainers": {"trainer": 1}}
    for group in rc["spec"]["workerGroupSpecs"]:
        raw = group["rayStartParams"]["resources"]
        # KubeRay pastes the value into a shell command line, so it must be one shell-quoted word.
        assert raw.startswith("'") and raw.endswith("'"), raw
        assert json.loads(raw[1:-1]) == want[group["groupName"]]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("values_file", CI_FILES)
def test_the_runner_requests_what_the_worker_groups_advertise(helm, values_file):
    """The placement plan on the rendered cluster's nodes pins producers / the evaluator to the producers group
    and trainer ranks to the trainers group: the names the runner asks for are the ones the pods carry."""
    from api.jobspec import JobSpec
    from services.placement import Node, plan

    rc = by_kind(render(helm, values_file), "RayCluster")[0]
    nodes = []
    for group in rc["spec"]["workerGroupSpecs"]:
        advertised = json.loads(group["rayStartParams"]["resources"][1:-1])
        gpus = float(group["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get(
            "nvidia.com/gpu", 0))
        nodes += [Node(2.0, gpus, advertised)] * group["replicas"]
    placed = plan(JobSpec(), [Node(2.0, 0.0), *nodes])  # the head: no custom resource
    assert set(placed.producer.resources) == set(placed.evaluator.resources) == {"producer"}
    assert set(placed.trainer.resources) == {"trainer"}


@pytest.mark.parametrize("values_file", CI_FILES)
def test_api_submits_to_the_ray_head_service(helm, values_file):
    docs = render(helm, values_file)
    rc = by_kind(docs, "RayCluster")[0]
    head_service = f"{rc['metadata']['name']}-head-svc"  # the name KubeRay gives the head Service
    assert len(head_service) <= 63
    api = api_container(docs)
    assert env_value(docs, api, "SAEFORGE_RAY_ADDRESS") == f"http://{head_service}:8265"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"} in head["ports"]
    assert api["command"] == ["saeforge"]
    assert api["args"][:1] == ["serve"] and "0.0.0.0" in api["args"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    svc = one(docs, "Service", "-api")
    assert svc["spec"]["selector"] == one(docs, "Deployment", "-api")["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("values_file", CI_FILES)
def test_mlflow_uri_and_settings_reach_every_pod(helm, values_file):
    docs = render(helm, values_file)
    mlflow_svc = one(docs, "Service", "-mlflow")
    uri = f"http://{mlflow_svc['metadata']['name']}:{mlflow_svc['spec']['ports'][0]['port']}"
    for name, pod in pod_specs(docs).items():
        main = pod["containers"][0]
        assert env_value(docs, main, "MLFLOW_TRACKING_URI") == uri, name
        assert env_value(docs, main, "SAEFORGE_OUTPUT_ROOT"), name
        home = env_value(docs, main, "SAEFORGE_HOME")  # the service's scratch must be on a writable volume
        assert any(home.startswith(m["mountPath"] + "/") for m in main.get("volumeMounts", [])), name
    api = api_container(docs)
    assert env_value(docs, api, "SAEFORGE_ALLOW_TRUST_REMOTE_CODE") == "false"
    assert env_value(docs, api, "SAEFORGE_MAX_RUNNING_JOBS").isdigit()
    tokens_file = env_value(docs, api, "SAEFORGE_TOKENS_FILE")
    mount = next(m for m in api["volumeMounts"] if tokens_file.startswith(m["mountPath"] + "/"))
    pod = one(docs, "Deployment", "-api")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert vol["secret"]["items"][0]["path"] == Path(tokens_file).name


def test_s3_settings_and_keys_reach_every_pod(helm):
    docs = render(helm, "postgres-s3-values.yaml")
    for name, pod in pod_specs(docs).items():
        env = effective_env(docs, pod["containers"][0])
        assert env["AWS_DEFAULT_REGION"] == ("configmap", "eu-west-1"), name
        assert env["AWS_ENDPOINT_URL"] == ("configmap", "https://minio.storage.svc:9000"), name
        assert env["AWS_ACCESS_KEY_ID"] == ("secret", "saeforge-s3", "AWS_ACCESS_KEY_ID"), name
        assert env["AWS_SECRET_ACCESS_KEY"] == ("secret", "saeforge-s3", "AWS_SECRET_ACCESS_KEY"), name
        assert env["SAEFORGE_OUTPUT_ROOT"] == ("configmap", "s3://saeforge-artifacts/prod"), name
        assert env["SAEFORGE_MODEL_ROOTS"] == ("configmap", "s3://saeforge-models/,/shared/models"), name
        mounts = {m["mountPath"]: m for m in pod["containers"][0].get("volumeMounts", [])}
        if not name.endswith("-mlflow"):
            assert mounts["/shared"]["readOnly"] is True, name


def test_mlflow_server_defaults_to_sqlite_on_a_volume(helm):
    docs = render(helm, "default-values.yaml")
    dep = mlflow_deployment(docs)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["mlflow"] and c["args"][0] == "server"
    assert "--host=0.0.0.0" in c["args"] and "--serve-artifacts" in c["args"]
    assert "--backend-store-uri=sqlite:////data/mlflow.db" in c["args"]
    assert "--artifacts-destination=/data/mlflow-artifacts" in c["args"]
    allowed = next(a for a in c["args"] if a.startswith("--allowed-hosts="))
    assert f"{RELEASE}-saeforge-mlflow" in allowed.split("=", 1)[1].split(",")
    assert env_value(docs, c, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false"
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    pvc = one(docs, "PersistentVolumeClaim", "-mlflow-data")
    vols = dep["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}} in vols
    api = api_container(docs)
    assert env_value(docs, api, "SAEFORGE_DATABASE_URL") == "sqlite:////data/saeforge.db"


def test_mlflow_server_with_postgres_and_s3(helm):
    docs = render(helm, "postgres-s3-values.yaml")
    c = mlflow_deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--backend-store-uri") for a in c["args"])
    assert "--artifacts-destination=s3://saeforge-artifacts/prod/mlflow-artifacts" in c["args"]
    env = effective_env(docs, c)
    assert env["MLFLOW_BACKEND_STORE_URI"] == ("secret", "saeforge-db", "mlflow-url")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == ("configmap", "https://minio.storage.svc:9000")
    assert not by_kind(docs, "PersistentVolumeClaim")
    api = api_container(docs)
    assert effective_env(docs, api)["SAEFORGE_DATABASE_URL"] == ("secret", "saeforge-db", "saeforge-url")
    assert one(docs, "Deployment", "-api")["spec"]["replicas"] == 2
    assert one(docs, "Ingress", "-api")["spec"]["rules"][0]["host"] == "saeforge.example.com"


SENSITIVE = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_BACKEND_STORE_URI"}


@pytest.mark.parametrize("values_file", CI_FILES)
def test_secrets_are_referenced_never_inlined(helm, values_file):
    docs = render(helm, values_file)
    for cm in by_kind(docs, "ConfigMap"):
        assert not SENSITIVE & set(cm.get("data", {})), "secrets must not sit in a ConfigMap"
    for name, pod in pod_specs(docs).items():
        for c in containers(pod):
            env = effective_env(docs, c)
            for key in SENSITIVE & set(env):
                assert env[key][0] == "secret", f"{name}: {key} is inlined"
            db = env.get("SAEFORGE_DATABASE_URL")
            if db and db[0] != "secret":
                assert db[1].startswith("sqlite:"), f"{name}: an external database URL must be a Secret"
    secrets = {s["metadata"]["name"] for s in by_kind(docs, "Secret")}
    if values_file == "postgres-s3-values.yaml":
        assert not secrets, f"every secret is an existing one here, yet the chart made {secrets}"
    tokens_volume = next(
        v for v in one(docs, "Deployment", "-api")["spec"]["template"]["spec"]["volumes"] if "secret" in v
    )
    if values_file == "default-values.yaml":
        assert tokens_volume["secret"]["secretName"] in secrets
    else:
        assert tokens_volume["secret"]["secretName"] == "saeforge-api-tokens"


def test_generated_api_token_is_random_not_a_default(helm):
    def token_of(docs):
        secret = one(docs, "Secret", "-api-tokens")
        tokens = json.loads(base64.b64decode(secret["data"]["tokens.json"]))
        assert list(tokens.values()) == ["admin"]
        return next(iter(tokens))

    first = token_of(_render_fresh(helm))
    second = token_of(_render_fresh(helm))
    assert first != second and len(first) >= 32
    assert first not in (CHART / "values.yaml").read_text()


def _render_fresh(helm: str) -> list[dict]:
    proc = _run_helm(helm, *_template_args("default-values.yaml", ()))
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_inline_credentials_land_in_a_secret_only(helm):
    docs = render(
        helm,
        None,
        "s3.enabled=true",
        "s3.bucket=bkt",
        "s3.credentials.accessKeyId=AKIAEXAMPLE",
        "s3.credentials.secretAccessKey=s3cr3t-example",
        "api.database.url=postgresql://u:pw@db/sf",
    )
    secret = one(docs, "Secret", "-env")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-example",
        "database-url": "postgresql://u:pw@db/sf",
    }
    others = json.dumps([d for d in docs if d["kind"] != "Secret"])
    for value in data.values():
        assert value not in others
    env = effective_env(docs, api_container(docs))
    assert env["AWS_SECRET_ACCESS_KEY"] == ("secret", secret["metadata"]["name"], "AWS_SECRET_ACCESS_KEY")


@pytest.mark.parametrize("values_file", CI_FILES)
def test_no_container_runs_as_root(helm, values_file):
    docs = render(helm, values_file)
    for name, pod in pod_specs(docs).items():
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["runAsUser"] != 0 and psc.get("runAsGroup", 1) != 0, name
        for c in containers(pod):
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert sc.get("runAsUser", psc["runAsUser"]) != 0, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert "ALL" in sc["capabilities"]["drop"], where
            if not name.startswith("ray/"):
                assert sc["readOnlyRootFilesystem"] is True, where
                assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), where
    for rc in by_kind(docs, "RayCluster"):
        if rc["spec"].get("enableInTreeAutoscaling"):
            sc = rc["spec"]["autoscalerOptions"]["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False


# --- tests: bad values fail, naming the value ----------------------------------------------------------

BAD_VALUES = [
    (["ray.workerGroups.trainers.replicas=-1"], "/ray/workerGroups/trainers/replicas"),
    (["ray.workerGroups.producers.maxReplicas=-3"], "/ray/workerGroups/producers/maxReplicas"),
    (["api.replicas=two"], "/api/replicas"),
    (["ray.workerGroups.producers.gpus=1.5"], "/ray/workerGroups/producers/gpus"),
    (["ray.head.shmSizeLimit=lots"], "/ray/head/shmSizeLimit"),
    (["bogusSetting=1"], "bogusSetting"),
    (["ray.workerGroups.cpu.replicas=1"], "cpu"),
    (["podSecurityContext.runAsUser=0"], "/podSecurityContext/runAsUser"),
    (["api.service.type=Public"], "/api/service/type"),
    (["ray.workerGroups.trainers.minReplicas=5"], "ray.workerGroups.trainers.minReplicas"),
    (["ray.workerGroups.producers.replicas=9"], "ray.workerGroups.producers.replicas"),
    (["s3.enabled=true"], "s3.bucket"),
    (["api.replicas=3"], "api.replicas"),
    (["config.hubAllow={HuggingFaceTB}"], "/config/hubAllow/0"),  # an org is 'HuggingFaceTB/'
]


@pytest.mark.parametrize(("sets", "named"), BAD_VALUES, ids=[s[0][0] for s in BAD_VALUES])
def test_bad_value_fails_template_naming_the_value(helm, sets, named):
    args = _template_args(None, ())
    for s in sets:
        args += ["--set", s]
    proc = _run_helm(helm, *args)
    assert proc.returncode != 0, f"{sets} rendered without error"
    assert named in proc.stderr, proc.stderr


@pytest.mark.parametrize(("sets", "named"), BAD_VALUES[:9], ids=[s[0][0] for s in BAD_VALUES[:9]])
def test_bad_value_fails_lint(helm, sets, named):
    # Schema errors fail lint too. (Helm's lint mode turns the templates' `fail` into a log line, so the
    # cross-field checks - min <= replicas <= max, S3 bucket, ... - are caught by template/install only.)
    args = ["lint", "--strict", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = _run_helm(helm, *args)
    assert proc.returncode != 0
    assert named in proc.stdout + proc.stderr


def test_install_script_is_idempotent(helm):
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "install_helm.sh")], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "v4." in proc.stdout or "v3." in proc.stdout


def test_defaults_hold_no_credentials():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["s3"]["credentials"]["accessKeyId"] == ""
    assert values["s3"]["credentials"]["secretAccessKey"] == ""
    assert values["api"]["auth"]["tokens"] == {}
    assert values["api"]["database"]["url"] == ""
    assert values["mlflow"]["backendStore"]["uri"] == ""


@pytest.mark.parametrize("values_file", CI_FILES)
def test_the_rendered_path_policy_is_one_the_service_starts_with(helm, values_file):
    """The API's environment from the chart (roots, S3 prefixes, per-rank budget) parses into the settings the
    service runs with; PostgreSQL mode: the store URL comes from the Secret, and the policy allows the job
    folders under the output root."""
    from api.settings import Settings

    docs = render(helm, values_file)
    api = api_container(docs)
    env = {k: v[1] for k, v in effective_env(docs, api).items() if v[0] == "configmap"}
    settings = Settings.from_env({**env, "SAEFORGE_HOME": "/tmp/saeforge-chart-test"})
    policy = settings.paths
    assert policy.output_root == settings.output_root
    from api.paths import Uri

    assert policy.check(settings.output_root.rstrip("/") + "/job-1", Uri("write", "output"), "output.uri")
    if values_file == "postgres-s3-values.yaml":
        assert env["SAEFORGE_S3_PREFIXES"] == "read:s3://public-corpora/web,write:s3://team-scratch/saeforge"
        assert settings.rank_memory_bytes == 80 * 2**30
        assert policy.check("s3://saeforge-data/c4.jsonl", Uri("read", "data"), "data.source")
        assert policy.check("s3://team-scratch/saeforge/x", Uri("write", "output"), "output.uri")
        with pytest.raises(ValueError, match=r"rule: s3-prefix"):
            policy.check("s3://public-corpora/web/x", Uri("write", "output"), "output.uri")
        assert policy.check_hub_id("HuggingFaceTB/SmolLM2-135M", Uri("read", "model"), "model.name")
        with pytest.raises(ValueError, match=r"rule: hub-allow"):
            policy.check_hub_id("monology/other", Uri("read", "data"), "data.source")
        assert effective_env(docs, api)["SAEFORGE_DATABASE_URL"][0] == "secret"
