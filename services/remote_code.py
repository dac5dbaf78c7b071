"""The remote-code policy: a model's own Python code runs only where the server's operator allowed it."""

from __future__ import annotations

import os

from api.jobspec import ModelSpec

ALLOW_REMOTE_CODE_ENV = "SAEFORGE_ALLOW_TRUST_REMOTE_CODE"


def remote_code_allowed() -> bool:
    return os.environ.get(ALLOW_REMOTE_CODE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_remote_code(model: ModelSpec) -> None:
    """Refuse trust_remote_code unless the server's operator allowed it (SAEFORGE_ALLOW_TRUST_REMOTE_CODE=1)."""
    if model.trust_remote_code and not remote_code_allowed():
        raise ValueError("model.trust_remote_code: this server does not run code shipped with models; set "
                         "model.trust_remote_code to false, or ask the operator to set "
                         f"{ALLOW_REMOTE_CODE_ENV}=1 on the server")
