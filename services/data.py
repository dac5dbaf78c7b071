"""Documents for a job: the embedded corpus or local text/JSONL files, split into disjoint slices.

The embedded corpus is Python's own documentation: the pydoc topics and the docstrings of the standard
library's source files (read with `ast`, so no module is imported), which ships with every interpreter.
"""

from __future__ import annotations

import ast
import glob
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


def _files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".md"))
    if any(ch in source for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    return [path]


def _read_file(path: Path, fmt: str, text_field: str) -> list[str]:
    fmt = fmt if fmt != "auto" else ("jsonl" if path.suffix in (".jsonl", ".json") else "text")
    if fmt == "text":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    documents = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"data.text_field: {path}:{number} has no field {text_field!r} "
                                 f"(fields: {sorted(record)}); set data.text_field to the one holding the text")
            documents.append(str(record[text_field]))
    return documents


def load_documents(spec: DataSpec) -> list[str]:
    if spec.source == "embedded":
        return embedded_documents()
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
