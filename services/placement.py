"""Where a job's actors run: the placement plan, computed from the JobSpec and the cluster before anything starts.

Each producer asks for `cluster.producer_gpus` GPUs (a fraction, one, or several for a model spread over them
with a device_map), each trainer rank for one whole GPU (NCCL refuses two ranks on one GPU) and the splice
evaluator for its own GPU. When the cluster has fewer GPUs than that, the producers and the evaluator share:
slices of the GPUs no trainer rank uses, else all of them beside one trainer rank, which then asks for
TRAINER_SHARE (more than half a GPU, so Ray never puts two ranks on one GPU). A node with one GPU runs the
default job with producer, evaluator and trainer rank on that GPU. Sharing assumes Ray packs fractional
requests onto the GPUs of one node; on a cluster of several GPU nodes, give the producers their own pool.

Nodes that advertise the custom resources `producer` / `trainer` (the chart's worker groups do) take those
actors only: each producer and the evaluator ask for POOL_UNIT of `producer`, each rank for POOL_UNIT of
`trainer`. A plan the cluster cannot satisfy raises PlacementError with the numbers and the fix: a job is
refused at once, never left waiting for resources that will not come.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from api.jobspec import JobSpec

TRAINER_SHARE = 0.6  # a trainer rank's GPU when it shares one: > 1/2, so two ranks never land on one GPU
SHARES = (1.0, 0.5, 0.25, 0.2, 0.1, 0.05)  # the GPU slices a sharing producer / evaluator may get
POOL_UNIT = 0.01  # of a `producer` / `trainer` custom resource per actor: a node takes up to 100 of them
POOLS = ("producer", "trainer")


class PlacementError(ValueError):
    """The cluster cannot hold the job as specified; the message gives the numbers and the fix."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float
    resources: dict[str, float] = field(default_factory=dict)  # custom resources (producer, trainer)


@dataclass(frozen=True)
class Request:
    """One actor's Ray resources."""
    cpus: float
    gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)

    def options(self) -> dict:
        """Keyword arguments of `ray.remote(...).options` / `.remote` for this request."""
        options: dict = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    def per_worker(self) -> dict[str, float]:
        """Ray Train's `resources_per_worker`."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}), **self.resources}

    def __str__(self) -> str:
        parts = [f"CPU {self.cpus:g}", *([f"GPU {self.gpus:g}"] if self.gpus else []),
                 *(f"{k} {v:g}" for k, v in self.resources.items())]
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class Plan:
    producers: int
    producer: Request
    trainer_ranks: int
    trainer: Request
    evaluator: Request | None  # None: no splice evaluation
    nodes: tuple[Node, ...]
    notes: tuple[str, ...] = ()

    @property
    def trainers_use_gpu(self) -> bool:
        return self.trainer.gpus > 0

    @property
    def gpus_requested(self) -> float:
        return (self.producers * self.producer.gpus + self.trainer_ranks * self.trainer.gpus
                + (self.evaluator.gpus if self.evaluator else 0.0))

    def scaling_config(self):
        """Ray Train's ScalingConfig of the trainer ranks."""
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.trainer_ranks, use_gpu=self.trainers_use_gpu,
                             resources_per_worker=self.trainer.per_worker())

    @property
    def cpus_requested(self) -> float:
        return (self.producers * self.producer.cpus + self.trainer_ranks * self.trainer.cpus
                + (self.evaluator.cpus if self.evaluator else 0.0))

    def describe(self) -> str:
        gpus, cpus = sum(n.gpus for n in self.nodes), sum(n.cpus for n in self.nodes)
        pools = sorted({k for n in self.nodes for k in n.resources if k in POOLS})
        lines = [f"placement plan ({len(self.nodes)} node(s): {cpus:g} CPUs, {gpus:g} GPUs"
                 + (f"; pools: {', '.join(pools)}" if pools else "") + ")",
                 f"  producers         {self.producers} x {self.producer}",
                 f"  trainer ranks     {self.trainer_ranks} x {self.trainer}"
                 + ("   (one GPU per NCCL rank)" if self.trainers_use_gpu else ""),
                 "  splice evaluator  " + (f"1 x {self.evaluator}" if self.evaluator else "none"),
                 "  buffer, monitor   {CPU 0}",
                 f"  requested         {self.gpus_requested:g} of {gpus:g} GPUs, {self.cpus_requested:g} of "
                 f"{cpus:g} CPUs"]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster."""
    import ray

    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        r = node.get("Resources", {})
        nodes.append(Node(r.get("CPU", 0.0), r.get("GPU", 0.0), {k: r[k] for k in POOLS if k in r}))
    return nodes


def local_cpus(spec: JobSpec) -> int:
    """The CPUs a local Ray declares for this job: the machine's, or one per actor if that is more (Ray's CPUs
    are a count of slots; the actors of a small job share a laptop's cores)."""
    evaluates = spec.training.splice_eval_tokens > 0 and spec.data.cache.read is None
    return max(os.cpu_count() or 1, spec.cluster.producers + spec.cluster.trainer_ranks + evaluates)


