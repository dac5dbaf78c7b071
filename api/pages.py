"""What a dictionary learned, over HTTP: JSON routes and server-rendered pages over a job's analysis files.

JSON (in the OpenAPI document): POST /v1/jobs/{id}/analyze, GET /v1/jobs/{id}/analysis,
GET /v1/jobs/{id}/dictionaries/{name}/latents (paged, sorted, filtered) and .../latents/{index}.
Pages (HTML, no front-end build): /login, /jobs/{id}, /jobs/{id}/dictionaries/{name} and
.../latents/{index}. The same bearer tokens protect both (api/auth.py: the header, or the HttpOnly cookie the
login form sets, on reads); another owner's job is 403. The files are read from the job's output URI
(storage/analysis.py: local or s3://), so the pages survive an API restart and need no shared disk.
"""

from __future__ import annotations

import html
import json
import shlex
import threading
import time
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, quote, urlencode

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from api.auth import TOKEN_COOKIE
from api.jobspec import NAME_PATTERN

JobId = Annotated[str, PathParam(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Name = Annotated[str, PathParam(pattern=NAME_PATTERN, description="the dictionary's name in the JobSpec")]
Index = Annotated[int, PathParam(ge=0, le=2**31 - 1, description="the latent's index")]
SortKey = Literal["latent", "frequency", "mean_activation", "max_activation"]
Filter = Literal["all", "alive", "dead", "dense"]
PAGE_SIZE = 50


# --- wire models -------------------------------------------------------------------------------------------
class LatentRow(BaseModel):
    latent: int
    count: int
    frequency: float
    mean_activation: float
    max_activation: float
    dead: bool
    dense: bool
    top_logits: list[str] = Field(description="the tokens this latent's decoder row most promotes")


class LatentList(BaseModel):
    job_id: str
    dictionary: str
    latents: int = Field(description="latents in the dictionary")
    tokens: int = Field(description="held-out tokens the analysis streamed")
    total: int = Field(description="latents that pass the filter")
    limit: int
    offset: int
    sort: SortKey
    order: Literal["asc", "desc"]
    items: list[LatentRow]


class ExampleToken(BaseModel):
    token: int
    text: str
    activation: float


class Example(BaseModel):
    activation: float
    position: int
    window: int
    offset: int
    index: int = Field(description="where the example's own token is in `tokens`")
    tokens: list[ExampleToken] = Field(description="its context, clipped to the model's context window")


class LogitEffect(BaseModel):
    token: int
    text: str
    value: float


class Neighbour(BaseModel):
    latent: int
    cosine: float


class Histogram(BaseModel):
    upper: float = Field(description="the bins split [0, upper) evenly")
    counts: list[int]


class LatentDetail(LatentRow):
    job_id: str
    dictionary: str
    histogram: Histogram
    top_examples: list[Example]
    quantile_examples: list[Example] = Field(description="a uniform sample of the firings, by activation")
    promoted: list[LogitEffect]
    suppressed: list[LogitEffect]
    neighbours: list[Neighbour]
    neighbours_method: str
    mlflow_run_url: str | None = None


class AnalysisView(BaseModel):
    job_id: str
    dictionaries: dict[str, dict[str, Any]] = Field(description="each analysed dictionary's manifest")
    requested: list[str] = Field(default_factory=list, description="analysis Ray jobs this API submitted")


# --- reading the files, cached per analysis folder -----------------------------------------------------------
class AnalysisCache:
    """The latents table and vocabulary of recently viewed analyses, re-read when their manifest changes."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, uri: str) -> dict[str, Any] | None:
        from storage.analysis import LATENTS, read_manifest, read_table, read_vocabulary

        manifest = read_manifest(uri)
        if manifest is None:
            return None
        key = json.dumps(manifest, sort_keys=True)
        with self._lock:
            hit = self._entries.get(uri)
            if hit is not None and hit[0] == key:
                return hit[1]
        table = read_table(uri, LATENTS)
        entry = {"manifest": manifest, "vocabulary": read_vocabulary(uri),
                 "columns": {name: table[name].to_numpy() for name in
                             ("latent", "count", "frequency", "mean_activation", "max_activation", "dead", "dense")},
                 "table": table, "search": np.array(table["search"].to_pylist(), dtype=object)}
        with self._lock:
            self._entries[uri] = (key, entry)
            while len(self._entries) > self.size:
                self._entries.pop(next(iter(self._entries)))
        return entry


CACHE = AnalysisCache()


def _service(request: Request):
    return request.app.state.service


def _job_output(request: Request, job_id: str, owner: str) -> tuple[Any, str]:
    service = _service(request)
    job = service.owned_job(job_id, owner)
    output = service.view(job).output_uri or job.output_uri
    if not output:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id!r} has no output folder yet")
    return job, output


def _analysis(request: Request, job_id: str, name: str, owner: str) -> tuple[Any, dict[str, Any]]:
    from storage.analysis import analysis_uri

    job, output = _job_output(request, job_id, owner)
    entry = CACHE.get(analysis_uri(output, name))
    if entry is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dictionary {name!r} of job {job_id!r} has no analysis; "
                            f"run `saeforge analyze {job_id}` or POST /v1/jobs/{job_id}/analyze")
    return job, entry


def list_latents(entry: dict[str, Any], sort: str, order: str, kind: str, q: str | None, limit: int,
                 offset: int) -> tuple[int, list[dict[str, Any]]]:
    columns = entry["columns"]
    keep = np.ones(len(columns["latent"]), dtype=bool)
    if kind == "dead":
        keep &= columns["dead"]
    elif kind == "dense":
        keep &= columns["dense"]
    elif kind == "alive":
        keep &= ~columns["dead"]
    if q:
        needle = q.strip().lower()
        keep &= np.fromiter((needle in text for text in entry["search"]), dtype=bool, count=len(keep))
    chosen = np.nonzero(keep)[0]
    values = columns[sort][chosen]
    ordering = np.argsort(-values if order == "desc" else values, kind="stable")
    page = chosen[ordering][offset:offset + limit]
    vocabulary, table = entry["vocabulary"], entry["table"]
    rows = []
    for i in page.tolist():
        top = table["top_logit_tokens"][i].as_py()[:5]
        rows.append({"latent": int(columns["latent"][i]), "count": int(columns["count"][i]),
                     "frequency": float(columns["frequency"][i]),
                     "mean_activation": float(columns["mean_activation"][i]),
                     "max_activation": float(columns["max_activation"][i]), "dead": bool(columns["dead"][i]),
                     "dense": bool(columns["dense"][i]), "top_logits": [vocabulary.get(t, "") for t in top]})
    return len(chosen), rows


def latent_detail(uri: str, entry: dict[str, Any], index: int) -> dict[str, Any]:
    from storage.analysis import read_examples

    manifest, vocabulary, table = entry["manifest"], entry["vocabulary"], entry["table"]
    if index >= manifest["latents"]:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"latent {index} is beyond this dictionary's "
                            f"{manifest['latents']} latents (0..{manifest['latents'] - 1})")
    row = {name: table[name][index].as_py() for name in table.column_names}
    examples = read_examples(uri, index).to_pylist()

    before = manifest["context_before"]

    def example(e: dict[str, Any]) -> dict[str, Any]:
        tokens = [{"token": t, "text": vocabulary.get(t, ""), "activation": float(a)}
                  for t, a in zip(e["tokens"], e["activations"], strict=True) if t >= 0]
        clipped = sum(t < 0 for t in e["tokens"][:before])  # context positions before the window's start
        return {"activation": e["activation"], "position": e["position"], "window": e["window"],
                "offset": e["offset"], "index": before - clipped, "tokens": tokens}

    def effects(tokens: str, values: str) -> list[dict[str, Any]]:
        return [{"token": t, "text": vocabulary.get(t, ""), "value": float(v)}
                for t, v in zip(row[tokens], row[values], strict=True)]

    return {
        "latent": index, "count": row["count"], "frequency": row["frequency"],
        "mean_activation": row["mean_activation"], "max_activation": row["max_activation"], "dead": row["dead"],
        "dense": row["dense"], "top_logits": [vocabulary.get(t, "") for t in row["top_logit_tokens"][:5]],
        "histogram": {"upper": row["histogram_upper"], "counts": row["histogram"]},
        "top_examples": [example(e) for e in examples if e["kind"] == "top"],
        "quantile_examples": [example(e) for e in examples if e["kind"] == "quantile"],
        "promoted": effects("top_logit_tokens", "top_logit_values"),
        "suppressed": effects("bottom_logit_tokens", "bottom_logit_values"),
        "neighbours": [{"latent": n, "cosine": float(c)} for n, c in zip(row["neighbours"], row["neighbour_cosines"],
                                                                          strict=True)],
        "neighbours_method": manifest["neighbours_method"],
    }


def _run_url(request: Request, job, manifest: dict[str, Any]) -> str | None:
    """The dictionary's MLflow run in the UI (the job's child run of that name)."""
    try:
        view = _service(request).view(job)
    except Exception:  # noqa: BLE001 - the link is optional
        return None
    for d in view.dictionaries:
        if d.name == manifest["dictionary"] or d.run_id == manifest.get("mlflow_run_id"):
            return d.run_url
    return view.mlflow.run_url if view.mlflow else None


# --- the router ---------------------------------------------------------------------------------------------
def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Error responses with the app's `Error` body ({"detail": str}; api/app.py defines it for every route)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {code: {"content": error, "description": {
        401: "no or unknown token", 403: "another owner's job", 404: "not found",
        409: "the job has not finished", 503: "Ray is not connected"}[code]} for code in codes}


router = APIRouter()


def _authenticated(request: Request) -> str:
    """The caller's owner. A dependency, as the app's own routes have it: a request without a valid token gets
    401 before its path and query are validated, so an anonymous caller learns nothing from a 422."""
    return _service(request).auth(request)


Caller = Annotated[str, Depends(_authenticated)]


@router.get("/v1/jobs/{job_id}/analysis", response_model=AnalysisView, tags=["analysis"],
            summary="the job's analysed dictionaries and their manifests", responses=_errors(401, 403, 404))
def get_analysis(request: Request, owner: Caller, job_id: JobId) -> AnalysisView:
    from storage.analysis import analysis_uri, list_analyses, read_manifest

    _, output = _job_output(request, job_id, owner)
    names = list_analyses(output)
    return AnalysisView(job_id=job_id, dictionaries={n: read_manifest(analysis_uri(output, n)) or {} for n in names},
                        requested=getattr(request.app.state, "analysis_requests", {}).get(job_id, []))


@router.post("/v1/jobs/{job_id}/analyze", status_code=202, response_model=AnalysisView, tags=["analysis"],
             summary="analyse a finished job's dictionaries again (a Ray job: `saeforge analyze`)",
             responses=_errors(401, 403, 404, 409, 503))
def analyze(request: Request, owner: Caller, job_id: JobId,
            tokens: Annotated[int | None, Query(ge=1, le=10**10, description="held-out tokens (default: the "
                                                                           "job's analysis.tokens)")] = None
            ) -> AnalysisView:
    from api.rayjobs import RayUnavailable
    from storage.analysis import list_analyses

    service = _service(request)
    job, output = _job_output(request, job_id, owner)
    if job.state != "succeeded":
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id!r} is {job.state}: only a succeeded job's "
                            "dictionaries can be analysed")
    if service.ray is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Ray is not connected yet; try again")
    submission = f"{job_id}-analysis-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    command = f"{service.settings.job_command} analyze --quiet {shlex.quote(output)}" + (
        f" --tokens {tokens}" if tokens else "")
    env = {"SAEFORGE_HOME": str(service.settings.home), "MLFLOW_TRACKING_URI": service.settings.mlflow_uri}
    paths = getattr(service.settings, "paths", None)
    if paths is not None and hasattr(paths, "env"):
        env.update(paths.env())
    try:
        service.ray.submit(submission, command, env)
    except RayUnavailable as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Ray did not answer: {error}") from None
    if not hasattr(request.app.state, "analysis_requests"):
        request.app.state.analysis_requests = {}
    requests = request.app.state.analysis_requests
    requests.setdefault(job_id, []).append(submission)
    return AnalysisView(job_id=job_id, dictionaries={n: {} for n in list_analyses(output)},
                        requested=requests[job_id])


@router.get("/v1/jobs/{job_id}/dictionaries/{name}/latents", response_model=LatentList, tags=["analysis"],
            summary="a dictionary's latents: paged, sorted, filtered (dead/dense, a token in examples or logits)",
            responses=_errors(401, 403, 404))
def get_latents(request: Request, owner: Caller, job_id: JobId, name: Name,
                sort: SortKey = "frequency", order: Literal["asc", "desc"] = "desc", kind: Filter = "all",
                q: Annotated[str | None, Query(max_length=100, description="a token (case-insensitive substring) "
                                                                         "in the latent's top examples or "
                                                                         "promoted logits")] = None,
                limit: Annotated[int, Query(ge=1, le=500)] = PAGE_SIZE,
                offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> LatentList:
    _, entry = _analysis(request, job_id, name, owner)
    total, rows = list_latents(entry, sort, order, kind, q, limit, offset)
    m = entry["manifest"]
    return LatentList(job_id=job_id, dictionary=name, latents=m["latents"], tokens=m["tokens"], total=total,
                      limit=limit, offset=offset, sort=sort, order=order, items=[LatentRow(**r) for r in rows])


@router.get("/v1/jobs/{job_id}/dictionaries/{name}/latents/{index}", response_model=LatentDetail,
            tags=["analysis"], summary="one latent: statistics, examples, histogram, logit effects, neighbours",
            responses=_errors(401, 403, 404))
def get_latent(request: Request, owner: Caller, job_id: JobId, name: Name, index: Index) -> LatentDetail:
    from storage.analysis import analysis_uri

    job, entry = _analysis(request, job_id, name, owner)
    uri = analysis_uri(_job_output(request, job_id, owner)[1], name)
    detail = latent_detail(uri, entry, index)
    return LatentDetail(job_id=job_id, dictionary=name, mlflow_run_url=_run_url(request, job, entry["manifest"]),
                        **detail)


# --- pages ----------------------------------------------------------------------------------------------------
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:70rem;padding:0 1rem;color:#222}
a{color:#0645ad} table{border-collapse:collapse;width:100%} th,td{padding:.25rem .5rem;border-bottom:1px solid #ddd;
text-align:right} th:first-child,td:first-child{text-align:left} td.tokens{text-align:left;font-size:12px}
.example{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:.2rem 0;padding:.3rem;border:1px solid #eee}
.tok{border-radius:2px} .peak{outline:2px solid #c00} .bad{color:#a00} form.filters{margin:.5rem 0}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem} .muted{color:#777} h1 small{font-weight:normal}
"""


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"<style>{STYLE}</style></head><body>{body}</body></html>", status_code=status_code)


