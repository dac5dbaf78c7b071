"""The path policy (api/paths.py) on every place a JobSpec names, in-process: local roots with '..', symlinks and
globs, file:// URIs, S3 prefixes per purpose, other schemes; the walk that finds every marked field; and the job
runner's second check from the environment the service hands its jobs."""

from __future__ import annotations

import pytest

from api.jobspec import JobSpec
from api.paths import PathPolicy, PathPolicyError, Uri, check_spec_uris, checked_spec, marked_fields, walk_uris

READ_DATA = Uri("read", "data", glob=True)
READ_MODEL = Uri("read", "model")
WRITE = Uri("write", "output")


@pytest.fixture()
def tree(tmp_path):
    for name in ("models", "data", "out", "elsewhere"):
        (tmp_path / name).mkdir()
    (tmp_path / "data" / "a.txt").write_text("a")
    (tmp_path / "elsewhere" / "secret.txt").write_text("no")
    (tmp_path / "data" / "link.txt").symlink_to(tmp_path / "elsewhere" / "secret.txt")
    (tmp_path / "data" / "dirlink").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "out" / "escape").symlink_to(tmp_path / "elsewhere")
    return tmp_path


def policy(tree, **extra) -> PathPolicy:
    return PathPolicy.from_env({"SAEFORGE_MODEL_ROOTS": str(tree / "models"), "SAEFORGE_DATA_ROOTS": str(tree / "data"),
                                "SAEFORGE_OUTPUT_ROOT": str(tree / "out"), **extra})


def refused(p: PathPolicy, value: str, marker: Uri, rule: str) -> str:
    with pytest.raises(PathPolicyError) as caught:
        p.check(value, marker, "data.source")
    message = str(caught.value)
    assert message.startswith("data.source: ") and f"[rule: {rule}]" in message, message
    return message


def test_every_place_of_the_jobspec_is_marked():
    """A field that names a place and is not in this list would escape the policy: add the Uri marker to it."""
    assert set(marked_fields(JobSpec)) >= {"model.name", "data.source", "data.cache.read", "data.cache.write",
                                           "output.uri"}


def test_local_paths_resolve_under_their_roots(tree):
    p = policy(tree)
    assert p.check(str(tree / "data" / "a.txt"), READ_DATA, "f") == str(tree / "data" / "a.txt")
    assert p.check("a.txt", READ_DATA, "f") == str(tree / "data" / "a.txt")  # relative: under the first root
    assert p.check(f"file://{tree}/data/a.txt", READ_DATA, "f") == str(tree / "data" / "a.txt")
    assert p.check(str(tree / "out" / "job-1"), WRITE, "f") == str(tree / "out" / "job-1")
    assert p.check(str(tree / "out" / "cache"), READ_DATA, "f")  # earlier jobs' caches are readable
    refused(p, str(tree / "data" / ".." / "elsewhere" / "secret.txt"), READ_DATA, "no-dotdot")
    refused(p, str(tree / "data" / "link.txt"), READ_DATA, "local-root")  # a symlink out of the root
    refused(p, str(tree / "data" / "dirlink" / "secret.txt"), READ_DATA, "local-root")
    refused(p, str(tree / "data" / "*.txt"), READ_DATA, "local-root")  # a glob matching the symlink
    refused(p, str(tree / "out" / "escape" / "job"), WRITE, "local-root")  # writing through a symlink
    refused(p, str(tree / "elsewhere" / "x"), WRITE, "local-root")
    refused(p, str(tree / "models"), READ_DATA, "local-root")  # a model root is not a data root
    refused(p, "/etc/passwd", READ_MODEL, "local-root")
    refused(p, "~/.ssh/id_rsa", READ_DATA, "local-root")
    refused(p, "file://localhost/etc/passwd", READ_DATA, "file-uri-absolute")
    refused(p, str(tree / "out" / "*"), WRITE, "no-glob")
    refused(p, str(tree / "data" / "a\x00.txt"), READ_DATA, "no-control-characters")
    refused(p, str(tree / "data" / "a\n.txt"), READ_DATA, "no-control-characters")


def test_schemes_other_than_file_and_s3_are_refused(tree):
    p = policy(tree)
    for value in ("http://example.com/x", "memory://x", "gs://bucket/x", "S3://bucket/x", "s3a://bucket/x",
                  "simplecache::s3://corpora/x", "hf://datasets/x", "ftp://host/x", "zip://a::file:///x"):
        refused(p, value, READ_DATA, "scheme")


