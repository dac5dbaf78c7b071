"""The attack suite: a live `saeforge serve` (a real server process on loopback, a real local Ray) driven with
hostile and careless input, as a stranger sharing the service would send it. Each case asserts the status (the
class at least, the exact code where the API documents one), and at the end: no answer was a 5xx, the server
logged no traceback, and nothing was written outside the configured roots.

Accepted jobs run a no-op command on Ray (they cost nothing); the job runner's own check of the same policy is
driven for real at the end through `saeforge run`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import ALICE, BOB, TINY_MODEL, ApiServer, wait_for

pytestmark = pytest.mark.slow

TINY = {"name": "tiny", "model": TINY_MODEL, "hook": {"layer": 1}, "dictionaries": [{"latents": 64, "k": 4}],
        "training": {"tokens": 2048, "batch_tokens": 1024}}
STATUSES: list[int] = []


def snapshot(root: Path, skip: tuple[Path, ...]) -> set[str]:
    """Every path under root (not following symlinks) outside the folders in skip."""
    found = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        found |= {str(here / n) for n in dirs + files}
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory, ray_address):
    base = tmp_path_factory.mktemp("abuse")
    for name in ("models", "data", "out", "elsewhere", "home"):
        (base / name).mkdir()
    (base / "data" / "corpus.txt").write_text("Some text for a tiny job.\n" * 20)
    (base / "data" / "données-α.txt").write_text("Unicode names are fine.\n" * 20)
    (base / "elsewhere" / "secret.txt").write_text("not for jobs")
    (base / "data" / "link.txt").symlink_to(base / "elsewhere" / "secret.txt")
    (base / "data" / "linked-folder").symlink_to(base / "elsewhere")
    (base / "out" / "escape").symlink_to(base / "elsewhere")
    server = ApiServer(base / "home", {
        "SAEFORGE_RAY_ADDRESS": ray_address, "SAEFORGE_MAX_RUNNING_JOBS": "2",
        "SAEFORGE_JOB_COMMAND": f"{sys.executable} -c pass",
        "SAEFORGE_MODEL_ROOTS": str(base / "models"), "SAEFORGE_DATA_ROOTS": str(base / "data"),
        "SAEFORGE_OUTPUT_ROOT": str(base / "out"),
        "SAEFORGE_S3_PREFIXES": "read:s3://corpora/public,write:s3://team/scratch",
        "SAEFORGE_RANK_MEMORY_GIB": "4", "SAEFORGE_MAX_TOKENS": "100000000"})
    before = snapshot(base, skip=(base / "out", base / "home"))
    server.start()
    yield base, server
    server.stop()
    after = snapshot(base, skip=(base / "out", base / "home"))
    assert after == before, f"written outside the roots: {sorted(after - before)}"
    assert not list((base / "elsewhere").iterdir()) or sorted(p.name for p in (base / "elsewhere").iterdir()) == [
        "secret.txt"]
    log = server.log.read_text()
    assert "Traceback" not in log and " 500 " not in log, log[-5000:]


def post(server: ApiServer, body, headers=None, raw: bytes | None = None, **kwargs) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        if raw is not None:
            response = client.post("/v1/jobs", content=raw, headers={**ALICE, **(headers or {})}, **kwargs)
        else:
            response = client.post("/v1/jobs", json=body, headers={**ALICE, **(headers or {})}, **kwargs)
    STATUSES.append(response.status_code)
    return response


def spec(**sections) -> dict:
    data = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) and isinstance(data.get(key), dict) \
            else value
    return data


def expect(response: httpx.Response, code: int, *words: str) -> None:
    assert response.status_code == code, (code, response.status_code, response.text[:1500])
    for word in words:
        assert word in response.text, (word, response.text[:1500])


# --- places ---------------------------------------------------------------------------------------------------
def place_cases(base: Path) -> list[tuple[str, dict, int, tuple[str, ...]]]:
    out, data, elsewhere = base / "out", base / "data", base / "elsewhere"
    return [
        ("model outside its root", spec(model={"name": "/etc"}), 403, ("model.name", "rule: local-root")),
        ("model missing outside its root: same answer", spec(model={"name": "/etc/no-such-model"}), 403,
         ("rule: local-root",)),
        ("model in the data root", spec(model={"name": str(data)}), 403, ("model.name",)),
        ("dot-dot out of the data root", spec(data={"source": str(data / ".." / "elsewhere" / "secret.txt")}), 403,
         ("data.source", "rule: no-dotdot")),
        ("relative dot-dot", spec(data={"source": "../elsewhere/secret.txt"}), 403, ("rule: no-dotdot",)),
        ("symlink out of the data root", spec(data={"source": str(data / "link.txt")}), 403, ("rule: local-root",)),
        ("through a linked folder", spec(data={"source": str(data / "linked-folder" / "secret.txt")}), 403,
         ("rule: local-root",)),
        ("glob that matches a symlink", spec(data={"source": str(data / "*.txt")}), 403, ("rule: local-root",)),
        ("home folder", spec(data={"source": "~/.bashrc"}), 403, ("rule: local-root",)),
        ("another user's home", spec(data={"source": "~root/.bashrc"}), 403, ("rule: local-root",)),
        ("file URI outside", spec(data={"source": "file:///etc/passwd"}), 403, ("rule: local-root",)),
        ("file URI with a host", spec(data={"source": "file://localhost/etc/passwd"}), 403,
         ("rule: file-uri-absolute",)),
        ("NUL in a path", spec(data={"source": str(data / "corpus.txt") + "\x00.png"}), 422, ("NUL",)),
        ("newline in a path", spec(data={"source": str(data / "corpus\n.txt")}), 403,
         ("rule: no-control-characters",)),
        ("http scheme", spec(data={"source": "http://169.254.169.254/latest/meta-data"}), 403, ("rule: scheme",)),
        ("fsspec chain", spec(data={"source": "simplecache::s3://corpora/public/x.jsonl"}), 403, ("rule: scheme",)),
        ("memory scheme", spec(output={"uri": "memory://x"}), 403, ("output.uri", "rule: scheme")),
        ("upper-case S3", spec(data={"source": "S3://corpora/public/x.jsonl"}), 403, ("rule: scheme",)),
        ("s3a scheme", spec(data={"source": "s3a://corpora/public/x.jsonl"}), 403, ("rule: scheme",)),
        ("s3 outside the prefixes", spec(data={"source": "s3://private/x.jsonl"}), 403, ("rule: s3-prefix",)),
        ("s3 prefix is a whole segment", spec(data={"source": "s3://corpora/publicity/x.jsonl"}), 403,
         ("rule: s3-prefix",)),
        ("s3 dot-dot", spec(data={"source": "s3://corpora/public/../private/x"}), 403, ("rule: s3-uri-shape",)),
        ("s3 empty segment", spec(data={"source": "s3://corpora/public//x"}), 403, ("rule: s3-uri-shape",)),
        ("s3 write to a read-only prefix", spec(output={"uri": "s3://corpora/public/out"}), 403,
         ("output.uri", "rule: s3-prefix")),
        ("cache written outside", spec(data={"cache": {"write": str(elsewhere / "cache")}}), 403,
         ("data.cache.write", "rule: local-root")),
        ("cache written into the data root", spec(data={"cache": {"write": str(data / "cache")}}), 403,
         ("data.cache.write",)),
        ("cache read outside", spec(data={"cache": {"read": "/var/cache"}}), 403, ("data.cache.read",)),
        ("cache to an s3 read-only prefix", spec(data={"cache": {"write": "s3://corpora/public/c"}}), 403,
         ("data.cache.write", "rule: s3-prefix")),
        ("output outside", spec(output={"uri": "/tmp/saeforge-abuse-output"}), 403, ("output.uri",)),
        ("output through a symlink", spec(output={"uri": str(out / "escape" / "job")}), 403, ("rule: local-root",)),
        ("output glob", spec(output={"uri": str(out / "*")}), 403, ("rule: no-glob",)),
        ("hub model id, roots and no SAEFORGE_HUB_ALLOW", spec(model={"name": "HuggingFaceTB/SmolLM2-135M"}), 403,
         ("model.name", "SAEFORGE_HUB_ALLOW", "rule: hub-allow")),
        ("hub dataset id at a revision", spec(data={"source": "monology/pile-uncopyrighted@main"}), 403,
         ("data.source", "SAEFORGE_HUB_ALLOW", "rule: hub-allow")),
    ]


def test_every_place_outside_the_policy_is_refused(site):
    base, server = site
    for name, body, code, words in place_cases(base):
        response = post(server, body)
        assert response.status_code == code, (name, response.status_code, response.text[:800])
        for word in words:
            assert word in response.text, (name, word, response.text[:800])
    assert not Path("/tmp/saeforge-abuse-output").exists()


def test_places_inside_the_policy_are_accepted(site):
    base, server = site
    for body in (spec(data={"source": "corpus.txt"}),  # relative: under the first data root
                 spec(data={"source": str(base / "data" / "données-α.txt")}),
                 spec(data={"source": "s3://corpora/public/web.jsonl"}),  # S3 with local roots (issue 17's bug)
                 spec(output={"uri": "s3://team/scratch/alice/job-1"}),
                 spec(data={"cache": {"write": str(base / "out" / "alice-cache")}}),
                 spec(output={"uri": f"file://{base / 'out' / 'alice-named'}"})):
        response = post(server, body)
        expect(response, 201)
    job = response.json()
    assert job["output_uri"] == str(base / "out" / "alice-named") and job["spec"]["output"]["uri"] == job["output_uri"]


def test_other_owners_jobs_and_folders(site):
    base, server = site
    alice_job = post(server, spec(name="alice-own")).json()
    folder = alice_job["output_uri"]
    assert folder.startswith(str(base / "out"))
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "notes.txt").write_text("alice's notes")  # what bob's glob would read
    with server.client(BOB) as bob:
        for method, path in (("GET", f"/v1/jobs/{alice_job['id']}"), ("POST", f"/v1/jobs/{alice_job['id']}/cancel"),
                             ("GET", f"/v1/jobs/{alice_job['id']}/logs")):
            response = bob.request(method, path)
            STATUSES.append(response.status_code)
            expect(response, 403, "another owner")
        listing = bob.get("/v1/jobs").json()
        assert all(j["owner"] == "bob" for j in listing["items"])
    for body in (spec(output={"uri": folder}), spec(output={"uri": folder + "/exports"}),
                 spec(output={"uri": str(base / "out")}),  # above every job folder
                 spec(data={"source": folder + "/d"}), spec(data={"cache": {"read": folder}}),
                 spec(data={"source": str(base / "out" / "*-*" / "notes.txt")})):  # a glob over job folders
        response = post(server, body, headers=BOB)
        expect(response, 403, "rule: other-owner")
    expect(post(server, spec(output={"uri": folder + "/more"})), 201)  # her own folder: hers to use


def test_sizes_the_cluster_cannot_hold_are_refused_with_numbers(site):
    _base, server = site
    huge = spec(dictionaries=[{"latents": 2**26, "k": 32}])
    response = post(server, huge)
    expect(response, 400, "needs ~", "GiB per trainer rank", "SAEFORGE_RANK_MEMORY_GIB", "latent_shards")
    expect(post(server, spec(cluster={"producers": 64})), 400, "CPUs")
    expect(post(server, spec(training={"tokens": 10**9, "batch_tokens": 1024})), 400, "SAEFORGE_MAX_TOKENS")
    expect(post(server, spec(training={"tokens": 10**40, "batch_tokens": 1024})), 422, "training.tokens")
    expect(post(server, spec(dictionaries=[{"latents": 2**40, "k": 4}])), 422, "latents")
    expect(post(server, spec(cluster={"trainer_ranks": 10**6})), 422, "trainer_ranks")
    expect(post(server, spec(training={"seed": -1, "tokens": 2048, "batch_tokens": 1024})), 422, "seed")
    expect(post(server, spec(model={"random": {**TINY_MODEL["random"], "hidden_size": 10**9}})), 422)
    expect(post(server, spec(cluster={"use_gpu": "yes"})), 400, "no GPU")


def test_bodies_the_parser_cannot_take_are_4xx(site):
    _base, server = site
    raw_cases = [b"", b"{", b"null", b"[]", b"42", b'"a string"', b"{'single': 'quotes'}", b'{"a": NaN}',
                 b'{"training": {"lr": Infinity}}', b"\xff\xfe{}", "\ufeff{}".encode(), b"[" * 100_000,
                 b'{"a":' * 50_000, b'{"tags": "\\ud800"}', b'{"name": "\\u0000"}', b"1" * 5000,
                 b'{"training": {"tokens": ' + b"9" * 5000 + b"}}", b"\x00\x00\x00",
                 "{\"name\": \"\u202egnp.exe\"}".encode()]
    for raw in raw_cases:
        response = post(server, None, raw=raw, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (raw[:40], response.status_code, response.text[:400])
    expect(post(server, None, raw=b"x" * (2 << 20)), 413)
    assert _declared_too_large(server) == 413  # refused on its Content-Length, before the body is read

    def chunks():
        for _ in range(40):
            yield b" " * 65_536

    expect(_chunked(server, chunks()), 413)  # no Content-Length: reading stops at the limit
    for body in ({"training": {"tokens": "many"}}, {"dictionaries": {"k": 4}}, {"dictionaries": [4]},
                 {"model": []}, {"name": 42}, {"name": "ジョブ"}, {"name": "../../etc"}, {"tracking": {"tags": [1]}},
                 {"tracking": {"tags": {"k" * 300: "v"}}}, {"unknown": 1}, {"model": {"random": {"x": 1}}},
                 {"hook": {"layer": -1}}, {"hook": {"site": "resid_pre; rm -rf /"}}, {"training": {"tokens": True}},
                 {"dictionaries": []}, {"tracking": {"experiment": ""}}, {"tracking": {"experiment": "e" * 300}}):
        response = post(server, body)
        assert response.status_code == 422, (body, response.status_code, response.text[:400])
        assert response.json()["message"], response.text
    expect(post(server, spec(model={"trust_remote_code": True})), 403, "trust_remote_code")
    expect(post(server, spec(cluster={"ray_address": "ray://attacker:10001"})), 400, "cluster.ray_address")
    # unicode where it is allowed: an experiment name and tags
    expect(post(server, spec(tracking={"experiment": "实验 🚀", "tags": {"note": "naïve café"}})), 201)
    # a JSON body sent as text/plain or form data is judged by its content, not its label
    expect(post(server, None, raw=json.dumps(TINY).encode(), headers={"content-type": "text/plain"}), 201)
    assert 400 <= post(server, None, raw=b"a=1&b=2",
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code < 500


def _declared_too_large(server: ApiServer) -> int:
    """A request that declares a 10 MiB body and sends 2 bytes (a client library would not send it)."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer token-alice\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 10485760\r\n\r\n{}")
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    STATUSES.append(int(status_line.split()[1]))
    return STATUSES[-1]


