"""A job's corpus as a list of pieces read one at a time: the embedded corpus, text / JSONL / Parquet files (local,
s3:// or a hub dataset's files; a file, a folder or a glob pattern) or a dataset saved with
`datasets.save_to_disk`.

A piece is what one producer reads whole and in order: a block of the embedded corpus, a text file, a byte range
of a JSONL file, a Parquet row group, an Arrow shard of a saved dataset. Pieces are listed in a fixed order from
the corpus alone (file names and sizes, Parquet footers), so the same corpus gives the same pieces on every
restart; producer p of N reads pieces p, p+N, p+2N, ... (disjoint and covering). Reading a piece holds one
chunk of it at a time (JSONL lines, Parquet / Arrow record batches), never the corpus.

Held-out documents are chosen per document by a hash of (seed, piece, position), so every reader agrees on them
without reading the corpus first; they are never in the training stream.

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
from dataclasses import dataclass
from pathlib import Path

from api.jobspec import DataSpec

MIN_DOCUMENT_CHARS = 200
EMBEDDED_BLOCK = 64  # documents of the embedded corpus per piece
JSONL_PIECE_BYTES = 64 << 20  # a JSONL file is read in byte ranges of at most this size ...
JSONL_MIN_PIECES = 16  # ... and in at least this many, so a small file still spreads over a few producers
READ_ROWS = 1024  # rows per Parquet / Arrow record batch read


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


@dataclass(frozen=True)
class Piece:
    kind: str  # "embedded", "text", "jsonl", "parquet" or "arrow"
    path: str  # a URI fsspec opens ("" for the embedded corpus)
    part: int = 0  # embedded: the block; jsonl: the byte range; parquet: the row group
    start: int = 0  # jsonl: the byte range [start, stop)
    stop: int = 0
    rows: int | None = None  # documents it holds, when known without reading it

    @property
    def key(self) -> str:
        return f"{self.path}#{self.part}"


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


def _files(source: str) -> list[tuple[str, int]]:
    """(URI, size) of the files a source names, sorted: one file, the data files under a folder, or a glob
    pattern's matches."""
    fs, path = _filesystem(source)
    if any(ch in path for ch in "*?["):
        found = {p: info for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"}
    elif fs.isdir(path):
        found = {p: info for p, info in fs.find(path, detail=True).items() if p.endswith(DATA_SUFFIXES)}
    elif fs.exists(path):
        found = {path: fs.info(path)}
    else:
        raise ValueError(f"data.source: {source!r} does not exist; give an existing file, folder, glob pattern or "
                         "saved dataset")
    return [(_uri(fs, p), int(found[p].get("size") or 0)) for p in sorted(found)]


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "jsonl" if path.endswith(JSONL_SUFFIXES) else "text"


def _file_pieces(uri: str, size: int, fmt: str, text_field: str) -> list[Piece]:
    fmt = _format_of(uri, fmt)
    if fmt == "hf_dataset":
        raise ValueError(f"data.format 'hf_dataset' needs a saved dataset folder, not the file {uri}; point "
                         "data.source at the folder save_to_disk wrote")
    if fmt == "text":
        return [Piece("text", uri, rows=1)]
    if fmt == "jsonl":
        count = max(JSONL_MIN_PIECES, -(-size // JSONL_PIECE_BYTES))
        step = -(-size // count) if size else 1
        return [Piece("jsonl", uri, i, i * step, min(size, (i + 1) * step)) for i in range(count)
                if i * step < size]
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
        columns = meta.schema.to_arrow_schema().names
    if text_field not in columns:
        raise ValueError(f"data.text_field: {uri} has no column {text_field!r} (columns: {columns}); set "
                         "data.text_field to the one holding the text")
    return [Piece("parquet", uri, g, rows=meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]


def _saved_dataset_pieces(source: str, text_field: str) -> list[Piece]:
    """The Arrow shards of a dataset written by `datasets.save_to_disk` (a Dataset, or a DatasetDict: its splits
    in order), read as they are: no `datasets.load_from_disk`, which would map every shard."""
    fs, path = _filesystem(source)
    root = path.rstrip("/")
    if fs.exists(f"{root}/dataset_dict.json"):
        with fs.open(f"{root}/dataset_dict.json") as f:
            folders = [f"{root}/{split}" for split in json.load(f)["splits"]]
    else:
        folders = [root]
    pieces = []
    for folder in folders:
        with fs.open(f"{folder}/dataset_info.json") as f:
            features = json.load(f).get("features") or {}
        if features and text_field not in features:
            raise ValueError(f"data.text_field: the dataset at {source} has no column {text_field!r} (columns: "
                             f"{sorted(features)}); set data.text_field to the one holding the text")
        with fs.open(f"{folder}/state.json") as f:
            files = [entry["filename"] for entry in json.load(f)["_data_files"]]
        pieces.extend(Piece("arrow", _uri(fs, f"{folder}/{name}")) for name in files)
    return pieces


def corpus_pieces(spec: DataSpec) -> list[Piece]:
    """The pieces of the corpus, in their fixed order."""
    if spec.source == "embedded":
        count = len(embedded_documents())
        return [Piece("embedded", "", b, rows=min(EMBEDDED_BLOCK, count - b * EMBEDDED_BLOCK))
                for b in range(-(-count // EMBEDDED_BLOCK))]
    source = spec.source
    from services.hub import hub_dataset_files, is_hub_id

    if is_hub_id(source):
        files = hub_dataset_files(spec)
    elif spec.format == "hf_dataset" or (spec.format == "auto" and is_saved_dataset(source)):
        return _saved_dataset_pieces(source, spec.text_field)
    else:
        files = _files(source)
    pieces = [piece for uri, size in files for piece in _file_pieces(uri, size, spec.format, spec.text_field)]
    if not pieces:
        raise ValueError(f"data.source: {spec.source!r} holds no data file; give .txt/.md, .jsonl or .parquet files")
    return pieces


def read_piece(piece: Piece, text_field: str, first: int = 0) -> Iterator[str]:
    """The piece's documents from number `first` on, one chunk in memory at a time."""
    if piece.kind == "embedded":
        start = piece.part * EMBEDDED_BLOCK
        yield from embedded_documents()[start + first:start + (piece.rows or 0)]
        return
    import fsspec

    if piece.kind == "text":
        if first == 0:
            with fsspec.open(piece.path, "rb") as handle:
                text = handle.read().decode("utf-8", errors="replace")
            yield text
        return
    if piece.kind == "jsonl":
        yield from _jsonl_range(piece, text_field, first)
        return
    rows = _parquet_rows(piece, text_field) if piece.kind == "parquet" else _arrow_rows(piece, text_field)
    index = 0
    for column in rows:
        if index + len(column) <= first:  # whole record batches before `first`: not decoded to Python
            index += len(column)
            continue
        for text in column.to_pylist()[max(first - index, 0):]:
            yield "" if text is None else str(text)
        index += len(column)


def _jsonl_range(piece: Piece, text_field: str, first: int) -> Iterator[str]:
    """The lines that start in [start, stop) (a line that straddles `start` belongs to the range before)."""
    import fsspec

    with fsspec.open(piece.path, "rb") as handle:
        position = piece.start
        if position:
            handle.seek(position - 1)
            skipped = handle.readline()  # the rest of the line that started before this range
            position += len(skipped) - 1
        number = 0
        while position < piece.stop:
            line = handle.readline()
            if not line:
                return
            position += len(line)
            if not line.strip():
                continue
            if number >= first:
                record = json.loads(line)
                if text_field not in record:
                    raise ValueError(f"data.text_field: {piece.path} (byte {position - len(line)}) has no field "
                                     f"{text_field!r} (fields: {sorted(record)}); set data.text_field to the one "
                                     "holding the text")
                yield str(record[text_field])
            number += 1


def _parquet_rows(piece: Piece, text_field: str):
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(piece.path, "rb") as handle:  # range reads: only this row group's column chunk is fetched
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=READ_ROWS, row_groups=[piece.part],
                                                         columns=[text_field]):
            yield batch.column(0)


def _arrow_rows(piece: Piece, text_field: str):
    import fsspec
    import pyarrow as pa

    with fsspec.open(piece.path, "rb") as handle:
        for batch in pa.ipc.open_stream(handle):
            yield batch.column(batch.schema.get_field_index(text_field))


def is_held_out(piece: Piece, index: int, fraction: float, seed: int) -> bool:
    """Whether document `index` of `piece` is held out: a fixed pseudo-random draw per document.

    Drawn from the file's name, not its whole path, so the same corpus copied to another folder or bucket keeps
    the same held-out documents."""
    if fraction <= 0:
        return False
    name = f"{piece.path.rsplit('/', 1)[-1]}#{piece.part}"
    digest = hashlib.blake2b(f"{seed}|{name}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


def documents(spec: DataSpec, seed: int, pieces: list[Piece] | None = None, held_out: bool = False,
              ) -> Iterator[str]:
    """The training documents of `pieces` (default: the whole corpus) in order, or only the held-out ones."""
    for piece in corpus_pieces(spec) if pieces is None else pieces:
        for index, text in enumerate(read_piece(piece, spec.text_field)):
            if text and is_held_out(piece, index, spec.holdout_fraction, seed) == held_out:
                yield text


def producer_pieces(pieces: list[Piece], producer: int, producers: int) -> list[Piece]:
    """The pieces producer `producer` of `producers` reads: disjoint slices that cover `pieces`."""
    mine = pieces[producer::producers]
    if not mine:
        raise ValueError(f"cluster.producers ({producers}): producer {producer} gets no piece of the {len(pieces)} "
                         "the corpus is read in (files, JSONL byte ranges, Parquet row groups, saved-dataset "
                         "shards); use fewer producers, or split the data into more files or row groups")
    return mine


def corpus_fingerprint(pieces: list[Piece]) -> str:
    """Names the corpus without reading it: its pieces (paths, ranges, row counts)."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(f"{piece.kind}|{piece.key}|{piece.start}|{piece.stop}|{piece.rows}\n".encode())
    return digest.hexdigest()[:16]


def known_documents(pieces: list[Piece]) -> int | None:
    """The corpus's documents (held-out ones included) when every piece knows its count; else None."""
    counts = [piece.rows for piece in pieces]
    return None if None in counts else sum(counts)
