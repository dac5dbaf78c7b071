"""The analysis of a finished job, end to end: the tiny job's per-latent top-N against a brute force, the JSON
routes, the pages in a real headless Chromium (Playwright driving Debian's `chromium`), the same analysis served
after an API restart and from S3 (moto) as from disk.

One tiny job per server (one writing to disk, one to S3), both on the file's shared Ray, submitted together.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import boto3
import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from tests.api.conftest import BOB, LOAD, ApiServer, wait_for

pytestmark = pytest.mark.slow

BUCKET = "analysis-pages"
JOB = {**LOAD, "name": "pages", "tracking": {"experiment": "pages"},
       "analysis": {"tokens": 2048, "top_n": 5, "context_before": 6, "context_after": 2, "delphi_cache": True}}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, s3_server, ray_address):
    """{"disk": (server, job), "s3": (server, job)}; s3_server first, so the shared Ray (and the jobs it runs)
    starts with the moto endpoint in its environment."""
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    env = {"SAEFORGE_RAY_ADDRESS": ray_address, "SAEFORGE_JOB_COMMAND": f"{sys.executable} -m api.cli"}
    servers = {
        "disk": ApiServer(tmp_path_factory.mktemp("pages-disk"), env),
        "s3": ApiServer(tmp_path_factory.mktemp("pages-s3"), {**env, "SAEFORGE_OUTPUT_ROOT": f"s3://{BUCKET}/jobs"}),
    }
    for server in servers.values():
        server.start()
    started = time.monotonic()
    submitted = {}
    for key, server in servers.items():
        with server.client() as client:
            response = client.post("/v1/jobs", json=JOB)
            assert response.status_code == 201, response.text
            submitted[key] = response.json()["id"]
    done = {}
    for key, server in servers.items():
        with server.client() as client:
            job = wait_for(client, submitted[key], ("succeeded", "failed", "cancelled"), timeout=900)
            assert job["state"] == "succeeded", (job, client.get(f"/v1/jobs/{job['id']}/logs").json()["logs"][-3000:])
            done[key] = (server, job)
    print(f"two tiny jobs with analysis: {time.monotonic() - started:.0f} s")
    yield done
    for server in servers.values():
        server.stop()


def _latents_path(job: dict) -> str:
    return f"/v1/jobs/{job['id']}/dictionaries/d/latents"


def test_top_n_matches_a_brute_force_over_the_held_out_windows(jobs):
    """Same positions, same values: every latent's top-5 from the files against a dense encoding of the slice."""
    from api.jobspec import JobSpec
    from services.data import documents
    from services.models import capture, load_language_model, run_blocks
    from services.windows import TokenWindows
    from storage.export import load_saelens

    _, job = jobs["disk"]
    output = job["output_uri"]
    spec = JobSpec.model_validate(job["spec"])
    folder = Path(output) / "analysis" / "d"
    manifest = pd.read_json(folder / "manifest.json", typ="series")
    examples = pd.read_parquet(folder / "examples.parquet")  # pandas alone reads them
    latents = pd.read_parquet(folder / "latents.parquet")

    lm = load_language_model(spec.model, keep_layers=1)
    held_out = documents(spec.data, spec.training.seed, held_out=True)
    windows = TokenWindows(lm.tokenizer, held_out, spec.data.context_length, epochs=1)
    stacked = np.stack([w for _, w in zip(range(manifest["windows"]), windows, strict=False)])
    with torch.inference_mode(), capture(lm.model, spec.hooks()) as captured:
        run_blocks(lm, torch.from_numpy(stacked))
        x = captured[spec.hook_of(0).name].reshape(-1, lm.d_model).float()
    tensors, config = load_saelens(str(Path(output) / "dictionaries" / "d"))
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    top = pre.topk(config["k"], dim=1)
    dense = torch.zeros_like(pre).scatter_(1, top.indices, top.values)
    dense *= torch.from_numpy(windows.keep_mask(stacked).reshape(-1))[:, None]

    assert manifest["tokens"] == int(windows.keep_mask(stacked).sum())
    assert (latents["count"].to_numpy() == (dense > 0).sum(0).numpy()).all(), "firing counts differ"
    for latent in range(dense.shape[1]):
        column = dense[:, latent]
        fired = torch.nonzero(column > 0).squeeze(1)
        best = fired[torch.argsort(column[fired], descending=True, stable=True)][:manifest["top_n"]]
        mine = examples[(examples.latent == latent) & (examples.kind == "top")].sort_values("rank")
        np.testing.assert_allclose(mine["activation"].to_numpy(), column[best].numpy(), rtol=1e-4, atol=1e-6)
        # Ties are real here (a window's first token sees only itself: the same token, the same activation), so
        # the positions must match above the N-th value and come from the tied positions at it.
        if len(best):
            last = column[best[-1]]
            above = [p for p in best.tolist() if column[p] > last]
            assert set(mine["position"].tolist()[: len(above)]) == set(above), f"latent {latent}: top positions differ"
            tied = set(torch.nonzero(column == last).squeeze(1).tolist())
            assert set(mine["position"].tolist()[len(above):]) <= tied, f"latent {latent}: top positions differ"


