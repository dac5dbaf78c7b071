"""The service's configuration, read once from the environment (the Helm chart sets the same names).

SAEFORGE_HOME             the service's folder (default ./runs): SQLite files, embedded Ray's state, outputs
SAEFORGE_DATABASE_URL     SQLAlchemy URL of the job store (default sqlite:///$SAEFORGE_HOME/saeforge.db)
SAEFORGE_RAY_ADDRESS      Ray job-submission address (http://head:8265); unset: `serve` starts a local Ray
SAEFORGE_TOKENS_FILE      JSON file {"<token>": "<owner>"}; SAEFORGE_TOKENS: the same JSON, or "tok:owner,..."
MLFLOW_TRACKING_URI       MLflow backend (default sqlite:///$SAEFORGE_HOME/mlflow.db)
SAEFORGE_OUTPUT_ROOT      where job folders go (default $SAEFORGE_HOME); a job's output.uri must lie under it
SAEFORGE_MAX_RUNNING_JOBS jobs running at once; the rest wait queued (default 2)
SAEFORGE_ALLOW_TRUST_REMOTE_CODE  "true" lets a JobSpec set model.trust_remote_code
SAEFORGE_MODEL_ROOTS / SAEFORGE_DATA_ROOTS  comma-separated folders and s3:// prefixes that model / data
                          places must lie under (unset: any, for a laptop); api/paths.py has the whole policy
SAEFORGE_S3_PREFIXES      S3 prefixes jobs may use: "read:s3://corpora,write:s3://team/scratch" (bare: read)
SAEFORGE_HUB_ALLOW        Hugging Face hub ids and orgs jobs may name: "HuggingFaceTB/,monology/pile-uncopyrighted"
                          or "*"; unset: hub ids are refused where the field's roots are set, allowed where not
SAEFORGE_RANK_MEMORY_GIB  memory one trainer rank may use (default: the largest Ray node's memory)
SAEFORGE_MAX_TOKENS       most training tokens one job may ask for (default 10^11)
SAEFORGE_JOB_COMMAND      the command a Ray job runs (default: `saeforge`, or this Python for the local Ray)
SAEFORGE_LOCAL_RAY_CPUS   logical CPUs of the embedded Ray (default max(cores, 3 × max running jobs))
SAEFORGE_POLL_SECONDS     how often the scheduler reconciles with Ray (default 2)
SAEFORGE_MLFLOW_UI_URL    base URL of the MLflow UI for links (default: the tracking URI when it is http)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from api.paths import PathPolicy

TRUE = {"1", "true", "yes", "on"}
# Logical CPUs a default job holds on Ray: a producer, the splice evaluator and a trainer rank. The embedded Ray
# offers this many per running job, so that admitted jobs never wait on each other for CPUs.
CPUS_PER_JOB = 3


class SettingsError(ValueError):
    """A configuration the service cannot start with; the message names the variable."""


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """{"token": "owner"} as JSON, or "token:owner,token2:owner2"."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SettingsError(f"{source}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in data.items()):
            raise SettingsError(f'{source}: give a JSON object {{"<token>": "<owner>"}} of non-empty strings')
        return dict(data)
    tokens = {}
    for item in text.split(","):
        token, sep, owner = item.strip().rpartition(":")
        if not sep or not token or not owner:
            raise SettingsError(f"{source}: give 'token:owner' pairs separated by commas, or a JSON object")
        tokens[token] = owner
    return tokens


@dataclass
class Settings:
    home: Path
    database_url: str
    ray_address: str | None
    tokens: dict[str, str] = field(repr=False)
    mlflow_uri: str = field(repr=False)
    output_root: str
    max_running: int
    allow_trust_remote_code: bool
    paths: PathPolicy
    job_command: str
    local_ray_cpus: int
    poll_seconds: float
    mlflow_ui_url: str | None
    rank_memory_bytes: int | None = None  # None: ask Ray for its nodes' memory
    max_tokens: int = 10**11

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("SAEFORGE_HOME") or "runs").expanduser().resolve()
        tokens: dict[str, str] = {}
        if env.get("SAEFORGE_TOKENS_FILE"):
            path = Path(env["SAEFORGE_TOKENS_FILE"])
            try:
                tokens.update(parse_tokens(path.read_text(), f"SAEFORGE_TOKENS_FILE ({path})"))
            except OSError as error:
                raise SettingsError(f"SAEFORGE_TOKENS_FILE: cannot read {path}: {error.strerror}") from None
        tokens.update(parse_tokens(env.get("SAEFORGE_TOKENS", ""), "SAEFORGE_TOKENS"))
        try:
            max_running = int(env.get("SAEFORGE_MAX_RUNNING_JOBS") or 2)
            poll = float(env.get("SAEFORGE_POLL_SECONDS") or 2.0)
            rank_gib = float(env["SAEFORGE_RANK_MEMORY_GIB"]) if env.get("SAEFORGE_RANK_MEMORY_GIB") else None
            max_tokens = int(env.get("SAEFORGE_MAX_TOKENS") or 10**11)
        except ValueError:
            raise SettingsError("SAEFORGE_MAX_RUNNING_JOBS and SAEFORGE_MAX_TOKENS must be integers, "
                                "SAEFORGE_POLL_SECONDS and SAEFORGE_RANK_MEMORY_GIB numbers") from None
        if rank_gib is not None and not rank_gib > 0:
            raise SettingsError("SAEFORGE_RANK_MEMORY_GIB must be a positive number of GiB")
        output_root = env.get("SAEFORGE_OUTPUT_ROOT") or str(home)
        try:
            paths = PathPolicy.from_env(env, output_root=output_root)
        except ValueError as error:
            raise SettingsError(str(error)) from None
        if max_running < 1:
            raise SettingsError("SAEFORGE_MAX_RUNNING_JOBS must be at least 1")
        ray_address = env.get("SAEFORGE_RAY_ADDRESS") or None
        default_command = "saeforge" if ray_address else f"{sys.executable} -m api.cli"
        cpus = int(env.get("SAEFORGE_LOCAL_RAY_CPUS") or max(os.cpu_count() or 1, CPUS_PER_JOB * max_running))
        mlflow_uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
        return cls(
            home=home,
            database_url=env.get("SAEFORGE_DATABASE_URL") or f"sqlite:///{home / 'saeforge.db'}",
            ray_address=ray_address,
            tokens=tokens,
            mlflow_uri=mlflow_uri,
            output_root=paths.output_root,
            max_running=max_running,
            allow_trust_remote_code=(env.get("SAEFORGE_ALLOW_TRUST_REMOTE_CODE") or "").strip().lower() in TRUE,
            paths=paths,
            job_command=env.get("SAEFORGE_JOB_COMMAND") or default_command,
            local_ray_cpus=cpus,
            poll_seconds=poll,
            mlflow_ui_url=env.get("SAEFORGE_MLFLOW_UI_URL") or (mlflow_uri if mlflow_uri.startswith("http") else None),
            rank_memory_bytes=int(rank_gib * 2**30) if rank_gib else None,
            max_tokens=max_tokens,
        )
