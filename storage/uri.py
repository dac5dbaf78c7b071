"""URIs and file systems: every path the service writes goes through fsspec (file:// default, s3:// via s3fs)."""

from __future__ import annotations

import fsspec
from fsspec.core import url_to_fs


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system that holds `uri` and the path inside it."""
    return url_to_fs(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def pyarrow_filesystem(uri: str):
    """(pyarrow file system, path) for `uri`, through the same fsspec file system every other write uses (its
    endpoint and credentials included) — what Ray Train's storage needs for its checkpoints."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs)), path