def _chunked(server: ApiServer, body) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post("/v1/jobs", content=body, headers={**ALICE, "content-type": "application/json"})
    STATUSES.append(response.status_code)
    return response


def test_header_and_route_games(site):
    _base, server = site
    with httpx.Client(base_url=server.url, timeout=60) as client:
        cases = [
            ({}, 401), ({"Authorization": "Bearer"}, 401), ({"Authorization": "Bearer \t-"}, 401),
            ({"Authorization": "Basic dG9rZW4tYWxpY2U6"}, 401), ({"Authorization": "Token token-alice"}, 401),
            ({"Authorization": "Bearer token-alice-but-longer"}, 401), ({"Authorization": "Bearer token-alic"}, 401),
            ({"Authorization": "Bearer " + "a" * 8000}, 401), ({"X-Forwarded-User": "alice"}, 401),
            ({"Authorization": "Bearer TOKEN-ALICE"}, 401), ({"Authorization": "bearer token-alice"}, 200),
            ({"Authorization": "Bearer  token-alice"}, 200),
        ]
        for headers, code in cases:
            response = client.get("/v1/jobs", headers=headers)
            STATUSES.append(response.status_code)
            assert response.status_code == code, (headers, response.status_code, response.text[:300])
            assert "token-alice" not in response.text
        response = client.get("/v1/jobs", headers=[("Authorization", "Bearer wrong"),
                                                   ("Authorization", "Bearer token-alice")])
        assert response.status_code == 401  # the first header counts; a second one does not override it
        response = client.get("/v1/jobs", headers={"Authorization": "Bearer tökén".encode("latin-1")})
        assert response.status_code == 401
        routes = (("GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd", 404), ("GET", "/v1/jobs/" + "x" * 300, 422),
                  ("GET", "/v1/jobs/%00", 422), ("PUT", "/v1/jobs", 405), ("DELETE", "/v1/jobs", 405),
                  ("GET", "/v1/jobs?limit=0", 422), ("GET", "/v1/jobs?limit=99999999999999999999", 422),
                  ("GET", "/v1/jobs?offset=-1", 422), ("GET", "/v1/jobs?state=bogus", 422),
                  ("GET", "/v1/jobs/x/logs?tail=0", 422), ("GET", "/v1/compare", 422),
                  ("GET", "/v1/compare?experiment=no-such-experiment", 404))
        for method, path, code in routes:
            response = client.request(method, path, headers=ALICE)
            STATUSES.append(response.status_code)
            assert response.status_code == code, (method, path, response.status_code, response.text[:300])