def _owner_or_login(request: Request) -> str | Response:
    try:
        return _service(request).auth(request)
    except HTTPException as error:
        if error.status_code != 401:
            raise
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)


def _page_error(error: HTTPException) -> HTMLResponse:
    words = {403: "Forbidden", 404: "Not found", 409: "Conflict"}.get(error.status_code, "Error")
    return _page(words, f"<h1>{error.status_code} {words}</h1><p class='bad'>{html.escape(str(error.detail))}</p>"
                        "<p><a href='/login'>log in as someone else</a></p>", error.status_code)


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/") and not target.startswith("//") else "/jobs"


LOGIN_FORM = """<h1>saeforge</h1><form method="post" action="/login">
<input type="hidden" name="next" value="{next}"><label>API token <input type="password" name="token" id="token"
autofocus></label> <button type="submit" id="login">Log in</button></form><p class="bad">{error}</p>"""


@router.get("/login", include_in_schema=False)
def login_form(next: str | None = None) -> HTMLResponse:  # noqa: A002 - the query parameter's name
    return _page("saeforge: log in", LOGIN_FORM.format(next=html.escape(_safe_next(next)), error=""))


@router.post("/login", include_in_schema=False)
async def login(request: Request) -> Response:
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    target = _safe_next((form.get("next") or [None])[0])
    if not token or _service(request).auth.owner_of(token) is None:
        return _page("saeforge: log in", LOGIN_FORM.format(next=html.escape(target), error="unknown token"), 401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        max_age=7 * 24 * 3600, path="/")
    return response


