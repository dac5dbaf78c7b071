"""The placement plan on described clusters: who gets which GPUs, sharing on small nodes, refusals with numbers."""

import pytest

from api.jobspec import JobSpec
from services.placement import TRAINER_SHARE, Node, PlacementError, plan


def spec(cluster: dict | None = None, **sections) -> JobSpec:
    return JobSpec.model_validate({"cluster": cluster or {}, **sections})


def per_gpu_load(p, gpus: int, ranks_first: bool = False) -> list[float]:
    """What Ray does with the requests (seen on a real Ray: two 0.4 requests on a 2-GPU node share GPU 0): a
    fractional request goes to the first GPU it fits on, a whole one to free GPUs."""
    load = [0.0] * gpus
    sharers = [p.producer.gpus] * p.producers + ([p.evaluator.gpus] if p.evaluator else [])
    ranks = [p.trainer.gpus] * p.trainer_ranks
    for need in ranks + sharers if ranks_first else sharers + ranks:
        if need == 0:
            continue
        if need >= 1:
            free = [i for i, used in enumerate(load) if used == 0][:int(need)]
            assert len(free) == int(need), f"no {need} free GPUs for a request: {load}"
            for i in free:
                load[i] = 1.0
            continue
        i = next((i for i, used in enumerate(load) if used + need <= 1 + 1e-9), None)
        assert i is not None, f"a {need} request fits no GPU: {load}"
        load[i] += need
    return load


def test_cpu_cluster_plans_no_gpu():
    p = plan(spec(), [Node(8, 0)])
    assert (p.producer.gpus, p.trainer.gpus, p.evaluator.gpus) == (0, 0, 0)
    assert not p.trainers_use_gpu


def test_one_gpu_node_runs_the_default_job_on_that_gpu():
    p = plan(spec(), [Node(16, 1)])
    assert p.trainer.gpus == TRAINER_SHARE > 0.5  # two ranks can never share a GPU
    assert p.producer.gpus > 0 and p.evaluator.gpus > 0
    assert p.gpus_requested <= 1 + 1e-9
    per_gpu_load(p, 1)


def test_enough_gpus_give_everyone_their_own():
    p = plan(spec({"trainer_ranks": 2}), [Node(16, 4)])
    assert (p.producer.gpus, p.trainer.gpus, p.evaluator.gpus) == (1, 1, 1)
    assert per_gpu_load(p, 4) == [1.0] * 4


@pytest.mark.parametrize("gpus,cluster", [(2, {}), (2, {"trainer_ranks": 2}), (3, {"producers": 3}),
                                          (2, {"producers": 2, "trainer_ranks": 2})])
def test_sharing_fits_whatever_ray_places_first(gpus, cluster):
    p = plan(spec(cluster), [Node(16, gpus)])
    for ranks_first in (False, True):
        assert sum(per_gpu_load(p, gpus, ranks_first)) <= gpus + 1e-9


def test_more_ranks_than_gpus_is_refused_with_the_numbers():
    with pytest.raises(PlacementError) as refused:
        plan(spec({"trainer_ranks": 2}), [Node(16, 1)])
    message = str(refused.value)
    assert "4 GPUs needed (1 per producer x 1, 1 per trainer rank x 2, 1 for the splice evaluator)" in message
    assert "1 GPUs in all" in message and "lower cluster.trainer_ranks to 1" in message


def test_multi_gpu_producers_take_whole_gpus_on_one_node():
    p = plan(spec({"producer_gpus": 2}), [Node(16, 5)])
    assert (p.producer.gpus, p.evaluator.gpus, p.trainer.gpus) == (2, 2, 1)
    with pytest.raises(PlacementError, match="the largest node has 1"):
        plan(spec({"producer_gpus": 2}), [Node(8, 1), Node(8, 1), Node(8, 1)])
    with pytest.raises(PlacementError, match="lower cluster.producer_gpus"):
        plan(spec({"producer_gpus": 2}), [Node(16, 3)])


def test_producer_gpus_beyond_one_must_be_whole():
    with pytest.raises(ValueError, match="cluster.producer_gpus .1.5.: more than one GPU must be a whole number"):
        spec({"producer_gpus": 1.5})


def test_custom_resources_pin_producers_and_trainers_to_their_pools():
    nodes = [Node(2, 0), Node(4, 1, {"producer": 1}), Node(8, 4, {"trainer": 1})]
    p = plan(spec({"trainer_ranks": 2}), nodes)
    assert p.producer.resources == {"producer": 0.01} and p.evaluator.resources == {"producer": 0.01}
    assert p.trainer.resources == {"trainer": 0.01}
    assert (p.trainer.gpus, p.producer.gpus, p.evaluator.gpus) == (1, 0.5, 0.5)  # the producer node's one GPU
    assert p.scaling_config().resources_per_worker == {"CPU": 1.0, "GPU": 1.0, "trainer": 0.01}
    with pytest.raises(PlacementError, match="the trainer cluster has 1 node"):
        plan(spec({"trainer_ranks": 8}), nodes)


def test_use_gpu_yes_without_gpus_and_too_few_cpus_are_refused():
    with pytest.raises(PlacementError, match="cluster.use_gpu is yes"):
        plan(spec({"use_gpu": "yes"}), [Node(8, 0)])
    with pytest.raises(PlacementError, match=r"5 CPUs needed \(1 per producer x 2, 1 for the splice evaluator, "
                                             r"1 per trainer rank x 2\); the cluster has 4"):
        plan(spec({"producers": 2, "trainer_ranks": 2}), [Node(4, 0)])


def test_use_gpu_no_and_cache_readers_ask_for_no_gpu(tmp_path):
    assert plan(spec({"use_gpu": "no"}), [Node(8, 2)]).gpus_requested == 0
    p = plan(spec(data={"cache": {"read": str(tmp_path)}}), [Node(8, 2)])
    assert p.producer.gpus == 0 and p.evaluator is None and p.trainer.gpus == 1


def test_describe_names_every_actor_and_the_share():
    text = plan(spec(), [Node(16, 1)]).describe()
    for part in ("producers         1 x {CPU 1, GPU 0.2}", "trainer ranks     1 x {CPU 1, GPU 0.6}",
                 "splice evaluator  1 x {CPU 1, GPU 0.2}", "requested         1 of 1 GPUs"):
        assert part in text, text
