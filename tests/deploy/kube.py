"""The chart's pods as `docker run` commands: what kubelet and KubeRay would start, read from `helm template`.

Each pod becomes one container of the image, as the pod's uid/gid with its security context (read-only root
file system, no capabilities, no privilege escalation), its volumes (emptyDir: a fresh folder or a tmpfs;
PersistentVolumeClaim: a folder kept for the claim across restarts; Secret: its items as files), its
environment (ConfigMap, Secret references, literal values) and its command. Ray pods get the command KubeRay
builds from rayStartParams (`bash -lc -- "ulimit -n 65536; ray start ..."`, CPUs and memory from the limits).

The pods share the host's network instead of a pod network, which takes four changes and no more, each
because several pods now share one network namespace: Service names resolve to 127.0.0.1 (`--add-host`),
every `0.0.0.0` bind address becomes 127.0.0.1 (loopback only), Ray nodes start with
`--node-ip-address=127.0.0.1` (KubeRay's with their pod IP), and each Ray pod takes free dashboard-agent and
metrics ports (KubeRay gives every pod 52365 and 8080, which on one network would collide). The test moves the
other ports (API, MLflow, GCS, Ray client) to free ones through the chart's own values; only the dashboard's
8265, which the chart fixes, must be free on the host. Ray itself still turns a loopback node address
into the host's interface address (`ray start` resolves 127.0.0.1 to the address of the default route, as it
does for the project's local Ray too) and binds its gRPC servers on every interface; that traffic stays on
this host.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "saeforge"
NAMESPACE = "default"
LOOPBACK = "127.0.0.1"
GCS_PORT = 6379  # `ray start --head`'s default, and KubeRay's when rayStartParams has no `port`
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def helm_binary() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    path = str(local) if os.access(local, os.X_OK) else shutil.which("helm")
    assert path, "helm is not installed: run `bash .ci/install_helm.sh` (it puts helm at .tools/bin/helm)"
    return path


def render(release: str, values_file: Path, sets: dict[str, Any]) -> list[dict]:
    """`helm template` of the chart with these values; every rendered object."""
    args = [helm_binary(), "template", release, str(CHART), "--namespace", NAMESPACE, "-f", str(values_file)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number: "2" -> 2, "500m" -> 0.5, "8Gi" -> 8589934592."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    number = re.match(r"^[0-9.]+", text).group(0)
    return float(number) * _UNITS.get(text[len(number):], 1)


@dataclass
class Release:
    """The rendered chart, with the lookups a kubelet does: ConfigMaps, Secrets and Service names."""

    docs: list[dict]

    def find(self, kind: str, name: str) -> dict:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"the chart renders no {kind} {name!r}"
        return found[0]

    def deployment(self, suffix: str) -> dict:
        found = [d for d in self.docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith(suffix)]
        assert len(found) == 1, f"expected one Deployment named *{suffix}"
        return found[0]

    @property
    def raycluster(self) -> dict:
        return next(d for d in self.docs if d["kind"] == "RayCluster")

    @property
    def head_service(self) -> str:
        """The head Service KubeRay creates for the RayCluster (`<name>-head-svc`)."""
        return f"{self.raycluster['metadata']['name']}-head-svc"

    def service_names(self) -> list[str]:
        names = [d["metadata"]["name"] for d in self.docs if d["kind"] == "Service"] + [self.head_service]
        return [form for n in names for form in (n, f"{n}.{NAMESPACE}", f"{n}.{NAMESPACE}.svc.cluster.local")]

    def secret_value(self, name: str, key: str) -> str:
        data = self.find("Secret", name).get("data", {})
        assert key in data, f"Secret {name!r} has no key {key!r}"
        return base64.b64decode(data[key]).decode()

    def environment(self, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.find("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
            if "secretRef" in source:
                secret = self.find("Secret", source["secretRef"]["name"])
                env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secret_value(ref["name"], ref["key"])
            elif "configMapKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["configMapKeyRef"]
                env[item["name"]] = self.find("ConfigMap", ref["name"])["data"][ref["key"]]
            else:
                raise AssertionError(f"env {item['name']}: a source this test does not model: {item}")
        return env


def loopback_only(words: list[str]) -> list[str]:
    return [w.replace("0.0.0.0", LOOPBACK) for w in words]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def kuberay_command(group: dict, head: bool, gcs: str, agent_port: int, metrics_port: int) -> list[str]:
    """The container command KubeRay writes for a head or worker group (rayStartParams + resource limits)."""
    params = dict(group["rayStartParams"])
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        params.setdefault("num-cpus", str(int(quantity(limits["cpu"]))))
    if "memory" in limits:
        params.setdefault("memory", str(int(quantity(limits["memory"]))))
    gpus = limits.get("nvidia.com/gpu")
    if gpus:
        params.setdefault("num-gpus", str(gpus))
    if not head:
        params.setdefault("address", gcs)
    params.setdefault("dashboard-agent-listen-port", str(agent_port))
    params.setdefault("metrics-export-port", str(metrics_port))
    params.setdefault("node-ip-address", LOOPBACK)
    # KubeRay pastes each value verbatim (the chart shell-quotes what needs it, e.g. resources).
    flags = " ".join(f"--{k}={v}" for k, v in sorted(params.items()))
    start = f"ulimit -n 65536; ray start {'--head ' if head else ''}--block {flags}"
    return ["/bin/bash", "-lc", "--", start.replace("0.0.0.0", LOOPBACK)]


def kuberay_env(cluster: str, head: bool, gcs: str) -> dict[str, str]:
    """What KubeRay adds to every Ray container's environment."""
    port = gcs.rsplit(":", 1)[1]
    return {"RAY_CLUSTER_NAME": cluster, "RAY_ADDRESS": f"{LOOPBACK}:{port}" if head else gcs, "RAY_PORT": port,
            "RAY_USAGE_STATS_KUBERAY_IN_USE": "1", "MY_POD_IP": LOOPBACK}


