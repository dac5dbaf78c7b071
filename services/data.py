"""Documents for a job: the embedded corpus, text / JSONL / Parquet files (local or s3://, a file, a folder or a
glob pattern) or a dataset saved with `datasets.save_to_disk`, split into disjoint slices.

The embedded corpus is Python's own documentation: the pydoc topics and the docstrings of the standard
library's source files (read with `ast`, so no module is imported), which ships with every interpreter.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from api.jobspec import DataSpec

MIN_DOCUMENT_CHARS = 200


def embedded_documents() -> list[str]:
    """Cached per interpreter version: parsing the standard library takes seconds, reading the cache does not."""
    cache = Path(os.environ.get("SAEFORGE_CACHE", Path.home() / ".cache" / "saeforge"))
    path = cache / f"embedded-corpus-py{sys.version_info.major}.{sys.version_info.minor}-v1.json"
    if path.is_file():
        return json.loads(path.read_text())
    documents = _embedded_documents()
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(documents))
    partial.replace(path)  # atomic: concurrent producers never read a half-written cache
    return documents


def _embedded_documents() -> list[str]:
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        skipped = parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in parts
        if skipped or path.name.startswith("test"):
            continue
        documents.extend(_docstrings(path))
    return [doc for doc in documents if len(doc) >= MIN_DOCUMENT_CHARS]


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json")


def _has_scheme(source: str) -> bool:
    return "://" in source


def _filesystem(source: str):
    from storage.uri import filesystem

    return filesystem(source if _has_scheme(source) else str(Path(source).expanduser()))


def _uri(fs, path: str) -> str:
    """A path that fsspec returned, with the scheme it needs to be opened again (s3fs drops it)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def is_saved_dataset(source: str) -> bool:
    fs, path = _filesystem(source)
    return fs.isdir(path) and any(fs.exists(f"{path.rstrip('/')}/{m}") for m in SAVED_DATASET_MARKERS)


def _files(source: str) -> list[str]:
    """The files a source names, sorted: one file, the data files under a folder, or a glob pattern's matches."""
    fs, path = _filesystem(source)
    if any(ch in path for ch in "*?["):
        found = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(DATA_SUFFIXES)]
    elif fs.exists(path):
        found = [path]
    else:
        raise ValueError(f"data.source: {source!r} does not exist; give an existing file, folder, glob pattern or "
                         "saved dataset")
    return [_uri(fs, p) for p in sorted(found)]


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "jsonl" if path.endswith(JSONL_SUFFIXES) else "text"


def _read_file(path: str, fmt: str, text_field: str) -> list[str]:
    import fsspec

    fmt = _format_of(path, fmt)
    if fmt == "text":
        with fsspec.open(path, "rb") as handle:
            text = handle.read().decode("utf-8", errors="replace")
        return [text] if text.strip() else []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            columns = parquet.schema_arrow.names
            if text_field not in columns:
                raise ValueError(f"data.text_field: {path} has no column {text_field!r} (columns: {columns}); set "
                                 "data.text_field to the one holding the text")
            return [str(t) for t in parquet.read(columns=[text_field]).column(text_field).to_pylist()
                    if t is not None]
    if fmt == "hf_dataset":
        raise ValueError(f"data.format 'hf_dataset' needs a saved dataset folder, not the file {path}; point "
                         "data.source at the folder save_to_disk wrote")
    documents = []
    with fsspec.open(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"data.text_field: {path}:{number} has no field {text_field!r} "
                                 f"(fields: {sorted(record)}); set data.text_field to the one holding the text")
            documents.append(str(record[text_field]))
    return documents


def _read_saved_dataset(source: str, text_field: str) -> list[str]:
    """A dataset written by `datasets.save_to_disk` (a Dataset, or a DatasetDict: its splits in order)."""
    import datasets

    saved = datasets.load_from_disk(source)
    splits = [saved[name] for name in saved] if isinstance(saved, datasets.DatasetDict) else [saved]
    documents = []
    for split in splits:
        if text_field not in split.column_names:
            raise ValueError(f"data.text_field: the dataset at {source} has no column {text_field!r} (columns: "
                             f"{split.column_names}); set data.text_field to the one holding the text")
        documents.extend(str(t) for t in split[text_field] if t is not None)
    return documents


def load_documents(spec: DataSpec) -> list[str]:
    if spec.source == "embedded":
        return embedded_documents()
    if spec.format == "hf_dataset" or (spec.format == "auto" and is_saved_dataset(spec.source)):
        documents = _read_saved_dataset(spec.source, spec.text_field)
    else:
        documents = []
        for path in _files(spec.source):
            documents.extend(_read_file(path, spec.format, spec.text_field))
    if not documents:
        raise ValueError(f"data.source: {spec.source!r} holds no text; give files with text in them")
    return documents


def split_documents(documents: list[str], holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and held-out documents, fixed by the seed; at least one of each when possible."""
    order = np.random.default_rng(seed).permutation(len(documents))
    held = int(round(len(documents) * holdout_fraction))
    if holdout_fraction > 0 and len(documents) >= 2:
        held = max(held, 1)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def producer_slice(indices: list[int], producer: int, producers: int) -> list[int]:
    """The documents producer `producer` of `producers` reads: disjoint slices that cover `indices`."""
    return indices[producer::producers]


def corpus_fingerprint(documents: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(hashlib.sha256(doc.encode()).digest())
    return digest.hexdigest()[:16]
