"""The capacity check (api/capacity.py): the per-rank memory model against the figures benchmarks/README.md
measured, and the refusals with their numbers and fixes."""

from __future__ import annotations

import pytest

from api.capacity import GIB, Capacity, check_capacity, rank_memory
from api.jobspec import JobSpec

# benchmarks/README.md, "Sharded memory": peak RSS per rank while training, d = 576, 4,096-token batches, k = 32,
# ZeRO stage 0. Update these with the README when the trainer changes what it keeps (issue 13).
MEASURED = [(1_048_576, 2, 9.87), (65_536, 2, 1.33), (65_536, 1, 2.03)]


def spec(latents: int, shards: int = 1, ranks: int | None = None, **cluster) -> JobSpec:
    return JobSpec.model_validate({
        "dictionaries": [{"latents": latents, "k": 32}], "training": {"tokens": 10**6, "batch_tokens": 4096},
        "cluster": {"trainer_ranks": ranks or shards, "latent_shards": shards, "zero_stage": 0, **cluster}})


@pytest.mark.parametrize(("latents", "shards", "measured_gib"), MEASURED)
def test_the_memory_model_agrees_with_the_measured_peaks(latents, shards, measured_gib):
    estimate = sum(rank_memory(spec(latents, shards), 576).values()) / GIB
    # within 15% at the small size (the runtime baseline dominates there), within 3% at 1M latents
    tolerance = 0.03 if latents >= 1 << 20 else 0.15
    assert abs(estimate - measured_gib) <= tolerance * measured_gib, (estimate, measured_gib)


def test_the_terms_are_named_and_zero_partitions_the_optimizer_over_replicas():
    one = rank_memory(spec(65_536, 1, ranks=1, zero_stage=1), 576)
    four = rank_memory(spec(65_536, 1, ranks=4, zero_stage=1), 576)
    assert set(one) == {"parameters", "gradients", "optimizer_state", "activation_pools", "largest_temporary",
                        "runtime"}
    assert four["optimizer_state"] * 4 == one["optimizer_state"] and four["gradients"] == one["gradients"]


def test_a_dictionary_beyond_a_node_is_refused_with_the_numbers_and_the_fix():
    node = Capacity(cpus=64, gpus=0, rank_memory=24 * GIB, total_memory=8 * 24 * GIB, source="cluster")
    with pytest.raises(ValueError) as caught:
        check_capacity(spec(1_048_576 * 2), 576, node)
    message = str(caught.value)
    assert "needs ~36.7 GiB per trainer rank" in message and "trainer nodes have 24.0 GiB" in message, message
    assert "raise cluster.latent_shards to 2" in message, message
    check_capacity(spec(1_048_576 * 2, shards=2), 576, node)  # the fix it names fits


def test_a_budget_and_a_single_machine():
    budget = Capacity(cpus=None, gpus=None, rank_memory=2 * GIB, total_memory=None, source="budget")
    with pytest.raises(ValueError, match=r"this service allows 2.0 GiB per rank \(SAEFORGE_RANK_MEMORY_GIB\)"):
        check_capacity(spec(262_144), 576, budget)
    machine = Capacity(cpus=None, gpus=None, rank_memory=24 * GIB, total_memory=24 * GIB, source="machine")
    with pytest.raises(ValueError, match="lower latents"):  # no number of shards fits one machine's memory
        check_capacity(spec(1_048_576 * 4), 576, machine)


def test_more_producers_and_ranks_than_cpus_or_no_gpu():
    small = Capacity(cpus=4, gpus=0, rank_memory=None, total_memory=None, source="cluster")
    with pytest.raises(ValueError, match=r"need 6 CPUs; the cluster has 4"):
        check_capacity(spec(1024, **{"producers": 3, "trainer_ranks": 2}), 576, small)
    with pytest.raises(ValueError, match="no GPU"):
        check_capacity(spec(1024, use_gpu="yes"), 576, small)
    check_capacity(spec(1024), 576, small)
