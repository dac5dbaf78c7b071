"""URIs and file systems: every path the service writes goes through fsspec (file:// default, s3:// via s3fs)."""

from __future__ import annotations

import re

import fsspec
from fsspec.core import url_to_fs

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system that holds `uri` and the path inside it."""
    return url_to_fs(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def scheme(uri: str) -> str | None:
    """The URI's scheme as written ('s3', 'file', ...); None for a plain local path."""
    match = SCHEME.match(uri)
    return match.group(1) if match else None


def is_local(uri: str) -> bool:
    return scheme(uri) in (None, "file")


def local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def pyarrow_filesystem(uri: str):
    """(pyarrow file system, path) for `uri`, through the same fsspec file system every other write uses (its
    endpoint and credentials included) — what Ray Train's storage needs for its checkpoints."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs)), path
