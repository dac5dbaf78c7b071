"""One path policy for every field of a JobSpec that names a place: what a job may read and write.

A JobSpec field names a place when its type carries the `Uri` marker (`Annotated[str, Uri("read", "data")]`);
`check_spec_uris` walks the JobSpec's model tree and checks every marked field, so a field added later is
covered by declaring it that way. The API applies the policy to the raw body (before the JobSpec's own checks
look at the disk, so a refused path is never told apart from a missing one) and the job runner applies it
again, from the same environment variables, before it touches storage.

The rules (configured by the operator; docs/service.md):
- local paths and file:// URIs: '..' refused, `~` expanded, symlinks resolved, then the place must lie under
  one of the roots of its kind (model: SAEFORGE_MODEL_ROOTS; data: SAEFORGE_DATA_ROOTS or the output root,
  where earlier jobs wrote their caches; writes: SAEFORGE_OUTPUT_ROOT). Roots left unset allow any local
  place (a laptop); the API always has an output root.
- s3:// URIs: bucket and key checked for shape ('..', '.', empty segments refused); reads must lie under an
  s3:// entry of the kind's roots, the output root or SAEFORGE_S3_PREFIXES; writes under the output root or a
  `write:` entry of SAEFORGE_S3_PREFIXES. With no S3 rule configured at all, any bucket is allowed (a laptop).
- every other scheme, fsspec's chained URLs (`simplecache::s3://...`) and control characters are refused.
- Hugging Face hub ids (`org/name[@revision]` in model.name or data.source) name no place on this machine, so
  the roots cannot judge them: SAEFORGE_HUB_ALLOW lists the ids (`org/name`) and orgs (`org/`) jobs may use, or
  `*` for any. Unset, hub ids are allowed where the field's roots are unset too (a laptop, `saeforge run`) and
  refused where they are set (a shared service must say which hub content its jobs may fetch).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from storage.uri import scheme

GLOB_CHARS = "*?["
# A Hugging Face hub id, optionally at a revision: org/name[@revision] (a relative path that exists wins).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(@[A-Za-z0-9_./-]{1,128})?")
HUB_ORG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/")
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
Access = Literal["read", "write"]
Kind = Literal["model", "data", "output"]


@dataclass(frozen=True)
class Uri:
    """Marks a JobSpec field that names a place. access: the job reads or writes it; kind: whose roots apply;
    sentinels: values that name no place ('embedded')."""

    access: Access
    kind: Kind
    sentinels: tuple[str, ...] = ("embedded",)
    glob: bool = False  # the value may be a glob pattern (read only)
    not_a_place: Callable[[str], bool] | None = None  # e.g. a hub id (org/name), which names no file

    def names_place(self, value: str) -> bool:
        return value not in self.sentinels and not (self.not_a_place is not None and self.not_a_place(value))


class PathPolicyError(ValueError):
    """A place the operator's configuration does not allow (HTTP 403); the message names the field and rule."""


def _split(value: str | None) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