def test_the_delphi_cache_holds_every_firing_of_the_slice(jobs):
    from safetensors.numpy import load_file

    _, job = jobs["disk"]
    folder = Path(job["output_uri"]) / "analysis" / "d"
    hook = pd.read_json(folder / "manifest.json", typ="series")["hook"]
    counts = pd.read_parquet(folder / "latents.parquet")["count"].sum()
    files = sorted((folder / "delphi" / hook).glob("*.safetensors"))
    assert len(files) == 5 and (folder / "delphi" / hook / "config.json").is_file()
    total = 0
    for f in files:
        data = load_file(str(f))
        start, end = (int(p) for p in f.stem.split("_"))
        assert data["locations"].shape[1] == 3 and data["activations"].dtype == np.float16
        assert (data["locations"][:, 2].astype(int) + start <= end).all()
        total += len(data["activations"])
    assert total == counts


def test_json_routes_page_sort_filter_and_refuse_other_owners(jobs):
    server, job = jobs["disk"]
    with server.client() as alice, server.client(BOB) as bob:
        listing = alice.get(_latents_path(job), params={"sort": "frequency", "order": "desc", "limit": 10})
        assert listing.status_code == 200, listing.text
        body = listing.json()
        frequencies = [r["frequency"] for r in body["items"]]
        assert frequencies == sorted(frequencies, reverse=True) and body["latents"] == 64 and len(frequencies) == 10
        dead = alice.get(_latents_path(job), params={"kind": "dead"}).json()
        assert all(r["dead"] for r in dead["items"]) and dead["total"] == sum(
            r["count"] == 0 for r in alice.get(_latents_path(job), params={"limit": 64}).json()["items"])
        token = body["items"][0]["top_logits"][0]
        found = alice.get(_latents_path(job), params={"q": token, "limit": 500}).json()
        assert body["items"][0]["latent"] in [r["latent"] for r in found["items"]]
        latent = body["items"][0]["latent"]
        detail = alice.get(f"{_latents_path(job)}/{latent}").json()
        assert detail["top_examples"] and detail["top_examples"][0]["activation"] == pytest.approx(
            detail["max_activation"])
        assert len(detail["histogram"]["counts"]) == 32 and sum(detail["histogram"]["counts"]) == detail["count"]
        assert detail["neighbours_method"].startswith("exact") and len(detail["promoted"]) == 10
        assert detail["mlflow_run_url"] and "#/experiments/" in detail["mlflow_run_url"]
        assert alice.get(f"{_latents_path(job)}/64").status_code == 404
        assert bob.get(_latents_path(job)).status_code == 403
        assert bob.get(f"{_latents_path(job)}/{latent}").status_code == 403
        assert alice.get("/v1/jobs/nope/dictionaries/d/latents").status_code == 404
        with httpx.Client(base_url=server.url, timeout=60) as anonymous:
            assert anonymous.get(_latents_path(job)).status_code == 401
            assert anonymous.get(f"/jobs/{job['id']}/dictionaries/d").status_code == 303, "pages: to the login form"
        assert bob.post(f"/v1/jobs/{job['id']}/analyze").status_code == 403
        assert "d" in alice.get(f"/v1/jobs/{job['id']}/analysis").json()["dictionaries"]


