"""The durable job store: one row per job, the source of truth for its state (SQLite by default, PostgreSQL
for a cluster: `postgresql+psycopg://user:password@host/db`).

States: queued → running → succeeded | failed | cancelled. Every transition is one conditional UPDATE
(``WHERE state IN (...)``) committed before anyone acts on it, so a process killed at any point leaves each
job in a state the scheduler can reconcile with Ray when the service starts again.

The running-jobs limit holds across API replicas on PostgreSQL: a claim (count the running jobs, move the
oldest queued one to running) runs in one transaction that first takes a transaction-scoped advisory lock
(`pg_advisory_xact_lock`), so claims of all replicas are serialized and each one counts the claims committed
before it; the lock goes with the transaction's commit or rollback, also when a replica dies mid-claim. A row
lock would not do: the claim must count rows, including ones another claim is just moving to running. SQLite
serves one replica (a thread lock orders its claims).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
CLAIM_LOCK_KEY = 0x5AEF0E6E  # the advisory lock of claims (any constant the database's other users do not take)
TERMINAL = ("succeeded", "failed", "cancelled")

metadata = MetaData()
jobs = Table(
    "jobs",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("owner", String(256), nullable=False, index=True),
    Column("name", String(64), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("spec", Text, nullable=False),
    Column("experiment", String(256), nullable=False),
    Column("output_uri", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("message", Text, nullable=True),
    Column("result", Text, nullable=True),  # JSON: the MLflow snapshot taken when the job ended
)


@dataclass
class Job:
    id: str
    owner: str
    name: str
    state: str
    spec: dict[str, Any]
    experiment: str
    output_uri: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    attempts: int
    cancel_requested: bool
    message: str | None
    result: dict[str, Any] | None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_row(cls, row: Any) -> Job:
        data = dict(row._mapping)
        data["spec"] = json.loads(data["spec"])
        data["result"] = json.loads(data["result"]) if data["result"] else None
        data["cancel_requested"] = bool(data["cancel_requested"])
        return cls(**data)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a committed transition survives a crash
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class JobStore:
    def __init__(self, url: str):
        parsed = make_url(url)
        self.sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"future": True, "pool_pre_ping": True}
        if self.sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self._claim_lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(select(1))
            return True
        except Exception:  # noqa: BLE001 - readiness only
            return False

    def create(self, job_id: str, owner: str, name: str, spec: dict[str, Any], experiment: str,
               output_uri: str | None) -> Job:
        now = time.time()
        with self.engine.begin() as connection:
            connection.execute(insert(jobs).values(
                id=job_id, owner=owner, name=name, state="queued", spec=json.dumps(spec), experiment=experiment,
                output_uri=output_uri, created_at=now, updated_at=now, attempts=0, cancel_requested=False))
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return Job.from_row(row) if row else None

    def list(self, owner: str | None = None, states: list[str] | None = None, limit: int = 50,
             offset: int = 0) -> tuple[list[Job], int]:
        query = select(jobs)
        count = select(func.count()).select_from(jobs)
        if owner is not None:
            query, count = query.where(jobs.c.owner == owner), count.where(jobs.c.owner == owner)
        if states:
            query, count = query.where(jobs.c.state.in_(states)), count.where(jobs.c.state.in_(states))
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id).limit(limit).offset(offset)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
            total = connection.execute(count).scalar_one()
        return [Job.from_row(r) for r in rows], int(total)

    def in_state(self, *states: str) -> list[Job]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(jobs).where(jobs.c.state.in_(states)).order_by(jobs.c.created_at)).all()
        return [Job.from_row(r) for r in rows]

    def count(self, *states: str) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(
                select(func.count()).select_from(jobs).where(jobs.c.state.in_(states))).scalar_one())

    def transition(self, job_id: str, from_states: tuple[str, ...], to_state: str, **values: Any) -> bool:
        """Move a job to to_state if it is in one of from_states; False when it was not (someone else moved it)."""
        now = time.time()
        values = dict(values)
        if "result" in values and values["result"] is not None:
            values["result"] = json.dumps(values["result"])
        if to_state == "running":
            values.setdefault("started_at", now)
        if to_state in TERMINAL:
            values.setdefault("finished_at", now)
        with self.engine.begin() as connection:
            done = connection.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state.in_(from_states))
                .values(state=to_state, updated_at=now, **values))
        return done.rowcount == 1

    def claim_next(self, max_running: int) -> Job | None:
        """The oldest queued job, moved to running, if fewer than max_running run now; None otherwise."""
        with self._claim_lock, self.engine.begin() as connection:
            if self.engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=CLAIM_LOCK_KEY))
            running = connection.execute(
                select(func.count()).select_from(jobs).where(jobs.c.state == "running")).scalar_one()
            if running >= max_running:
                return None
            row = connection.execute(select(jobs.c.id, jobs.c.attempts).where(jobs.c.state == "queued")
                                     .order_by(jobs.c.created_at, jobs.c.id).limit(1)).first()
            if row is None:
                return None
            now = time.time()
            done = connection.execute(
                update(jobs).where(jobs.c.id == row.id, jobs.c.state == "queued")
                .values(state="running", started_at=now, updated_at=now, attempts=row.attempts + 1, message=None))
            if done.rowcount != 1:
                return None
        return self.get(row.id)

    def output_uris(self, exclude_owner: str) -> list[str]:
        """The output folders of every other owner's jobs (owner isolation of places)."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(jobs.c.output_uri).where(jobs.c.owner != exclude_owner,
                                                                      jobs.c.output_uri.is_not(None))).all()
        return [r.output_uri for r in rows]

    def request_cancel(self, job_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running")
                               .values(cancel_requested=True, updated_at=time.time()))
