"""Bearer-token authentication and the checks on what a JobSpec may reach on the service's machines.

Tokens map to owners (from SAEFORGE_TOKENS_FILE / SAEFORGE_TOKENS); a job belongs to the owner whose token
submitted it and only that owner may read, cancel or tail it. Tokens are compared in constant time and
never logged or echoed.
"""

from __future__ import annotations

import hmac
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import HTTPException, Request, status

GLOB_CHARS = "*?["


class Authenticator:
    def __init__(self, tokens: dict[str, str]):
        self._tokens = [(token.encode(), owner) for token, owner in tokens.items()]

    def owner_of(self, token: str) -> str | None:
        given = token.encode()
        found = None
        for known, owner in self._tokens:  # no early exit: the time taken does not depend on which matched
            if hmac.compare_digest(known, given):
                found = owner
        return found

    def __call__(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token: send 'Authorization: Bearer "
                                "<token>' (saeforge CLI: --token or SAEFORGE_API_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})
        owner = self.owner_of(token.strip())
        if owner is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return owner


class PathPolicyError(ValueError):
    """A JobSpec path the operator's configuration does not allow (HTTP 403)."""


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def check_path(value: str, roots: list[Path], field: str) -> str:
    """The path made absolute; raises PathPolicyError when it escapes the allowed roots (no '..', symlinks
    resolved). With no roots configured any path is allowed (a laptop)."""
    if "\x00" in value:
        raise PathPolicyError(f"{field}: the path contains a NUL character")
    if ".." in PurePosixPath(value).parts:
        raise PathPolicyError(f"{field}: '..' is not allowed in paths; give the path under an allowed root")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (roots[0] if roots else Path.cwd()) / path
    glob_at = next((i for i, part in enumerate(path.parts) if any(c in part for c in GLOB_CHARS)), None)
    literal = Path(*path.parts[:glob_at]) if glob_at is not None else path
    if roots:
        resolved = literal.resolve()
        if not _under(resolved, roots):
            raise PathPolicyError(f"{field}: {value!r} is outside the allowed folders "
                                  f"({', '.join(str(r) for r in roots)}); ask the operator or move the files")
        if glob_at is not None:
            for match in Path("/").glob(str(path).lstrip("/")):
                if not _under(match.resolve(), roots):
                    raise PathPolicyError(f"{field}: {value!r} matches {match}, which links outside the allowed "
                                          "folders")
    return str(path)


def apply_path_policy(data: dict[str, Any], model_roots: list[Path], data_roots: list[Path]) -> dict[str, Any]:
    """Raw JobSpec dict → the same with local paths absolute, before the JobSpec checks that they exist
    (so a path outside the roots is refused without telling whether it exists)."""
    data = dict(data)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str) and model["name"] != "embedded" \
            and model.get("random") is None:
        data["model"] = {**model, "name": check_path(model["name"], model_roots, "model.name")}
    source = data.get("data")
    if isinstance(source, dict) and isinstance(source.get("source"), str) and source["source"] != "embedded":
        data["data"] = {**source, "source": check_path(source["source"], data_roots, "data.source")}
    return data
