"""The job store and the scheduler's bookkeeping, with a fake Ray (fast: no Ray, no server)."""

import threading
import time

import pytest

from api.rayjobs import RayJobInfo, RayUnavailable
from api.scheduler import Scheduler, entrypoint
from api.settings import Settings, SettingsError, parse_tokens
from api.store import JobStore


@pytest.fixture
def store(tmp_path):
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def _create(store, job_id, owner="alice", experiment="e"):
    return store.create(job_id, owner, "n", {"name": "n", "training": {"tokens": 2048, "batch_tokens": 1024}},
                        experiment, None)


def test_create_get_list_filter_and_page(store):
    for i in range(5):
        _create(store, f"job-{i}", owner="alice" if i % 2 == 0 else "bob")
    job = store.get("job-0")
    assert job.state == "queued" and job.owner == "alice" and job.spec["name"] == "n" and job.attempts == 0
    assert store.get("nope") is None
    jobs, total = store.list(owner="alice")
    assert total == 3 and {j.id for j in jobs} == {"job-0", "job-2", "job-4"}
    page, total = store.list(owner="alice", limit=2, offset=2)
    assert total == 3 and len(page) == 1
    assert store.list(owner="alice", states=["running"]) == ([], 0)


def test_transitions_are_conditional_and_stamped(store):
    _create(store, "a")
    assert store.transition("a", ("queued",), "running")
    assert not store.transition("a", ("queued",), "cancelled")  # no longer queued
    assert store.transition("a", ("running",), "succeeded", result={"run_id": "r"})
    job = store.get("a")
    assert job.state == "succeeded" and job.terminal and job.result == {"run_id": "r"}
    assert job.started_at is not None and job.finished_at >= job.started_at


def test_state_survives_reopening_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = JobStore(url)
    _create(first, "a")
    first.claim_next(1)
    first.close()
    second = JobStore(url)
    job = second.get("a")
    assert job.state == "running" and job.attempts == 1
    second.close()


def test_claims_never_exceed_the_limit_even_from_many_threads(store):
    for i in range(20):
        _create(store, f"job-{i:02d}")
    claimed = []

    def claim():
        for _ in range(5):
            job = store.claim_next(3)
            if job:
                claimed.append(job.id)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 3 == store.count("running")
    # oldest first: the three oldest were claimed (the threads append after the claim, so not in claim order)
    assert sorted(claimed) == ["job-00", "job-01", "job-02"]


