"""Shared fixtures: the repository root and a private service home per test session."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def _quiet_local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto), with fake credentials; returns its URL.

    AWS_ENDPOINT_URL points botocore (and so s3fs and every `s3://` URI the service opens) at it for the rest
    of the session; buckets are the tests' to create (names of 3+ characters).
    """
    from moto.server import ThreadedMotoServer

    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in [*fake, "AWS_ENDPOINT_URL"]}
    os.environ.update(fake, AWS_ENDPOINT_URL=url)
    try:
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


# --- PostgreSQL ---------------------------------------------------------------------------------------------
class Postgres:
    """A private PostgreSQL server for the job store and MLflow tests (Debian's `postgresql`, installed by
    .ci/run) on loopback, on a free port, its socket in its own folder, run as a non-root user (PostgreSQL
    refuses to run as root). Trust authentication on loopback: a throw-away server for one test session."""

    def __init__(self):
        found = shutil.which("pg_ctl") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))), None)
        if found is None:
            raise AssertionError("PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does)")
        self.bin = Path(found).resolve().parent
        self.base = Path(tempfile.mkdtemp(prefix="saeforge-pg-"))  # not under pytest's root-only tmp folders
        self.data, self.socket = self.base / "data", self.base / "socket"
        self.socket.mkdir()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.user = "saeforge"
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.run_as:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.socket, "postgres")
        self.log = self.base / "postgres.log"

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self.run_as, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command[0]} failed: {done.stdout}{done.stderr}"

    def start(self) -> "Postgres":
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        options = f"-p {self.port} -k {self.socket} -h 127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log), "-w",
                  "start")
        return self

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')

    def url(self, database: str) -> str:
        """SQLAlchemy URL with no user@ in its authority (libpq keywords instead), so the scheduler passes an
        MLflow URI of this form on to the Ray jobs (it keeps URIs with credentials out of them)."""
        return f"postgresql+psycopg:///{database}?host=127.0.0.1&port={self.port}&user={self.user}"

    def stop(self) -> None:
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    server = Postgres().start()
    yield server
    server.stop()