def _s3_parts(uri: str) -> tuple[str, list[str]] | None:
    """(bucket, key segments) of a well-formed s3:// URI; None when it is not one."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    segments = key.split("/") if key else []
    if segments and segments[-1] == "":  # one trailing slash names the same prefix
        segments = segments[:-1]
    if not BUCKET.match(bucket) or ".." in bucket or any(s in ("", ".", "..") for s in segments) or "\\" in rest:
        return None
    return bucket, segments


def _normal_root(entry: str) -> str:
    if scheme(entry) == "s3":
        parts = _s3_parts(entry)
        if parts is None:
            raise ValueError(f"{entry!r} is not a valid s3:// prefix (s3://bucket/key)")
        return "s3://" + "/".join([parts[0], *parts[1]])
    return str(Path(entry.removeprefix("file://")).expanduser().resolve())


def _under_s3(uri: str, roots: list[str]) -> bool:
    return any(uri == root or uri.startswith(root.rstrip("/") + "/") for root in roots)


def _under_local(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


@dataclass(frozen=True)
class PathPolicy:
    """The operator's roots. None for a list: not configured (anything allowed there)."""

    model_roots: tuple[str, ...] | None = None
    data_roots: tuple[str, ...] | None = None
    output_root: str | None = None
    s3_read: tuple[str, ...] = ()  # SAEFORGE_S3_PREFIXES entries (read: and write:)
    s3_write: tuple[str, ...] = ()  # write: entries only
    hub_allow: tuple[str, ...] | None = None  # SAEFORGE_HUB_ALLOW: 'org/name', 'org/' or '*'; None: not set

    @classmethod
    def from_env(cls, env: Mapping[str, str], output_root: str | None = None) -> PathPolicy:
        """SAEFORGE_MODEL_ROOTS / SAEFORGE_DATA_ROOTS (local folders and s3:// prefixes, comma-separated),
        SAEFORGE_OUTPUT_ROOT (default: output_root), SAEFORGE_S3_PREFIXES ("read:s3://corpora,
        write:s3://team/scratch"; a bare entry is read-only) and SAEFORGE_HUB_ALLOW ("HuggingFaceTB/,
        monology/pile-uncopyrighted"). Raises ValueError naming the variable."""
        def roots(name: str) -> tuple[str, ...] | None:
            if not _split(env.get(name)):
                return None
            try:
                return tuple(_normal_root(e) for e in _split(env.get(name)))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None

        read: list[str] = []
        write: list[str] = []
        for entry in _split(env.get("SAEFORGE_S3_PREFIXES")):
            mode, sep, uri = entry.partition(":")
            if not sep or mode not in ("read", "write"):
                mode, uri = "read", entry
            if scheme(uri) != "s3":
                raise ValueError(f"SAEFORGE_S3_PREFIXES: {entry!r} is not an s3:// prefix; give "
                                 "'read:s3://bucket/prefix' or 'write:s3://bucket/prefix', comma-separated")
            try:
                uri = _normal_root(uri)
            except ValueError as error:
                raise ValueError(f"SAEFORGE_S3_PREFIXES: {error}") from None
            read.append(uri)
            if mode == "write":
                write.append(uri)
        out = env.get("SAEFORGE_OUTPUT_ROOT") or output_root
        try:
            out = _normal_root(out) if out else None
        except ValueError as error:
            raise ValueError(f"SAEFORGE_OUTPUT_ROOT: {error}") from None
        hub_allow = None
        if _split(env.get("SAEFORGE_HUB_ALLOW")):
            hub_allow = tuple(_split(env.get("SAEFORGE_HUB_ALLOW")))
            for entry in hub_allow:
                if entry != "*" and not HUB_ORG.fullmatch(entry) and not (HUB_ID.fullmatch(entry) and "@" not in entry):
                    raise ValueError(f"SAEFORGE_HUB_ALLOW: {entry!r} is not a hub id or org; give 'org/name' (one "
                                     "repository, any revision), 'org/' (every repository of the org) or '*' (any), "
                                     "comma-separated")
        return cls(roots("SAEFORGE_MODEL_ROOTS"), roots("SAEFORGE_DATA_ROOTS"), out, tuple(read), tuple(write),
                   hub_allow)

    def env(self) -> dict[str, str]:
        """The same policy as environment variables (what the service passes to the jobs it runs)."""
        env = {"SAEFORGE_S3_PREFIXES": ",".join(
            [f"write:{u}" for u in self.s3_write] + [f"read:{u}" for u in self.s3_read if u not in self.s3_write])}
        if self.model_roots is not None:
            env["SAEFORGE_MODEL_ROOTS"] = ",".join(self.model_roots)
        if self.data_roots is not None:
            env["SAEFORGE_DATA_ROOTS"] = ",".join(self.data_roots)
        if self.output_root is not None:
            env["SAEFORGE_OUTPUT_ROOT"] = self.output_root
        if self.hub_allow is not None:
            env["SAEFORGE_HUB_ALLOW"] = ",".join(self.hub_allow)
        return env

    def roots(self, access: Access, kind: Kind) -> list[str] | None:
        """The roots a place of this access and kind must lie under; None: any place."""
        if access == "write" or kind == "output":
            return None if self.output_root is None else [self.output_root]
        configured = self.model_roots if kind == "model" else self.data_roots
        if configured is None:
            return None
        return list(configured) + ([self.output_root] if kind == "data" and self.output_root else [])

    # --- one value --------------------------------------------------------------------------------------
    def check_hub_id(self, value: str, marker: Uri, field: str) -> str:
        """A hub id (org/name[@revision]) as given, when SAEFORGE_HUB_ALLOW (or, unset, the absence of roots
        for the field's kind) allows it; PathPolicyError otherwise."""
        given = value.partition("@")[0]
        repo = given.lower()  # the hub treats ids case-insensitively
        if self.hub_allow is None:
            if self.roots(marker.access, marker.kind) is None:
                return value
            variable = "SAEFORGE_MODEL_ROOTS" if marker.kind == "model" else "SAEFORGE_DATA_ROOTS"
            raise PathPolicyError(f"{field}: {value!r} is a Hugging Face hub id, and this service ({variable} set) "
                                  "takes hub ids only from SAEFORGE_HUB_ALLOW, which is not set; ask the operator "
                                  f"to add {given.split('/')[0] + '/'!r} or {given!r} to it, or give a path under "
                                  "the allowed folders [rule: hub-allow]")
        if any(e == "*" or e.lower() == repo or (e.endswith("/") and repo.startswith(e.lower()))
               for e in self.hub_allow):
            return value
        raise PathPolicyError(f"{field}: the Hugging Face hub id {value!r} is not in this service's allow-list "
                              f"(SAEFORGE_HUB_ALLOW: {', '.join(self.hub_allow)}); ask the operator to add it or "
                              "its org, or give a path under the allowed folders [rule: hub-allow]")

    def check(self, value: str, marker: Uri, field: str) -> str:
        """The value normalized (local: absolute with symlinks resolved; s3: canonical); PathPolicyError when
        the policy refuses it."""
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise PathPolicyError(f"{field}: control characters (NUL, newline, ...) are not allowed in a path "
                                  "[rule: no-control-characters]")
        if "::" in value:
            raise PathPolicyError(f"{field}: chained fsspec URLs ('::') are not allowed; give one local path, "
                                  "file:// or s3:// URI [rule: scheme]")
        found = scheme(value)
        if found == "s3":
            return self._check_s3(value, marker, field)
        if found not in (None, "file"):
            raise PathPolicyError(f"{field}: the scheme {found!r} is not allowed; give a local path, file:// or "
                                  "s3:// URI [rule: scheme]")
        path = value.removeprefix("file://")
        if found == "file" and not path.startswith("/"):
            raise PathPolicyError(f"{field}: a file:// URI must name an absolute path (file:///folder/...) "
                                  "[rule: file-uri-absolute]")
        return self._check_local(path, marker, field, value)

    def _check_s3(self, value: str, marker: Uri, field: str) -> str:
        parts = _s3_parts(value)
        if parts is None:
            raise PathPolicyError(f"{field}: {value!r} is not a well-formed s3:// URI (s3://bucket/key; bucket of "
                                  "3-63 lowercase letters, digits, '.', '-'; no '.', '..' or empty key segments) "
                                  "[rule: s3-uri-shape]")
        if marker.access == "write" and any(c in value for c in GLOB_CHARS):
            raise PathPolicyError(f"{field}: a place to write cannot be a glob pattern [rule: no-glob-write]")
        uri = "s3://" + "/".join([parts[0], *parts[1]])
        if marker.access == "write":
            allowed = list(self.s3_write) + [r for r in [self.output_root] if r and r.startswith("s3://")]
            unconfigured = self.output_root is None and not self.s3_write
        else:
            roots = self.roots("read", marker.kind) or []
            allowed = list(self.s3_read) + [r for r in roots if r.startswith("s3://")]
            if self.output_root and self.output_root.startswith("s3://"):
                allowed.append(self.output_root)
            unconfigured = not allowed  # no S3 rule at all (local roots do not govern S3)
        if unconfigured or _under_s3(uri, allowed):
            return uri if not value.endswith("/") else uri + "/"
        what = "write" if marker.access == "write" else "read"
        listed = ", ".join(allowed) or "none"
        raise PathPolicyError(f"{field}: {value!r} is outside the S3 prefixes this service lets jobs {what} "
                              f"({listed}); ask the operator to add it to SAEFORGE_S3_PREFIXES [rule: s3-prefix]")

    def _check_local(self, value: str, marker: Uri, field: str, given: str) -> str:
        if ".." in PurePosixPath(value).parts:
            raise PathPolicyError(f"{field}: '..' is not allowed in paths; give the path under an allowed root "
                                  "[rule: no-dotdot]")
        configured = self.roots(marker.access, marker.kind)
        roots = [Path(r) for r in configured or [] if scheme(r) is None]
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (roots[0] if roots else Path.cwd()) / path
        glob_at = next((i for i, part in enumerate(path.parts) if any(c in part for c in GLOB_CHARS)), None)
        if glob_at is not None and (marker.access == "write" or not marker.glob):
            raise PathPolicyError(f"{field}: glob patterns are not allowed here [rule: no-glob]")
        literal = Path(*path.parts[:glob_at]) if glob_at is not None else path
        resolved = literal.resolve()
        if configured is None:
            return str(resolved if glob_at is None else Path(resolved, *path.parts[glob_at:]))
        if not _under_local(resolved, roots):
            kinds = {"model": "SAEFORGE_MODEL_ROOTS", "data": "SAEFORGE_DATA_ROOTS"}
            variable = "SAEFORGE_OUTPUT_ROOT" if marker.access == "write" else kinds[marker.kind]
            raise PathPolicyError(f"{field}: {given!r} is outside the allowed folders "
                                  f"({', '.join(str(r) for r in roots) or 'no local folder'}; {variable}); "
                                  "ask the operator or move the files [rule: local-root]")
        if glob_at is not None:
            for match in Path("/").glob(str(path).lstrip("/")):
                if not _under_local(match.resolve(), roots):
                    raise PathPolicyError(f"{field}: {given!r} matches {match}, which links outside the allowed "
                                          "folders [rule: local-root]")
            return str(Path(resolved, *path.parts[glob_at:]))
        return str(resolved)


