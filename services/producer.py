"""Producer actor launch: the job's producers, model-backed (services/model_producer.py) or cache-backed
(services/cache_producer.py), as restartable Ray actors with their resource requests."""

from __future__ import annotations

import ray

from api.jobspec import JobSpec
from services.cache_producer import CacheProducer, open_cache_for
from services.model_producer import ActivationProducer
from services.placement import Request
from services.remote_code import ALLOW_REMOTE_CODE_ENV, check_remote_code

PRODUCER_MAX_RESTARTS = 4


def start_producers(spec: JobSpec, request: Request) -> list:
    """The job's producer actors (model or cache), restartable: Ray restarts a dead one and retries its calls.
    request: each producer's resources, from the job's placement plan (services/placement.py)."""
    n = spec.cluster.producers
    spec_json = spec.model_dump_json()
    options = {**request.options(), "max_restarts": PRODUCER_MAX_RESTARTS, "max_task_retries": PRODUCER_MAX_RESTARTS}
    if spec.data.cache.read is not None:
        cache = open_cache_for(spec)  # refuse a mismatching cache here, with its message, before any actor starts
        check_corpus_size(spec, cache.manifest["tokens"])
        actor = ray.remote(CacheProducer).options(**{**options, "num_gpus": 0})
    else:
        check_remote_code(spec.model)
        if spec.model.trust_remote_code:  # the producers check too: tell them what the server allowed
            options["runtime_env"] = {"env_vars": {ALLOW_REMOTE_CODE_ENV: "1"}}
        actor = ray.remote(ActivationProducer).options(**options)
    return [actor.remote(spec_json, i, n, epochs=spec.data.epochs) for i in range(n)]


def check_corpus_size(spec: JobSpec, corpus_tokens: int) -> None:
    """Refuse a job that asks for more tokens than data.epochs passes over a corpus of known size hold."""
    available = corpus_tokens * spec.data.epochs
    if spec.total_tokens > available:
        raise ValueError(f"training.tokens: the job trains on {spec.total_tokens:,} tokens but the corpus holds "
                         f"{corpus_tokens:,} tokens, {available:,} in data.epochs = {spec.data.epochs}; lower "
                         f"training.tokens to at most {available:,} or raise data.epochs to "
                         f"{-(-spec.total_tokens // corpus_tokens)}")
