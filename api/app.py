"""The saeforge job service: a FastAPI app over the job store, the scheduler (Ray job submission) and MLflow.

    saeforge serve --host 0.0.0.0 --port 8000

Routes under /v1 need a bearer token; /healthz, /readyz and the OpenAPI document (/openapi.json, /docs) do
not. No torch is imported here: jobs run in Ray jobs (`saeforge run ... --job-id ID`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError

from api.auth import Authenticator
from api.capacity import Capacity, check_capacity, cluster_capacity, model_shape
from api.jobspec import JobSpec, new_job_id
from api.pages import router as pages_router
from api.paths import PathPolicyError, check_spec_uris, walk_uris
from api.progress import progress, snapshot
from api.rayjobs import RayJobs, RayUnavailable, start_local_ray
from api.rayjobs import cluster_capacity as ray_capacity
from api.scheduler import Scheduler
from api.settings import Settings
from api.store import STATES, Job, JobStore
from storage.uri import join, scheme

log = logging.getLogger("saeforge.api")
MAX_BODY_BYTES = 1 << 20
CAPACITY_TTL_S = 60.0  # how long what Ray's nodes offer is taken as known
MAX_JSON_DEPTH = 32  # a JobSpec is 4 levels deep; deeper bodies are refused before they are walked
MISSING_MARKERS = ("does not exist", "matches no file")
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
assert set(JobState.__args__) == set(STATES)


# --- wire schemas ------------------------------------------------------------------------------------------
class Error(BaseModel):
    detail: str


class ValidationItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[ValidationItem]
    message: str = Field(description="all problems, one per line, for people")


class Progress(BaseModel):
    tokens_done: int
    tokens_total: int
    fraction: float
    tokens_per_s: float | None = None
    eta_s: float | None = Field(None, description="seconds left at the current rate (running jobs)")
    elapsed_s: float | None = None


class DictionaryView(BaseModel):
    name: str
    run_id: str
    run_url: str
    run_status: str
    metrics: dict[str, float] = Field(description="latest value of every metric of the dictionary's MLflow run")
    tags: dict[str, str]
    output_uri: str | None = Field(None, description="the exported dictionary (SAELens layout), when done")


class MlflowView(BaseModel):
    experiment_id: str
    run_id: str
    run_url: str
    run_status: str


class JobSummary(BaseModel):
    id: str
    name: str
    owner: str
    state: JobState
    experiment: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    message: str | None = None


class JobView(JobSummary):
    attempts: int
    cancel_requested: bool
    output_uri: str | None = None
    spec: dict[str, Any]
    progress: Progress | None = None
    mlflow: MlflowView | None = None
    dictionaries: list[DictionaryView] = Field(default_factory=list)


class JobList(BaseModel):
    items: list[JobSummary]
    total: int
    limit: int
    offset: int


class JobLogs(BaseModel):
    id: str
    state: JobState
    logs: str


class CompareRow(BaseModel):
    job_id: str
    dictionary: str
    architecture: str | None = None
    model: str | None = None
    site: str | None = None
    layer: int | None = None
    latents: int | None = None
    k: int | None = None
    l0: float | None = None
    fvu: float | None = None
    dead_pct: float | None = Field(None, description="latents that did not fire in the last dead_window_tokens")
    never_fired_pct: float | None = None
    dead_window_tokens: int | None = None
    dead_window_complete: bool | None = Field(
        None, description="false: the run is shorter than its dead window, so dead_pct is 0 by construction")
    delta_lm_loss: float | None = None
    tokens_per_s: float | None = None
    tokens: int | None = None
    status: str
    run_id: str
    on_frontier: bool


class CompareView(BaseModel):
    experiment: str
    experiment_id: str
    job_id: str | None = None
    rows: list[CompareRow]
    points: int = Field(description="points in the Pareto plot (dictionaries with both L0 and FVU)")
    plot_run_id: str | None = Field(None, description="MLflow run holding the plot")
    plot_artifact: str | None = None
    plot_path: str = Field(description="this API's path of the PNG")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, bool]
    detail: str | None = None


def _ts(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=timezone.utc) if value is not None else None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    described = {400: "the job cannot run as given", 401: "no or unknown bearer token",
                 403: "not allowed for this token or by the operator", 404: "not found",
                 409: "the job is already finished", 413: "request body too large",
                 503: "Ray or the job store is not reachable"}
    return {code: {"model": Error, "description": described[code]} for code in codes}


def _validation_response(items: list[dict[str, Any]]) -> JSONResponse:
    cleaned = [{"loc": [p if isinstance(p, int) else str(p) for p in item.get("loc", ())],
                "msg": str(item.get("msg", "")).removeprefix("Value error, "), "type": str(item.get("type", ""))}
               for item in items]
    message = "\n".join(f"{'.'.join(str(p) for p in i['loc']) or '(body)'}: {i['msg']}" for i in cleaned)
    return JSONResponse(status_code=422, content={"detail": cleaned, "message": message})


def _spec_errors(error: ValidationError) -> list[dict[str, Any]]:
    items = []
    for item in error.errors(include_url=False, include_input=False):
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        items.append({"loc": ["body", *item["loc"]], "msg": msg, "type": item["type"]})
    return items


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(body: bytes) -> Any:
    """The JSON document of a request body; ValueError for anything a JobSpec cannot be: not UTF-8, not
    strict JSON (NaN, Infinity), nested deeper than MAX_JSON_DEPTH, strings with NUL or lone surrogates (no
    file system or PostgreSQL takes them)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"the body is not UTF-8 ({error.reason} at byte {error.start})") from None
    depth = peak = 0
    in_string = escaped = False
    for ch in text:  # bracket depth outside strings, before the parser recurses into it
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            peak = max(peak, depth)
            if peak > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            depth -= 1
    data = json.loads(text, parse_constant=_refuse_constant)

    def strings(value: Any) -> None:
        for item in (value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list)
                     else ()):
            for part in item:
                if isinstance(part, str):
                    if "\x00" in part:
                        raise ValueError("a string holds a NUL character")
                    try:
                        part.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ValueError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
                else:
                    strings(part)

    strings(data if isinstance(data, (dict, list)) else [data])
    return data