def test_s3_prefixes_per_purpose(tree):
    p = policy(tree, SAEFORGE_S3_PREFIXES="read:s3://corpora/public,write:s3://team/scratch")
    assert p.check("s3://corpora/public/web.jsonl", READ_DATA, "f") == "s3://corpora/public/web.jsonl"
    assert p.check("s3://team/scratch/job-1/", WRITE, "f") == "s3://team/scratch/job-1/"
    assert p.check("s3://team/scratch/cache", READ_DATA, "f")  # a write prefix is readable
    refused(p, "s3://corpora/public/x", WRITE, "s3-prefix")  # read-only
    refused(p, "s3://corpora/publicity/x", READ_DATA, "s3-prefix")  # a prefix is a whole segment
    refused(p, "s3://other-bucket/x", READ_DATA, "s3-prefix")
    refused(p, "s3://corpora/public/../private/x", READ_DATA, "s3-uri-shape")
    refused(p, "s3://corpora/public//x", READ_DATA, "s3-uri-shape")
    refused(p, "s3://corpora/public/./x", READ_DATA, "s3-uri-shape")
    refused(p, "s3://Corpora/public/x", READ_DATA, "s3-uri-shape")
    refused(p, "s3://team/scratch/*", WRITE, "no-glob-write")


def test_s3_with_local_roots_is_not_a_local_path(tree):
    """The bug of issue 17: with data roots set, an s3:// source was taken for a path under the root."""
    open_s3 = policy(tree)  # no S3 rule configured at all: reads anywhere; writes only under the output root
    assert open_s3.check("s3://corpora/web.jsonl", READ_DATA, "f") == "s3://corpora/web.jsonl"
    with pytest.raises(PathPolicyError, match=r"\[rule: s3-prefix\]"):
        open_s3.check("s3://corpora/out", WRITE, "f")
    chart = PathPolicy.from_env({"SAEFORGE_DATA_ROOTS": f"s3://corpora/,{tree / 'data'}",
                                 "SAEFORGE_OUTPUT_ROOT": "s3://artifacts/prod"})
    assert chart.check("s3://corpora/web.jsonl", READ_DATA, "f")
    assert chart.check("s3://artifacts/prod/job-1", WRITE, "f")
    with pytest.raises(PathPolicyError, match=r"\[rule: s3-prefix\]"):
        chart.check("s3://elsewhere/web.jsonl", READ_DATA, "f")
    with pytest.raises(PathPolicyError, match=r"\[rule: local-root\]"):
        chart.check(str(tree / "out" / "job"), WRITE, "f")  # the output root is on S3


def test_a_laptop_without_roots_allows_what_it_can_reach(tree):
    p = PathPolicy.from_env({})
    assert p.check(str(tree / "elsewhere" / "secret.txt"), READ_DATA, "f") == str(tree / "elsewhere" / "secret.txt")
    assert p.check("s3://any/x", WRITE, "f") == "s3://any/x"
    with pytest.raises(PathPolicyError):
        p.check("http://x/y", READ_DATA, "f")


def test_bad_configuration_names_the_variable():
    with pytest.raises(ValueError, match="SAEFORGE_S3_PREFIXES"):
        PathPolicy.from_env({"SAEFORGE_S3_PREFIXES": "write:/local/folder"})
    with pytest.raises(ValueError, match="SAEFORGE_DATA_ROOTS"):
        PathPolicy.from_env({"SAEFORGE_DATA_ROOTS": "s3://x"})


def test_the_walk_checks_every_marked_field_of_a_raw_spec(tree):
    p = policy(tree)
    raw = {"model": {"name": "embedded"}, "data": {"source": "a.txt", "cache": {"write": str(tree / "out" / "c")}},
           "output": {"uri": str(tree / "out" / "j")}}
    checked = check_spec_uris(JobSpec, raw, p)
    assert checked["data"]["source"] == str(tree / "data" / "a.txt") and checked["model"]["name"] == "embedded"
    for place in ({"data": {"cache": {"read": "/etc"}}}, {"data": {"cache": {"write": str(tree / "data")}}},
                  {"output": {"uri": "/tmp/x"}}, {"model": {"name": str(tree / "data")}}):
        with pytest.raises(PathPolicyError) as caught:
            check_spec_uris(JobSpec, place, p)
        section = next(iter(place))
        assert str(caught.value).startswith(f"{section}."), caught.value
    assert check_spec_uris(JobSpec, {"data": "not a mapping", "dictionaries": [1]}, p) == {
        "data": "not a mapping", "dictionaries": [1]}  # shapes are the JobSpec's own validation's to judge


def test_the_runner_checks_again_from_the_jobs_environment(tree):
    spec = JobSpec.model_validate({"output": {"uri": str(tree / "elsewhere" / "job")}})
    env = policy(tree).env()
    with pytest.raises(PathPolicyError, match=r"output.uri: .*\[rule: local-root\]"):
        checked_spec(spec, env)
    ok = JobSpec.model_validate({"output": {"uri": str(tree / "out" / "job")}})
    assert checked_spec(ok, env).output.uri == str(tree / "out" / "job")
    assert PathPolicy.from_env(env) == policy(tree)