def kuberay_probe(head: bool, agent_port: int) -> str:
    """KubeRay's default liveness/readiness exec probe of a Ray container."""
    probe = f"wget -T 2 -q -O- http://localhost:{agent_port}/api/local_raylet_healthz | grep success"
    if head:
        probe += " && wget -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep success"
    return probe


@dataclass
class Pod:
    """One pod of the release as one container; start() again after kill() is the pod restarted."""

    name: str
    image: str
    spec: dict
    release: Release
    state_dir: Path  # claims, emptyDirs and secrets live under here
    label: str
    command: list[str] | None = None  # None: the container's own command + args
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def container(self) -> dict:
        return self.spec["containers"][0]

    def _volume(self, volume: dict, mount: dict, restart: int) -> list[str]:
        read_only = ",readonly" if mount.get("readOnly") else ""
        fs_group = self.spec.get("securityContext", {}).get("fsGroup")
        if "emptyDir" in volume:
            empty = volume["emptyDir"]
            if empty.get("medium") == "Memory":
                size = int(quantity(empty.get("sizeLimit", "64Mi")))
                return ["--mount", f"type=tmpfs,dst={mount['mountPath']},tmpfs-size={size},tmpfs-mode=1777"]
            host = self.state_dir / "emptydir" / f"{self.name}-{restart}" / volume["name"]
            host.mkdir(parents=True, exist_ok=True)
            host.chmod(0o777)  # an emptyDir is world-writable
        elif "persistentVolumeClaim" in volume:
            host = self.state_dir / "claims" / volume["persistentVolumeClaim"]["claimName"]
            host.mkdir(parents=True, exist_ok=True)
            os.chown(host, 0, fs_group or 0)  # fsGroup: the pod's group owns the volume and may write it
            host.chmod(0o2775)
        elif "secret" in volume:
            secret = volume["secret"]
            host = self.state_dir / "secrets" / f"{self.name}-{volume['name']}"
            host.mkdir(parents=True, exist_ok=True)
            items = secret.get("items") or [{"key": k, "path": k} for k in
                                            self.release.find("Secret", secret["secretName"]).get("data", {})]
            for item in items:
                path = host / item["path"]
                path.write_text(self.release.secret_value(secret["secretName"], item["key"]))
                os.chown(path, 0, fs_group or 0)
                path.chmod(secret.get("defaultMode", 0o644))
        else:
            raise AssertionError(f"{self.name}: volume {volume['name']} of a kind this test does not model")
        return ["--mount", f"type=bind,src={host},dst={mount['mountPath']}{read_only}"]

    def run_args(self, restart: int = 0) -> list[str]:
        c = self.container
        pod_sc = self.spec.get("securityContext", {})
        sc = {**pod_sc, **c.get("securityContext", {})}
        # The kubelet restarts a crashed container (restartPolicy Always): Ray's start-up gives up after 30 s when
        # the machine is loaded. Open files: the engine's own limits, as a kubelet leaves them (where the hard
        # limit is below 65536, KubeRay's `ulimit -n 65536` warns and Ray starts with what there is).
        args = ["docker", "run", "--detach", "--name", self.name, "--label", self.label, "--network", "host",
                "--restart", "unless-stopped", "--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
        if pod_sc.get("fsGroup") is not None:
            args += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if "ALL" in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", "ALL"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        assert not sc.get("privileged"), f"{self.name}: privileged container"
        limits = c.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            args += ["--cpus", f"{quantity(limits['cpu']):g}"]
        if "memory" in limits:
            args += ["--memory", str(int(quantity(limits["memory"])))]
        for host in self.release.service_names():
            args += ["--add-host", f"{host}:{LOOPBACK}"]
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for mount in c.get("volumeMounts", []):
            args += self._volume(volumes[mount["name"]], mount, restart)
        for key, value in {**self.release.environment(c), **self.extra_env}.items():
            args += ["--env", f"{key}={value}"]
        if self.command is not None:
            return args + ["--entrypoint", self.command[0], self.image, *self.command[1:]]
        command = c.get("command")
        if command:
            args += ["--entrypoint", command[0]]
        return args + [self.image, *(command or [])[1:], *loopback_only(c.get("args", []))]

    def start(self, restart: int = 0) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True)
        proc = subprocess.run(self.run_args(restart), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"docker run {self.name} failed: {proc.stderr}"

    def kill(self) -> None:
        """SIGKILL and gone, as a deleted pod: no clean shutdown, nothing restarts it."""
        subprocess.run(["docker", "rm", "--force", self.name], capture_output=True, timeout=60)

    def running(self) -> bool:
        proc = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", self.name], capture_output=True,
                              text=True)
        return proc.stdout.strip() == "true"

    def exec(self, shell: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "exec", self.name, "/bin/sh", "-c", shell], capture_output=True,
                              text=True, timeout=timeout)

    def http_probe(self, probe: dict) -> str:
        """A kubelet httpGet probe, run inside the container (the image's wget): the command line."""
        get = probe["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in self.container["ports"] if p["name"] == port)
        return f"wget -T {probe.get('timeoutSeconds', 1)} -q -O- http://{LOOPBACK}:{port}{get['path']}"

    def logs(self, tail: int = 60) -> str:
        proc = subprocess.run(["docker", "logs", "--tail", str(tail), self.name], capture_output=True, text=True)
        return f"--- {self.name} ---\n{proc.stdout}{proc.stderr}"


def ray_pods(release: Release, image: str, state_dir: Path, label: str, prefix: str) -> list[tuple[Pod, str]]:
    """The head and one pod per enabled worker group, each with KubeRay's probe command."""
    rc = release.raycluster
    cluster = rc["metadata"]["name"]
    port = rc["spec"]["headGroupSpec"]["rayStartParams"].get("port", GCS_PORT)
    gcs = f"{release.head_service}.{NAMESPACE}.svc.cluster.local:{port}"
    groups = [("head", rc["spec"]["headGroupSpec"], True)]
    groups += [(g["groupName"], g, False) for g in rc["spec"]["workerGroupSpecs"]]
    pods = []
    for name, group, head in groups:
        agent = free_port()
        command = kuberay_command(group, head, gcs, agent, free_port())
        env = kuberay_env(cluster, head, gcs)
        pod = Pod(f"{prefix}-ray-{name}", image, group["template"]["spec"], release, state_dir, label, command, env)
        pods.append((pod, kuberay_probe(head, agent)))
    return pods
