"""A two-node cluster (`ray start` head + worker on loopback) whose nodes carry the chart's custom resources:
the head `producer` and one GPU, the worker `trainer` and four GPUs. Producers and the splice evaluator land on
the producer node and share its GPU, the two trainer ranks on the trainer node on distinct GPUs — launched with
the runner's own calls (start_producers, the evaluator's options, the plan's ScalingConfig). A whole job on a
Ray with declared GPUs runs in test_placement_one_gpu.py. torch here has no CUDA: the GPUs are Ray's, the
scheduling is real."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import ray

from api.jobspec import JobSpec
from services.evaluation import SpliceEvaluator
from services.placement import cluster_nodes, plan
from services.producer import start_producers

pytestmark = pytest.mark.slow

RAY = str(Path(shutil.which("ray") or Path(__import__("sys").executable).with_name("ray")))
JOB = {
    "name": "pools", "model": {"random": {"family": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                          "intermediate_size": 64, "seed": 0}},
    "hook": {"layer": 0}, "data": {"context_length": 64},
    "dictionaries": [{"name": "d", "latents": 64, "k": 4, "initialization": "random"}],
    "training": {"splice_eval_tokens": 128},
    "cluster": {"trainer_ranks": 2},
    "tracking": {"experiment": "placement"},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    flags = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")
    return [f"{flag}={_port()}" for flag in flags]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    with open(log, "ab") as out:  # a session of its own: its process group holds exactly this node's processes
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--include-log-monitor=false",
                                 f"--object-store-memory={200 << 20}", *args, *_node_ports()],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    port = _port()
    temp_dir = Path("/tmp") / f"sf-pools-{os.getpid()}"
    head = _start(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={_port()}", f"--ray-client-server-port={_port()}",
                   f"--temp-dir={temp_dir}", "--num-cpus=3", "--num-gpus=1",
                   "--resources=" + json.dumps({"producer": 1})], logs / "head.log")
    nodes = [head]
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline and head.poll() is None, (logs / "head.log").read_text()[-3000:]
                time.sleep(2)
        nodes.append(_start([f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=3",
                             "--num-gpus=4", "--resources=" + json.dumps({"trainer": 1})], logs / "worker.log"))
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline and nodes[1].poll() is None, (logs / "worker.log").read_text()[-3000:]
            time.sleep(1)
        ids = {pool: next(n["NodeID"] for n in ray.nodes() if n["Alive"] and pool in n["Resources"])
               for pool in ("producer", "trainer")}
        yield ids
    finally:
        ray.shutdown()
        for process in reversed(nodes):
            _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _where(actor) -> tuple[str, list]:
    return ray.get(actor.__ray_call__.remote(
        lambda _self: (ray.get_runtime_context().get_node_id(), [str(i) for i in ray.get_gpu_ids()])))


def test_producers_and_evaluator_share_the_producer_nodes_gpu(cluster):
    spec = JobSpec.model_validate(JOB)
    placed = plan(spec, cluster_nodes())
    assert placed.producer.resources == {"producer": 0.01} and placed.trainer.resources == {"trainer": 0.01}
    (producer,) = start_producers(spec, placed.producer)
    evaluator = ray.remote(SpliceEvaluator).options(**placed.evaluator.options()).remote(spec.model_dump_json())
    try:
        assert _where(producer) == (cluster["producer"], ["0"])
        assert _where(evaluator) == (cluster["producer"], ["0"])  # the one GPU of the producer node, shared
    finally:
        ray.kill(producer)
        ray.kill(evaluator)


def test_two_trainer_ranks_land_on_distinct_gpus_of_the_trainer_node(cluster, tmp_path):
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    placed = plan(JobSpec.model_validate(JOB), cluster_nodes())
    assert placed.trainer.gpus == 1

    def where(config: dict) -> None:
        rank = ray.train.get_context().get_world_rank()
        Path(config["folder"], f"{rank}.json").write_text(json.dumps(
            [ray.get_runtime_context().get_node_id(), [str(i) for i in ray.get_gpu_ids()]]))

    TorchTrainer(where, train_loop_config={"folder": str(tmp_path)}, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=placed.scaling_config(),
                 run_config=RunConfig(name="where", storage_path=str(tmp_path / "ray"))).fit()
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert {node for node, _ in seen} == {cluster["trainer"]}
    gpus = [ids for _, ids in seen]
    assert all(len(ids) == 1 for ids in gpus) and gpus[0] != gpus[1], gpus