# --- the service -------------------------------------------------------------------------------------------
class Service:
    """Everything a request needs; built when the app starts."""

    def __init__(self, settings: Settings):
        from mlflow import MlflowClient

        self.settings = settings
        self.auth = Authenticator(settings.tokens)
        self.store = JobStore(settings.database_url)
        self.mlflow = MlflowClient(tracking_uri=settings.mlflow_uri)
        self.ray: RayJobs | None = None
        self.scheduler: Scheduler | None = None
        self.startup_error: str | None = None
        self._ray_capacity: dict[str, float] | None = None
        self._capacity_read_at = 0.0
        self._starter = threading.Thread(target=self._connect, name="saeforge-connect", daemon=True)

    def start(self) -> None:
        if not self.settings.tokens:
            log.warning("no API tokens configured (SAEFORGE_TOKENS_FILE / SAEFORGE_TOKENS): every /v1 request "
                        "will be refused")
        self._starter.start()

    def _connect(self) -> None:
        """MLflow's schema first (jobs must not race to create it), then Ray (embedded: started), then the
        scheduler; in the background so /healthz answers meanwhile."""
        try:
            self.mlflow.search_experiments(max_results=1)
            address = self.settings.ray_address or start_local_ray(self.settings.home, self.settings.local_ray_cpus)
            self.ray = RayJobs(address)
            self.scheduler = Scheduler(self.settings, self.store, self.ray, self.mlflow)
            self.scheduler.start()
            log.info("saeforge service ready: Ray at %s, %d jobs at most running", address,
                     self.settings.max_running)
        except Exception as error:  # noqa: BLE001 - reported by /readyz
            self.startup_error = f"{type(error).__name__}: {error}"
            log.error("the service could not start: %s", self.startup_error)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        self.store.close()

    def wake(self) -> None:
        if self.scheduler is not None:
            self.scheduler.wake()

    def view(self, job: Job) -> JobView:
        snap = job.result
        if job.state == "running":
            try:
                snap = snapshot(self.mlflow, job.experiment, job.id, self.settings.mlflow_ui_url)
            except Exception as error:  # noqa: BLE001 - the state is still known without MLflow
                log.warning("job %s: MLflow read failed: %s", job.id, error)
        mlflow = None
        if snap is not None:
            mlflow = MlflowView(experiment_id=snap["experiment_id"], run_id=snap["run_id"], run_url=snap["run_url"],
                                run_status=snap["run_status"])
        return JobView(
            id=job.id, name=job.name, owner=job.owner, state=job.state, experiment=job.experiment,
            created_at=_ts(job.created_at), started_at=_ts(job.started_at), finished_at=_ts(job.finished_at),
            message=job.message, attempts=job.attempts, cancel_requested=job.cancel_requested,
            output_uri=(snap or {}).get("output_uri") or job.output_uri, spec=job.spec,
            progress=Progress(**progress(job.spec, job.state, snap, job.started_at, job.finished_at or time.time())),
            mlflow=mlflow, dictionaries=[DictionaryView(**d) for d in (snap or {}).get("dictionaries", [])])

    def owned_job(self, job_id: str, owner: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
        if job.owner != owner:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"job {job_id!r} belongs to another owner")
        return job

    def capacity(self) -> Capacity:
        """The operator's per-rank budget, and what Ray's nodes offer (read once Ray answers)."""
        stale = time.monotonic() - self._capacity_read_at > CAPACITY_TTL_S  # nodes come and go (autoscaling)
        if (self._ray_capacity is None or stale) and self.ray is not None:
            self._ray_capacity = ray_capacity(self.ray.address) or self._ray_capacity
            self._capacity_read_at = time.monotonic()
        return cluster_capacity(self._ray_capacity, self.settings.rank_memory_bytes)

    def check_places(self, data: dict[str, Any], owner: str) -> dict[str, Any]:
        """The path policy (api/paths.py) on every place the raw spec names, then owner isolation: no place
        inside, equal to or above another owner's job folder."""
        try:
            data = check_spec_uris(JobSpec, data, self.settings.paths)
        except PathPolicyError as error:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(error)) from None
        places: list[tuple[str, str]] = []
        walk_uris(JobSpec, data, lambda where, value, _marker: places.append((where, value)) or value)
        if places:
            others = self.store.output_uris(exclude_owner=owner)
            for where, value in places:
                mine = value.rstrip("/").split("/")
                mine = mine[:next((i for i, part in enumerate(mine) if any(c in part for c in "*?[")), len(mine))]
                for other in others:
                    theirs = other.rstrip("/").split("/")
                    if mine[:len(theirs)] == theirs or theirs[:len(mine)] == mine:
                        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{where}: {value!r} reaches another "
                                            "owner's job folder; give a place of your own [rule: other-owner]")
        return data

    def prepare(self, data: Any, owner: str) -> tuple[JobSpec, str]:
        """Raw body → the JobSpec to run and its id; raises HTTPException or returns a 422 JSONResponse."""
        settings = self.settings
        if not isinstance(data, dict):
            raise _Invalid([{"loc": ["body"], "msg": "the job spec must be a JSON object", "type": "object_type"}])
        data = self.check_places(data, owner)
        try:
            spec = JobSpec.model_validate(data)
        except ValidationError as error:
            items = _spec_errors(error)
            if all(any(m in i["msg"] for m in MISSING_MARKERS) for i in items):
                raise HTTPException(status.HTTP_404_NOT_FOUND, "; ".join(
                    i["msg"].removeprefix("Value error, ") for i in items)) from None
            raise _Invalid(items) from None
        if spec.model.trust_remote_code and not settings.allow_trust_remote_code:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "model.trust_remote_code is refused by this service "
                                "(the operator can allow it with SAEFORGE_ALLOW_TRUST_REMOTE_CODE=true)")
        if spec.cluster.ray_address is not None:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "cluster.ray_address: the service chooses the Ray "
                                "cluster; remove this field")
        if spec.total_tokens > settings.max_tokens:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"training.tokens ({spec.training.tokens:,}) is more "
                                f"than this service runs in one job ({settings.max_tokens:,}, SAEFORGE_MAX_TOKENS); "
                                "lower it or split the job")
        try:
            spec.check_held_out()
        except ValueError as error:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
        shape = model_shape(spec)
        if shape is not None:
            try:
                spec.check_against_model(*shape)
                check_capacity(spec, shape[1], self.capacity())
            except ValueError as error:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
        job_id = new_job_id(spec.name)
        if spec.output.uri is None:  # the job's own folder under the output root (local or s3://)
            root = settings.output_root
            uri = str(Path(root) / job_id) if scheme(root) is None else join(root, job_id)
            spec = spec.model_copy(update={"output": spec.output.model_copy(update={"uri": uri})})
        return spec, job_id