def test_accepted_jobs_ran_and_no_answer_was_a_server_error(site):
    _base, server = site
    with server.client(ALICE) as alice:
        jobs = alice.get("/v1/jobs", params={"limit": 500}).json()["items"]
        assert len(jobs) >= 10
        wait_for(alice, jobs[-1]["id"], ("succeeded",), timeout=300)  # the first accepted: it ran on Ray
    assert STATUSES and max(STATUSES) < 500, sorted(set(STATUSES))


def test_the_job_runner_checks_the_policy_again(site, tmp_path):
    """`saeforge run` (what each Ray job runs) refuses a place outside the policy of its environment before it
    starts anything, whatever the spec says."""
    base, _server = site
    target = base / "elsewhere" / "runner-output"
    env = {**os.environ, "SAEFORGE_HOME": str(tmp_path), "SAEFORGE_OUTPUT_ROOT": str(base / "out"),
           "SAEFORGE_DATA_ROOTS": str(base / "data"), "SAEFORGE_MODEL_ROOTS": str(base / "models")}
    for body, field in ((spec(output={"uri": str(target)}), "output.uri"),
                        (spec(data={"source": str(base / "data" / "link.txt")}), "data.source"),
                        (spec(model={"name": "HuggingFaceTB/SmolLM2-135M"}), "model.name")):  # no SAEFORGE_HUB_ALLOW
        done = subprocess.run([sys.executable, "-m", "api.cli", "run", "--quiet", "--spec-json", json.dumps(body)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and f"job rejected: {field}" in done.stderr, done.stderr[-2000:]
    assert not target.exists()