@router.get("/logout", include_in_schema=False)
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(TOKEN_COOKIE, path="/")
    return response


@router.get("/jobs", include_in_schema=False)
def jobs_page(request: Request) -> Response:
    owner = _owner_or_login(request)
    if isinstance(owner, Response):
        return owner
    jobs, _ = _service(request).store.list(owner=owner, limit=100)
    rows = "".join(f"<tr><td><a href='/jobs/{quote(j.id)}'>{html.escape(j.id)}</a></td><td>{html.escape(j.state)}</td>"
                   "</tr>" for j in jobs)
    return _page("saeforge: jobs", f"<h1>Jobs of {html.escape(owner)}</h1><table><tr><th>job</th><th>state</th>"
                                   f"</tr>{rows}</table><p><a href='/logout'>log out</a></p>")


@router.get("/jobs/{job_id}", include_in_schema=False)
def job_page(request: Request, job_id: JobId) -> Response:
    from storage.analysis import analysis_uri, list_analyses, read_manifest

    owner = _owner_or_login(request)
    if isinstance(owner, Response):
        return owner
    try:
        job, output = _job_output(request, job_id, owner)
    except HTTPException as error:
        return _page_error(error)
    view = _service(request).view(job)
    names = list_analyses(output)
    rows = ""
    for d in view.dictionaries:
        link = (f"<a href='/jobs/{quote(job_id)}/dictionaries/{quote(d.name)}'>latents</a>" if d.name in names
                else "<span class='muted'>not analysed</span>")
        rows += (f"<tr><td>{html.escape(d.name)}</td><td>{link}</td><td><a href='{html.escape(d.run_url)}'>MLflow run"
                 "</a></td></tr>")
    for name in sorted(set(names) - {d.name for d in view.dictionaries}):
        m = read_manifest(analysis_uri(output, name)) or {}
        rows += (f"<tr><td>{html.escape(name)}</td><td><a href='/jobs/{quote(job_id)}/dictionaries/{quote(name)}'>"
                 f"latents</a></td><td class='muted'>{html.escape(str(m.get('mlflow_run_id') or ''))}</td></tr>")
    return _page(f"saeforge: {job_id}", f"<p><a href='/jobs'>jobs</a></p><h1>{html.escape(job_id)} "
                                        f"<small>{html.escape(view.state)}</small></h1><p>output: "
                                        f"<code>{html.escape(output)}</code></p><table><tr><th>dictionary</th>"
                                        f"<th>analysis</th><th>tracking</th></tr>{rows}</table>")


