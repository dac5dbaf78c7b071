"""Shared fixtures: the repository root and a private service home per test session."""

import os
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