def test_postgresql_claims_hold_the_limit_across_replicas(postgres):
    """Eight API replicas' stores (each its own engine and connections) on one real PostgreSQL claim at once:
    the advisory lock lets no more than the limit run, whatever the interleaving; jobs that finish free places
    that the others then take, still never more than the limit at once."""
    postgres.create_database("claims")
    url = postgres.url("claims")
    stores = [JobStore(url) for _ in range(8)]
    for i in range(24):
        _create(stores[0], f"job-{i:02d}")
    claimed: list[str] = []
    peaks: list[int] = []
    lock = threading.Lock()

    def replica(store: JobStore) -> None:
        for _ in range(12):
            job = store.claim_next(3)
            if job is None:
                time.sleep(0.01)
                continue
            with lock:
                claimed.append(job.id)
            peaks.append(store.count("running"))
            store.transition(job.id, ("running",), "succeeded")

    threads = [threading.Thread(target=replica, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(peaks) <= 3, peaks
    assert len(claimed) == len(set(claimed)) and claimed  # no job claimed twice
    assert stores[0].count("running") == 0 and stores[0].count("succeeded") == len(claimed)
    for store in stores:
        store.close()


class FakeRay:
    def __init__(self):
        self.jobs: dict[str, str] = {}
        self.down = False
        self.submitted: list[str] = []
        self.stopped: list[str] = []

    def submit(self, job_id, entrypoint, env):
        if self.down:
            raise RayUnavailable("down")
        assert "--job-id" in entrypoint and env["MLFLOW_TRACKING_URI"].startswith("sqlite:")
        self.jobs.setdefault(job_id, "RUNNING")
        self.submitted.append(job_id)

    def info(self, job_id):
        if self.down:
            raise RayUnavailable("down")
        status = self.jobs.get(job_id)
        return None if status is None else RayJobInfo(status, f"Job {status.lower()}")

    def stop(self, job_id):
        self.stopped.append(job_id)
        if self.jobs.get(job_id) == "RUNNING":
            self.jobs[job_id] = "STOPPED"
            return True
        return False

    def logs(self, job_id):
        return "line\nValueError: hook.layer (9) is beyond the model\n"


class NoMlflow:
    def get_experiment_by_name(self, name):
        return None


@pytest.fixture
def scheduler(store, tmp_path):
    settings = Settings.from_env({"SAEFORGE_HOME": str(tmp_path), "SAEFORGE_MAX_RUNNING_JOBS": "2",
                                  "SAEFORGE_RAY_ADDRESS": "http://127.0.0.1:1"})
    return Scheduler(settings, store, FakeRay(), NoMlflow())


def test_scheduler_keeps_at_most_max_running_and_maps_ray_states(scheduler, store):
    for i in range(4):
        _create(store, f"j{i}")
    scheduler.tick()
    assert scheduler.ray.submitted == ["j0", "j1"] and store.count("running") == 2 and store.count("queued") == 2
    scheduler.ray.jobs["j0"] = "SUCCEEDED"
    scheduler.ray.jobs["j1"] = "FAILED"
    scheduler.tick()
    assert store.get("j0").state == "succeeded"
    failed = store.get("j1")
    assert failed.state == "failed" and "beyond the model" in failed.message
    assert scheduler.ray.submitted == ["j0", "j1", "j2", "j3"]


def test_ray_down_leaves_jobs_queued_and_a_lost_job_is_resubmitted(scheduler, store):
    _create(store, "a")
    scheduler.ray.down = True
    with pytest.raises(RayUnavailable):
        scheduler.tick()
    job = store.get("a")
    assert job.state == "queued" and job.attempts == 0 and "waiting for Ray" in job.message
    scheduler.ray.down = False
    scheduler.tick()
    assert store.get("a").state == "running"
    scheduler.ray.jobs.clear()  # a new Ray cluster that never heard of it
    scheduler.tick()  # just claimed: perhaps another replica is submitting it right now
    assert store.get("a").attempts == 1 and scheduler.ray.submitted == ["a"]
    scheduler.submit_grace_s = 0  # ... once the grace is over it is lost, and submitted again
    scheduler.tick()
    job = store.get("a")
    assert job.state == "running" and job.attempts == 2 and scheduler.ray.submitted == ["a", "a"]


def test_cancel_queued_and_running(scheduler, store):
    _create(store, "q")
    _create(store, "r")
    store.claim_next(1)  # q runs
    scheduler.ray.jobs["q"] = "RUNNING"
    scheduler.cancel(store.get("r"))
    assert store.get("r").state == "cancelled"
    scheduler.cancel(store.get("q"), wait_s=1)
    job = store.get("q")
    assert job.state == "cancelled" and job.cancel_requested and "checkpoints" in job.message
    assert scheduler.ray.stopped == ["q"]


def test_entrypoint_quotes_the_spec():
    job = type("J", (), {"id": "x-1", "spec": {"name": "it's"}})()
    command = entrypoint("saeforge", job)
    assert command.startswith("saeforge run --quiet --resume-if-checkpointed --job-id x-1 --spec-json ")
    import shlex

    assert shlex.split(command)[-1] == '{"name": "it\'s"}'


def test_credentials_in_the_tracking_uri_stay_out_of_the_ray_job(store, tmp_path):
    settings = Settings.from_env({"SAEFORGE_HOME": str(tmp_path), "SAEFORGE_RAY_ADDRESS": "http://127.0.0.1:1",
                                  "MLFLOW_TRACKING_URI": "postgresql://user:pw@db/mlflow"})
    seen = {}

    class Ray(FakeRay):
        def submit(self, job_id, entrypoint, env):
            seen.update(env)

    _create(store, "a")
    Scheduler(settings, store, Ray(), NoMlflow()).tick()
    assert "MLFLOW_TRACKING_URI" not in seen and seen["SAEFORGE_HOME"] == str(tmp_path.resolve())


def test_token_settings(tmp_path):
    assert parse_tokens('{"t1": "alice"}', "x") == {"t1": "alice"}
    assert parse_tokens("t1:alice, t2:bob", "x") == {"t1": "alice", "t2": "bob"}
    with pytest.raises(SettingsError):
        parse_tokens("no-owner", "x")
    file = tmp_path / "tokens.json"
    file.write_text('{"f": "carol"}')
    settings = Settings.from_env({"SAEFORGE_HOME": str(tmp_path), "SAEFORGE_TOKENS_FILE": str(file),
                                  "SAEFORGE_TOKENS": "e:dave", "SAEFORGE_MODEL_ROOTS": f"{tmp_path},/opt/m"})
    assert settings.tokens == {"f": "carol", "e": "dave"}
    assert settings.paths.model_roots == (str(tmp_path.resolve()), "/opt/m")
    assert settings.database_url.endswith("saeforge.db")
    assert "carol" not in repr(settings)  # secrets stay out of logs
    with pytest.raises(SettingsError):
        Settings.from_env({"SAEFORGE_MAX_RUNNING_JOBS": "0"})