@router.get("/jobs/{job_id}/dictionaries/{name}", include_in_schema=False)
def dictionary_page(request: Request, job_id: JobId, name: Name, sort: SortKey = "frequency",
                    order: Literal["asc", "desc"] = "desc", kind: Filter = "all",
                    q: Annotated[str | None, Query(max_length=100)] = None,
                    offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> Response:
    owner = _owner_or_login(request)
    if isinstance(owner, Response):
        return owner
    try:
        _, entry = _analysis(request, job_id, name, owner)
    except HTTPException as error:
        return _page_error(error)
    total, rows = list_latents(entry, sort, order, kind, q, PAGE_SIZE, offset)
    m = entry["manifest"]
    base = f"/jobs/{quote(job_id)}/dictionaries/{quote(name)}"

    def link(**changes: Any) -> str:
        params = {"sort": sort, "order": order, "kind": kind, "q": q or "", "offset": offset, **changes}
        return base + "?" + urlencode({k: v for k, v in params.items() if v not in ("", None)})

    def header(key: str, label: str) -> str:
        flip = "asc" if sort == key and order == "desc" else "desc"
        arrow = (" ▼" if order == "desc" else " ▲") if sort == key else ""
        target = html.escape(link(sort=key, order=flip, offset=0))
        return f"<th><a id='sort-{key}' href='{target}'>{label}{arrow}</a></th>"

    body = "".join(
        f"<tr class='latent-row'><td><a class='latent-link' href='{base}/latents/{r['latent']}'>{r['latent']}</a></td>"
        f"<td class='frequency'>{r['frequency']:.5f}</td><td>{r['mean_activation']:.4g}</td>"
        f"<td>{r['max_activation']:.4g}</td><td>{'dead' if r['dead'] else ('dense' if r['dense'] else '')}</td>"
        f"<td class='tokens'>{html.escape(' '.join(repr(t) for t in r['top_logits']))}</td></tr>" for r in rows)
    options = "".join(f"<option value='{k}'{' selected' if k == kind else ''}>{k}</option>"
                      for k in ("all", "alive", "dead", "dense"))
    pager = ""
    if offset > 0:
        pager += f"<a href='{html.escape(link(offset=max(offset - PAGE_SIZE, 0)))}'>← previous</a> "
    if offset + PAGE_SIZE < total:
        pager += f"<a id='next' href='{html.escape(link(offset=offset + PAGE_SIZE))}'>next →</a>"
    page = (f"<p><a href='/jobs/{quote(job_id)}'>{html.escape(job_id)}</a></p>"
            f"<h1>{html.escape(name)} <small>{m['latents']:,} latents · {m['hook']} · {m['tokens']:,} held-out "
            f"tokens</small></h1><form class='filters' method='get' action='{base}'>"
            f"<input type='hidden' name='sort' value='{sort}'><input type='hidden' name='order' value='{order}'>"
            f"<select name='kind' id='kind'>{options}</select> <input name='q' id='q' placeholder='token in examples "
            f"or logits' value='{html.escape(q or '')}'> <button type='submit' id='filter'>filter</button></form>"
            f"<p class='muted'>{total:,} latents match; showing {offset + 1 if total else 0}–"
            f"{min(offset + PAGE_SIZE, total)}</p><table id='latents'><tr>{header('latent', 'latent')}"
            f"{header('frequency', 'frequency')}{header('mean_activation', 'mean act.')}"
            f"{header('max_activation', 'max act.')}<th>kind</th><th>promoted logits</th></tr>{body}</table>"
            f"<p>{pager}</p>")
    return _page(f"saeforge: {name}", page)


def _example_html(example: dict[str, Any], scale: float, mark_peak: bool, css_class: str) -> str:
    """The context, each token shaded by the latent's activation on it; the example's own token outlined."""
    spans = []
    for i, t in enumerate(example["tokens"]):
        alpha = min(abs(t["activation"]) / scale, 1.0) if scale > 0 else 0.0
        colour = "255,110,0" if t["activation"] >= 0 else "0,110,255"  # AbsTopK's negative codes in blue
        cls = "tok peak" if mark_peak and i == example["index"] else "tok"
        spans.append(f"<span class='{cls}' style='background:rgba({colour},{alpha:.3f})' "
                     f"data-activation='{t['activation']:.5g}' title='{t['activation']:.4g}'>"
                     f"{html.escape(t['text'])}</span>")
    return (f"<div class='example {css_class}'><span class='muted'>{example['activation']:.4g} │ </span>"
            f"{''.join(spans)}</div>")


def _histogram_svg(histogram: dict[str, Any]) -> str:
    counts, upper = histogram["counts"], histogram["upper"]
    if not counts or not sum(counts):
        return "<p class='muted'>never fired</p>"
    top, width, height = max(counts), 480, 120
    bar = width / len(counts)
    bars = "".join(f"<rect x='{i * bar:.1f}' y='{height - height * c / top:.1f}' width='{bar - 1:.1f}' "
                   f"height='{height * c / top:.1f}' fill='#e67e22'><title>{c}</title></rect>"
                   for i, c in enumerate(counts))
    return (f"<svg id='histogram' width='{width}' height='{height + 16}'>{bars}<text x='0' y='{height + 14}' "
            f"font-size='11'>0</text><text x='{width - 40}' y='{height + 14}' font-size='11'>{upper:.3g}</text></svg>")


@router.get("/jobs/{job_id}/dictionaries/{name}/latents/{index}", include_in_schema=False)
async def latent_page(request: Request, job_id: JobId, name: Name, index: Index) -> Response:
    from storage.analysis import analysis_uri

    owner = _owner_or_login(request)
    if isinstance(owner, Response):
        return owner
    try:
        job, entry = await run_in_threadpool(_analysis, request, job_id, name, owner)
        uri = analysis_uri((await run_in_threadpool(_job_output, request, job_id, owner))[1], name)
        d = await run_in_threadpool(latent_detail, uri, entry, index)
    except HTTPException as error:
        return _page_error(error)
    run = await run_in_threadpool(_run_url, request, job, entry["manifest"])
    base = f"/jobs/{quote(job_id)}/dictionaries/{quote(name)}"
    scale = d["max_activation"] or 1.0
    tops = "".join(_example_html(e, scale, True, "top-example") for e in d["top_examples"])
    quantiles = "".join(_example_html(e, scale, False, "quantile-example") for e in d["quantile_examples"])

    def effects(items: list[dict[str, Any]]) -> str:
        return "".join(f"<tr><td>{html.escape(repr(e['text']))}</td><td>{e['value']:+.4f}</td></tr>" for e in items)

    neighbours = "".join(f"<tr><td><a href='{base}/latents/{n['latent']}'>{n['latent']}</a></td>"
                         f"<td>{n['cosine']:.3f}</td></tr>" for n in d["neighbours"])
    kind = "dead" if d["dead"] else ("dense" if d["dense"] else "")
    page = (f"<p><a href='/jobs/{quote(job_id)}'>{html.escape(job_id)}</a> / <a id='dictionary' href='{base}'>"
            f"{html.escape(name)}</a></p><h1>latent {index} <small>{kind}</small></h1>"
            f"<p>fires on <b id='frequency'>{100 * d['frequency']:.3f}%</b> of tokens ({d['count']:,}); mean "
            f"activation when firing {d['mean_activation']:.4g}, max {d['max_activation']:.4g}"
            + (f" · <a id='mlflow' href='{html.escape(run)}'>MLflow run</a>" if run else "") + "</p>"
            f"<div class='grid'><div><h2>activation histogram</h2>{_histogram_svg(d['histogram'])}</div>"
            f"<div><h2>nearest latents</h2><table><tr><th>latent</th><th>cosine</th></tr>{neighbours}</table>"
            f"<p class='muted'>{html.escape(d['neighbours_method'])}</p></div></div>"
            f"<h2>top activations</h2><div id='top-examples'>{tops or '<p class=muted>none</p>'}</div>"
            f"<h2>across the activation quantiles</h2><div id='quantile-examples'>"
            f"{quantiles or '<p class=muted>none</p>'}</div>"
            f"<div class='grid'><div><h2>promoted tokens</h2><table id='promoted'>{effects(d['promoted'])}</table>"
            "</div>"
            f"<div><h2>suppressed tokens</h2><table id='suppressed'>{effects(d['suppressed'])}</table></div></div>")
    return _page(f"saeforge: {name} latent {index}", page)