class _Invalid(Exception):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items


bearer = HTTPBearer(auto_error=False, description="a token from SAEFORGE_TOKENS_FILE / SAEFORGE_TOKENS")


def service_of(request: Request) -> Service:
    return request.app.state.service


def owner_of(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    return service_of(request).auth(request)


Owner = Annotated[str, Depends(owner_of)]
JobId = Annotated[str, PathParam(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Experiment = Annotated[str, Query(min_length=1, max_length=256, description="MLflow experiment name")]
CompareJob = Annotated[str | None, Query(max_length=200, description="only this job's dictionaries")]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = Service(settings)
        app.state.service = service
        service.start()
        yield
        service.stop()

    app = FastAPI(title="saeforge", version="0.1.0", lifespan=lifespan,
                  description="Train sparse autoencoders on language-model activations: submit JobSpecs, watch "
                              "them, cancel them, compare the dictionaries.")
    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_response(list(error.errors()))

    @app.exception_handler(_Invalid)
    async def _invalid_spec(_request: Request, error: _Invalid) -> JSONResponse:
        return _validation_response(error.items)

    app.include_router(pages_router)  # the analysis: JSON routes and the latent pages (api/pages.py)

    @app.get("/healthz", response_model=Health, tags=["health"], summary="liveness")
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, tags=["health"], summary="readiness: job store, Ray, MLflow",
             responses={503: {"model": Readiness, "description": "not ready yet"}})
    def readyz(request: Request):
        service = service_of(request)
        checks = {"store": service.store.ping(),
                  "ray": service.ray is not None and service.ray.ping(),
                  "scheduler": service.scheduler is not None and service.scheduler.reconciled}
        ready = all(checks.values())
        body = Readiness(status="ready" if ready else "not ready", checks=checks,
                         detail=service.startup_error or (service.scheduler.last_error if service.scheduler else None))
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.post("/v1/jobs", status_code=201, response_model=JobView, tags=["jobs"], summary="submit a job",
              responses={**_errors(400, 401, 403, 404, 413), 422: {"model": ValidationErrorBody}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}}})
    async def submit(request: Request, owner: Owner) -> JobView:
        service = service_of(request)
        too_large = HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"the job spec is over {MAX_BODY_BYTES} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_large  # refused before it is read
        body = bytearray()
        async for chunk in request.stream():  # chunked bodies too: stop reading at the limit
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_large
        try:
            data = parse_body(bytes(body))
        except ValueError as error:
            raise _Invalid([{"loc": ["body"], "msg": f"not valid JSON: {error}", "type": "json_invalid"}]) from None
        spec, job_id = await run_in_threadpool(service.prepare, data, owner)
        dumped = spec.model_dump(mode="json")
        job = await run_in_threadpool(service.store.create, job_id, owner, spec.name, dumped,
                                      spec.tracking.experiment, spec.output.uri)
        service.wake()
        log.info("job %s submitted by %s", job_id, owner)
        return await run_in_threadpool(service.view, job)

    @app.get("/v1/jobs", response_model=JobList, tags=["jobs"], summary="your jobs, newest first",
             responses=_errors(401))
    def list_jobs(request: Request, owner: Owner,
                  state: Annotated[list[JobState] | None, Query(description="only jobs in these states")] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> JobList:
        jobs, total = service_of(request).store.list(owner=owner, states=state, limit=limit, offset=offset)
        return JobList(items=[JobSummary(id=j.id, name=j.name, owner=j.owner, state=j.state, experiment=j.experiment,
                                         created_at=_ts(j.created_at), started_at=_ts(j.started_at),
                                         finished_at=_ts(j.finished_at), message=j.message) for j in jobs],
                       total=total, limit=limit, offset=offset)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"],
             summary="state, progress, latest metrics, MLflow runs and outputs of a job",
             responses=_errors(401, 403, 404))
    def get_job(request: Request, owner: Owner, job_id: JobId) -> JobView:
        service = service_of(request)
        return service.view(service.owned_job(job_id, owner))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView, tags=["jobs"],
              summary="cancel a job (queued: at once; running: Ray stops it, checkpoints are kept)",
              responses=_errors(401, 403, 404, 409, 503))
    def cancel_job(request: Request, owner: Owner, job_id: JobId) -> JobView:
        service = service_of(request)
        job = service.owned_job(job_id, owner)
        if job.terminal:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id!r} already {job.state}")
        if service.scheduler is None:
            if not service.store.transition(job.id, ("queued",), "cancelled", message="cancelled while queued"):
                raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Ray is not connected yet; try again")
        else:
            service.scheduler.cancel(job)
        log.info("job %s cancel requested by %s", job_id, owner)
        return service.view(service.store.get(job_id))

    @app.get("/v1/jobs/{job_id}/logs", response_model=JobLogs, tags=["jobs"], summary="the job's driver log",
             responses=_errors(401, 403, 404, 503))
    def job_logs(request: Request, owner: Owner, job_id: JobId,
                 tail: Annotated[int, Query(ge=1, le=100_000, description="last lines")] = 200) -> JobLogs:
        service = service_of(request)
        job = service.owned_job(job_id, owner)
        text = ""
        if job.state != "queued" or job.attempts:
            if service.ray is None:
                raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Ray is not connected yet; try again")
            try:
                text = service.ray.logs(job.id) or ""
            except RayUnavailable as error:
                raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Ray did not answer: {error}") from None
        return JobLogs(id=job.id, state=job.state, logs="\n".join(text.splitlines()[-tail:]))

    def _compare(service: Service, experiment: str, job_id: str | None, log_to_mlflow: bool) -> dict[str, Any]:
        from services.compare import ExperimentNotFound, compare

        try:
            return compare(service.settings.mlflow_uri, experiment, job_id, log_to_mlflow=log_to_mlflow)
        except ExperimentNotFound as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None

    @app.get("/v1/compare", response_model=CompareView, tags=["compare"],
             summary="table of an experiment's dictionaries; logs the L0-vs-FVU Pareto plot to MLflow",
             responses=_errors(401, 404))
    def compare_view(request: Request, owner: Owner, experiment: Experiment, job_id: CompareJob = None):
        result = _compare(service_of(request), experiment, job_id, True)
        query = "experiment=" + quote(experiment, safe="") + ("&job_id=" + quote(job_id, safe="") if job_id else "")
        return CompareView(**{k: v for k, v in result.items() if k != "plot_png"},
                           plot_path=f"/v1/compare/plot.png?{query}")

    @app.get("/v1/compare/plot.png", tags=["compare"], summary="the Pareto plot (L0 vs FVU) as PNG",
             response_class=Response,
             responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                              "description": "PNG"}, **_errors(401, 404)})
    def compare_plot(request: Request, owner: Owner, experiment: Experiment, job_id: CompareJob = None) -> Response:
        result = _compare(service_of(request), experiment, job_id, False)
        return Response(result["plot_png"], media_type="image/png")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        spec_schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(spec_schema.pop("$defs", {}))
        components["JobSpec"] = spec_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app


# Seconds an idle keep-alive connection stays open. It must exceed every client's own idle limit, so that the
# client always drops a connection first: uvicorn's default (5 s) equals httpx's keepalive_expiry (5 s), and
# since the server's timer starts before the client has read the response, a client whose poll gap reached
# ~5 s sent its request as the server closed the socket and got "Connection reset by peer" (the load test).
# 75 s also outlasts the 60-s idle timeout of the usual ingress proxies and load balancers.
KEEP_ALIVE_SECONDS = 75


def serve(host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(), host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_SECONDS)