def test_hub_ids_where_roots_are_set_need_the_allow_list(tree):
    """A hub id names no place the roots can judge: a service with roots refuses it unless SAEFORGE_HUB_ALLOW
    lists it or its org; a laptop (no roots) takes any."""
    model, dataset = {"model": {"name": "HuggingFaceTB/SmolLM2-135M"}}, {"data": {"source": "monology/pile@main"}}
    for raw, field in ((model, "model.name"), (dataset, "data.source")):
        with pytest.raises(PathPolicyError) as caught:
            check_spec_uris(JobSpec, raw, policy(tree))
        message = str(caught.value)
        assert message.startswith(f"{field}: ") and "[rule: hub-allow]" in message, message
        assert "SAEFORGE_HUB_ALLOW, which is not set" in message and "ask the operator" in message, message
        assert check_spec_uris(JobSpec, raw, PathPolicy.from_env({})) == raw  # no roots: allowed as given
    only_models = PathPolicy.from_env({"SAEFORGE_MODEL_ROOTS": str(tree / "models")})
    assert check_spec_uris(JobSpec, dataset, only_models) == dataset  # data roots unset: data ids allowed
    with pytest.raises(PathPolicyError, match=r"^model\.name: .*SAEFORGE_MODEL_ROOTS set"):
        check_spec_uris(JobSpec, model, only_models)


def test_the_hub_allow_list_takes_ids_and_whole_orgs(tree):
    p = policy(tree, SAEFORGE_HUB_ALLOW="HuggingFaceTB/, monology/pile-uncopyrighted")
    for name in ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-360M@refs/pr/1", "huggingfacetb/smollm2-135m",
                 "monology/pile-uncopyrighted", "monology/pile-uncopyrighted@0123abc"):
        assert p.check_hub_id(name, READ_MODEL, "model.name") == name
    for name in ("monology/pile", "monology/pile-uncopyrighted-v2", "HuggingFaceTBX/SmolLM2-135M",
                 "attacker/HuggingFaceTB"):
        with pytest.raises(PathPolicyError) as caught:
            p.check_hub_id(name, READ_DATA, "data.source")
        message = str(caught.value)
        assert message.startswith("data.source: ") and "not in this service's allow-list" in message, message
        assert "HuggingFaceTB/, monology/pile-uncopyrighted" in message and "[rule: hub-allow]" in message, message
    laptop = PathPolicy.from_env({"SAEFORGE_HUB_ALLOW": "HuggingFaceTB/"})  # set without roots: it still applies
    with pytest.raises(PathPolicyError, match=r"\[rule: hub-allow\]"):
        check_spec_uris(JobSpec, {"data": {"source": "monology/pile-uncopyrighted"}}, laptop)
    anything = policy(tree, SAEFORGE_HUB_ALLOW="*")
    assert anything.check_hub_id("any/one", READ_DATA, "data.source") == "any/one"
    assert check_spec_uris(JobSpec, {"model": {"name": "embedded"}}, p) == {"model": {"name": "embedded"}}
    found: list[str] = []
    walk_uris(JobSpec, {"model": {"name": "HuggingFaceTB/SmolLM2-135M"}},
              lambda where, value, _marker: found.append(where) or value)
    assert found == []  # owner isolation's walk: a hub id is no folder of anyone's
    for bad in ("HuggingFaceTB", "org/name@main", "/models/x", "org/name/extra", "s3://bucket/x"):
        with pytest.raises(ValueError, match="SAEFORGE_HUB_ALLOW: .*'org/name'.*'org/'"):
            PathPolicy.from_env({"SAEFORGE_HUB_ALLOW": bad})


def test_the_runner_applies_the_allow_list_of_the_jobs_environment(tree):
    spec = JobSpec.model_validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M"},
                                   "output": {"uri": str(tree / "out" / "j")}})
    with pytest.raises(PathPolicyError, match=r"^model\.name: .*\[rule: hub-allow\]"):
        checked_spec(spec, policy(tree).env())
    allowed = policy(tree, SAEFORGE_HUB_ALLOW="HuggingFaceTB/")
    assert allowed.env()["SAEFORGE_HUB_ALLOW"] == "HuggingFaceTB/" and PathPolicy.from_env(allowed.env()) == allowed
    assert checked_spec(spec, allowed.env()).model.name == "HuggingFaceTB/SmolLM2-135M"
    assert checked_spec(spec, {}).model.name == "HuggingFaceTB/SmolLM2-135M"  # `saeforge run` on a laptop