# --- the spec -------------------------------------------------------------------------------------------
def _models(annotation: Any) -> Iterator[type]:
    """The pydantic model classes inside a field's type (X, X | None, list[X], dict[str, X])."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    if get_origin(annotation) in (Union, UnionType, list, tuple, dict) or get_args(annotation):
        for arg in get_args(annotation):
            yield from _models(arg)


def walk_uris(model: type, data: Any, visit: Callable[[str, str, Uri], str], prefix: str = "",
              hub_ids: bool = False) -> Any:
    """data (a raw or dumped JobSpec dict) with each value of a Uri-marked field replaced by visit(field path,
    value, marker); every other value is kept as given (the JobSpec's own validation judges it). Hub ids name
    no place and are skipped unless hub_ids (the policy's allow-list judges them)."""
    if not isinstance(data, dict):
        return data

    def wanted(value: Any, marker: Uri) -> bool:
        return isinstance(value, str) and (marker.names_place(value) or hub_ids and value not in marker.sentinels)
    out = dict(data)
    for name, info in model.model_fields.items():
        if name not in data:
            continue
        value, where = data[name], f"{prefix}{name}"
        marker = next((m for m in info.metadata if isinstance(m, Uri)), None)
        if marker is not None:
            if wanted(value, marker):
                out[name] = visit(where, value, marker)
            elif isinstance(value, list):
                out[name] = [visit(f"{where}[{i}]", v, marker) if wanted(v, marker) else v
                             for i, v in enumerate(value)]
            continue
        for sub in _models(info.annotation):
            if isinstance(value, dict) and get_origin(info.annotation) is not dict:
                out[name] = value = walk_uris(sub, value, visit, where + ".", hub_ids)
            elif isinstance(value, list):
                out[name] = value = [walk_uris(sub, v, visit, f"{where}[{i}].", hub_ids) for i, v in enumerate(value)]
    return out


def check_spec_uris(model: type, data: dict[str, Any], policy: PathPolicy) -> dict[str, Any]:
    """Every Uri-marked field of `data` checked (PathPolicyError for the first refused) and normalized; hub ids
    checked against the allow-list."""
    def check(where: str, value: str, marker: Uri) -> str:
        if marker.names_place(value):
            return policy.check(value, marker, where)
        return policy.check_hub_id(value, marker, where)

    return walk_uris(model, data, check, hub_ids=True)


def marked_fields(model: type, prefix: str = "") -> list[str]:
    """The dotted paths of every Uri-marked field of a model tree (for tests and docs)."""
    found = []
    for name, info in model.model_fields.items():
        if any(isinstance(m, Uri) for m in info.metadata):
            found.append(prefix + name)
        for sub in _models(info.annotation):
            found += marked_fields(sub, f"{prefix}{name}.")
    return found


def checked_spec(spec: Any, env: Mapping[str, str] | None = None) -> Any:
    """A JobSpec with every place checked against the policy of `env` (default: this process's environment,
    which the service sets for the jobs it runs) and normalized; the job runner calls it before it touches
    storage. PathPolicyError (a ValueError) when a place is refused."""
    import os

    from api.jobspec import JobSpec

    policy = PathPolicy.from_env(os.environ if env is None else env)
    return JobSpec.model_validate(check_spec_uris(JobSpec, spec.model_dump(mode="json"), policy))