def _browser():
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def test_the_pages_in_a_headless_chromium(jobs, tmp_path):
    server, job = jobs["disk"]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{server.url}/jobs/{job['id']}/dictionaries/d")
        assert "/login" in page.url, "an anonymous browser is sent to the login form"
        page.fill("#token", "token-alice")
        page.click("#login")
        page.wait_for_selector("#latents")
        cookies = {c["name"]: c for c in page.context.cookies()}
        assert cookies["saeforge_token"]["httpOnly"] and cookies["saeforge_token"]["sameSite"] == "Strict"
        page.screenshot(path=str(shots / "dictionary.png"), full_page=True)

        page.click("#sort-frequency")  # the page opens sorted by frequency, descending: this flips it to ascending
        page.wait_for_url("**order=asc**")
        shown = [float(t) for t in page.locator("td.frequency").all_inner_texts()]
        assert shown == sorted(shown) and len(shown) == 50
        page.click("#sort-frequency")
        page.wait_for_url("**order=desc**")
        shown = [float(t) for t in page.locator("td.frequency").all_inner_texts()]
        assert shown == sorted(shown, reverse=True)

        page.locator("a.latent-link").first.click()
        page.wait_for_selector("#top-examples .example")
        peak = page.locator("#top-examples .example").first.locator(".peak")
        assert peak.count() == 1, "the top example's most active token is highlighted"
        shade = peak.evaluate("e => getComputedStyle(e).backgroundColor")
        assert shade.startswith("rgba(255, 110, 0") or shade == "rgb(255, 110, 0)", shade
        first = page.locator("#top-examples .example").first.locator(".tok")
        activations = [float(a) for a in first.evaluate_all("els => els.map(e => e.dataset.activation)")]
        latent = int(page.url.rsplit("/", 1)[-1])
        with server.client() as client:
            detail = client.get(f"{_latents_path(job)}/{latent}").json()
        assert float(peak.get_attribute("data-activation")) == pytest.approx(detail["max_activation"], rel=1e-3), \
            "the outlined token is the example's own, at the latent's max activation"
        assert max(activations) == pytest.approx(detail["max_activation"], rel=1e-3)
        assert page.locator("#histogram rect").count() == 32 and page.locator("#mlflow").count() == 1
        page.screenshot(path=str(shots / "latent.png"), full_page=True)
        shutil.copyfile(shots / "latent.png", DOCS / "analysis-latent-page.png")

        other = browser.new_page()
        other.goto(f"{server.url}/login")
        other.fill("#token", "token-bob")
        other.click("#login")
        response = other.goto(f"{server.url}/jobs/{job['id']}/dictionaries/d")
        assert response.status == 403 and "another owner" in other.inner_text("body")
        other.screenshot(path=str(shots / "forbidden.png"))
        browser.close()
    print(f"screenshots in {shots}")


def test_the_analysis_survives_an_api_restart_and_is_served_from_s3_as_from_disk(jobs):
    disk, disk_job = jobs["disk"]
    s3, s3_job = jobs["s3"]
    assert s3_job["output_uri"].startswith(f"s3://{BUCKET}/")
    with disk.client() as client:
        before = client.get(f"{_latents_path(disk_job)}/0").json()
    disk.kill()
    disk.start()
    with disk.client() as client:
        after = client.get(f"{_latents_path(disk_job)}/0").json()
    assert after == before

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    prefix = s3_job["output_uri"].removeprefix("s3://") + "/analysis/d"
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(prefix)} >= {"manifest.json", "latents.parquet", "examples.parquet",
                                                              "vocabulary.parquet"}
    with fs.open(prefix + "/latents.parquet") as f:
        from_s3 = pd.read_parquet(f)  # pyarrow/pandas read it without saeforge
    with disk.client() as d, s3.client() as s:
        local, remote = d.get(_latents_path(disk_job), params={"limit": 64}).json(), \
            s.get(_latents_path(s3_job), params={"limit": 64}).json()
        assert local["items"] == remote["items"], "the same job on S3 gives the same latents as on disk"
        assert remote["total"] == len(from_s3) == 64
        latent = remote["items"][0]["latent"]
        one_local = d.get(f"{_latents_path(disk_job)}/{latent}").json()
        one_remote = s.get(f"{_latents_path(s3_job)}/{latent}").json()
    for key in ("top_examples", "quantile_examples", "histogram", "promoted", "neighbours"):
        assert one_local[key] == one_remote[key], key


def test_analyze_on_demand_runs_again_as_a_ray_job(jobs):
    """Last in the file: it rewrites the disk job's analysis (here with fewer tokens)."""
    server, job = jobs["disk"]
    with server.client() as alice:
        before = alice.get(f"/v1/jobs/{job['id']}/analysis").json()["dictionaries"]["d"]
        response = alice.post(f"/v1/jobs/{job['id']}/analyze", params={"tokens": 640})
        assert response.status_code == 202, response.text
        assert response.json()["requested"], "the Ray job it submitted"
        deadline = time.monotonic() + 600
        after = before
        while time.monotonic() < deadline and after["tokens"] == before["tokens"]:
            time.sleep(2)
            after = alice.get(f"/v1/jobs/{job['id']}/analysis").json()["dictionaries"].get("d", before)
        assert after["tokens"] < before["tokens"] and after["windows"] == 10, (before, after)
        assert alice.get(f"{_latents_path(job)}/0").status_code == 200