def local_nodes(spec: JobSpec, gpus: int | None = None) -> list[Node]:
    """This machine as the one node a local Ray would start (`gpus`: plan for that many GPUs instead)."""
    if gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = len([d for d in visible.split(",") if d.strip() and d.strip() != "NoDevFiles"])
        else:
            import torch

            gpus = torch.cuda.device_count()
    return [Node(float(local_cpus(spec)), float(gpus))]


def nodes_for(spec: JobSpec, gpus: int | None = None) -> list[Node]:
    """The nodes a job would run on: one node with `gpus` GPUs when given; else the cluster of
    cluster.ray_address / RAY_ADDRESS (joined and left); else this machine, as a local Ray would see it."""
    if gpus is not None:
        return local_nodes(spec, gpus)
    address = spec.cluster.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        return local_nodes(spec)
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        return cluster_nodes()
    finally:
        ray.shutdown()


def _fits(need: float, have: float) -> bool:
    return need <= have + 1e-9


def _slots(gpus: float, share: float) -> int:
    return int(gpus // share + 1e-9) if gpus > 0 else 0


def _summary(nodes: list[Node]) -> str:
    return f"{len(nodes)} node(s) with {sum(n.gpus for n in nodes):g} GPUs in all"


def _gpus_for(count: int, share: float) -> int:
    """GPUs that `count` requests of `share` (at most one GPU) occupy: Ray packs fractions onto one GPU first."""
    return -(-count // _slots(1.0, share)) if count else 0


def _share_gpus(nodes: list[Node], producers: int, producer_gpus: float, ranks: int, evaluator: bool,
                where: str) -> tuple[float, float, float, list[str]]:
    """(GPUs per producer, per trainer rank, for the evaluator, notes) on one pool of GPU nodes.

    Ray puts a fractional request on the first GPU it fits (checked: two 0.4 requests land on GPU 0 of two), so
    the slices are chosen for that packing, whichever of producers and trainers Ray places first.
    """
    total = sum(n.gpus for n in nodes)
    most = max((n.gpus for n in nodes), default=0.0)
    if producers and producer_gpus > 1 and not _fits(producer_gpus, most):
        raise PlacementError(
            f"cluster.producer_gpus ({producer_gpus:g}): a producer's GPUs must be on one node, and the largest "
            f"{where}node has {most:g}; lower cluster.producer_gpus to {most:g} or add a node with more GPUs")
    # Producers spread over several GPUs never share, nor does the evaluator then (it holds the whole model).
    spread = producer_gpus if producer_gpus > 1 else 0.0
    multi = (producers + evaluator) * spread
    own = multi or _gpus_for(producers, producer_gpus)
    wanted = own + ranks + (0 if spread else evaluator)
    if _fits(wanted, total):
        notes = ["every producer, rank and the evaluator has GPUs of its own"] if producers + ranks else []
        return producer_gpus, 1.0, max(spread, 1.0), notes
    rest = total - multi
    if not _fits(ranks, rest):
        parts = [f"{producer_gpus:g} per producer x {producers}"] if producers else []
        parts += [f"1 per trainer rank x {ranks}"] if ranks else []
        parts += [f"{max(spread, 1.0):g} for the splice evaluator"] if evaluator else []
        least = (f"{multi:g} for the producers and evaluator spread over several GPUs (they do not share) + "
                 f"{ranks} for the "
                 "trainer ranks" if multi else f"{ranks}, one per trainer rank (producers and the evaluator "
                                               "can share them)")
        fixes = [f"lower cluster.trainer_ranks to {int(rest)}" if rest >= 1 else None,
                 "lower cluster.producer_gpus" if multi else None,
                 "set training.splice_eval_tokens to 0 (no evaluator)" if evaluator and spread else None,
                 "add GPU nodes",
                 "or set cluster.use_gpu: no (CPU only)"]
        raise PlacementError(
            f"{wanted:g} GPUs needed ({', '.join(parts)}), and at the least {least}: NCCL needs a GPU of its own "
            f"for each trainer rank; the {where}cluster has {_summary(nodes)}; " + ", ".join(f for f in fixes if f))
    if spread:  # only the ranks' GPUs are left: each rank has one
        notes = [f"{wanted:g} GPUs: producers and the evaluator on {spread:g} GPUs each, one GPU per trainer rank"]
        return producer_gpus, 1.0, spread, notes
    sharers = producers + evaluator
    free = rest - ranks
    trainer = 1.0
    share = next((s for s in SHARES if _gpus_for(sharers, s) <= free + 1e-9), None)
    if share is None:  # all the sharers beside one trainer rank (packed onto one GPU, the first they fit on)
        trainer = TRAINER_SHARE
        share = next((s for s in SHARES if _fits(sharers * s, 1.0 - TRAINER_SHARE)), None)
        if share is None:
            raise PlacementError(
                f"{sharers} producers and evaluator cannot share the {where}cluster's {_summary(nodes)} with "
                f"{ranks} trainer rank(s); lower cluster.producers, set training.splice_eval_tokens to 0, or add "
                "GPU nodes")
    producer = min(share, producer_gpus)
    notes = [f"{wanted:g} GPUs would give everyone their own; sharing: producers and the evaluator get "
             f"{share:g} GPU each" + (f", trainer ranks {trainer:g} (more than half: one rank per GPU)"
                                      if trainer < 1 else "")]
    return producer, trainer, share, notes


def _pool(nodes: list[Node], name: str) -> list[Node]:
    tagged = [n for n in nodes if n.resources.get(name, 0) > 0]
    return tagged or nodes


def _uses_gpu(spec: JobSpec, nodes: list[Node], who: str) -> bool:
    gpus = sum(n.gpus for n in nodes)
    if spec.cluster.use_gpu == "no":
        return False
    if spec.cluster.use_gpu == "yes" and gpus == 0:
        raise PlacementError(f"cluster.use_gpu is yes, but the {who} nodes have no GPU ({len(nodes)} node(s)); "
                             "set cluster.use_gpu to auto or no, or add GPU nodes")
    return gpus > 0


def plan(spec: JobSpec, nodes: list[Node]) -> Plan:
    """The job's placement on these nodes; raises PlacementError when they cannot hold it."""
    if not nodes:
        raise PlacementError("the Ray cluster has no alive node; check cluster.ray_address / RAY_ADDRESS")
    c = spec.cluster
    from_cache = spec.data.cache.read is not None  # cache readers run no model: no GPU, no evaluator
    evaluates = spec.training.splice_eval_tokens > 0 and not from_cache
    producer_nodes, trainer_nodes = _pool(nodes, "producer"), _pool(nodes, "trainer")
    tags = {name: {name: POOL_UNIT} for name in POOLS if any(n.resources.get(name, 0) > 0 for n in nodes)}
    separate = not {id(n) for n in producer_nodes} & {id(n) for n in trainer_nodes}
    notes: list[str] = []
    producer_gpu = _uses_gpu(spec, producer_nodes, "producer") and not from_cache
    trainer_gpu = _uses_gpu(spec, trainer_nodes, "trainer")
    wanted = c.producer_gpus if producer_gpu else 0.0
    if separate:
        p_gpus, _, e_gpus, p_notes = _share_gpus(producer_nodes, c.producers if producer_gpu else 0, wanted, 0,
                                                 evaluates and producer_gpu, "producer ")
        _, t_gpus, _, t_notes = _share_gpus(trainer_nodes, 0, 0.0, c.trainer_ranks if trainer_gpu else 0, False,
                                            "trainer ")
        notes += [f"producer nodes: {n}" for n in p_notes] + [f"trainer nodes: {n}" for n in t_notes]
    else:
        pool = [n for n in nodes if any(n is m for m in (*producer_nodes, *trainer_nodes))]
        p_gpus, t_gpus, e_gpus, notes = _share_gpus(
            pool, c.producers if producer_gpu else 0, wanted, c.trainer_ranks if trainer_gpu else 0,
            evaluates and producer_gpu, "")
    p_gpus = p_gpus if producer_gpu else 0.0
    t_gpus = t_gpus if trainer_gpu else 0.0
    e_gpus = e_gpus if producer_gpu and evaluates else 0.0

    cpus_p = c.producers + evaluates
    have_p = sum(n.cpus for n in producer_nodes)
    if separate and not _fits(cpus_p, have_p) or not separate and not _fits(cpus_p + c.trainer_ranks,
                                                                            sum(n.cpus for n in nodes)):
        need = cpus_p if separate else cpus_p + c.trainer_ranks
        have = have_p if separate else sum(n.cpus for n in nodes)
        raise PlacementError(
            f"{need} CPUs needed (1 per producer x {c.producers}"
            + (", 1 for the splice evaluator" if evaluates else "")
            + ("" if separate else f", 1 per trainer rank x {c.trainer_ranks}")
            + f"); the {'producer nodes have' if separate else 'cluster has'} {have:g}; lower cluster.producers"
            + ("" if separate else " or cluster.trainer_ranks") + ", or add nodes")
    if separate and not _fits(c.trainer_ranks, sum(n.cpus for n in trainer_nodes)):
        raise PlacementError(f"{c.trainer_ranks} CPUs needed (1 per trainer rank); the trainer nodes have "
                             f"{sum(n.cpus for n in trainer_nodes):g}; lower cluster.trainer_ranks or add nodes")
    if tags:
        notes.append("custom resources: " + ", ".join(
            f"{name} ({sum(1 for n in nodes if n.resources.get(name, 0) > 0)} node(s))" for name in tags)
            + f"; each actor asks for {POOL_UNIT:g} of its pool's")
    if from_cache:
        notes.append("producers read an activation cache: no model, no GPU")
    producer = Request(1.0, p_gpus, tags.get("producer", {}))
    return Plan(c.producers, producer, c.trainer_ranks, Request(1.0, t_gpus, tags.get("trainer", {})),
                Request(1.0, e_gpus, tags.get("producer", {})) if evaluates else None, tuple(nodes), tuple(notes))


def trainers_see_cuda(placement: Plan, timeout: float = 300.0) -> bool:
    """Whether torch on a trainer node sees a CUDA device (nccl and bf16 then), asked in a task on such a node.

    The driver may run where there is no GPU (a CPU head node); and a cluster that advertises GPUs to Ray
    whose torch has no CUDA (tests, a CPU build) trains with gloo on the CPU.
    """
    if not placement.trainers_use_gpu:
        return False
    import ray

    @ray.remote(max_retries=0)
    def probe() -> bool:
        import torch

        return torch.cuda.is_available()

    return bool(ray.get(probe.options(**placement.trainer.options()).remote(), timeout=timeout))

