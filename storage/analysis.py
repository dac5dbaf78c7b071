"""The analysis of a dictionary as files: Parquet tables and a manifest, readable with pandas/pyarrow alone.

`<output>/analysis/<dictionary>/` (local or s3://, through storage/uri.py):
- `manifest.json`   what was analysed (tokens, top_n, context, bins, the neighbour method, the files);
- `latents.parquet` one row per latent: latent, count, frequency, mean_activation (over firings),
                    max_activation, histogram (list of `bins` counts over [0, histogram_upper)),
                    top/bottom logit token ids and values, neighbours and their cosines, `search` (lower-case
                    text of the tokens at its top examples and in its logits, for filtering);
- `examples.parquet` one row per example, sorted by latent (row groups of EXAMPLE_GROUP_LATENTS latents, so a
                    reader filtering on `latent` reads one group): latent, kind ("top" | "quantile"), rank,
                    activation, position (global token position in the slice), window, offset, tokens (the
                    context's token ids, -1 outside the window), activations (the latent's, over the context);
- `vocabulary.parquet` token id → text, for every token the other tables name.

`delphi/<hook>/<start>_<end>.safetensors` + `config.json`: the latent cache EleutherAI delphi's
`LatentDataset` / `TensorBuffer` read (delphi/latents/loader.py, eai-delphi 0.1.3): per file locations [n, 3] =
(window, position, latent − start) as uint16 (uint32 when a value reaches 2**16), activations [n] float16, tokens
[windows, context] int64 (delphi takes its tokens and context length from here); config.json holds delphi's
CacheConfig fields plus `model_name`, which delphi hands to AutoTokenizer unless `LatentDataset(tokenizer=...)`
is given (saeforge writes the model's label there: pass the tokenizer for a random or embedded model).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.uri import filesystem, join

ANALYSIS_FORMAT = 1
MANIFEST = "manifest.json"
LATENTS = "latents.parquet"
EXAMPLES = "examples.parquet"
VOCABULARY = "vocabulary.parquet"
EXAMPLE_GROUP_LATENTS = 1024


def analysis_uri(output_uri: str, dictionary: str) -> str:
    return join(output_uri, "analysis", dictionary)


def fixed_lists(rows: np.ndarray) -> pa.FixedSizeListArray:
    """A [n, w] array as one Arrow column of n lists of w values (built over the flat buffer, no copy per row)."""
    rows = np.ascontiguousarray(rows)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def _write_table(uri: str, name: str, table: pa.Table, row_group_size: int | None = None) -> None:
    fs, path = filesystem(uri)
    with fs.open(join(path, name), "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size, compression="zstd")


def write_analysis(uri: str, latents: dict[str, Any], examples: dict[str, Any], vocabulary: dict[int, str],
                   manifest: dict[str, Any]) -> str:
    """Write the three tables, then the manifest (last: a folder with a manifest is complete); returns `uri`."""
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)
    _write_table(uri, LATENTS, pa.table(latents))
    per_latent = max(1, len(examples["latent"]) // max(len(latents["latent"]), 1))
    _write_table(uri, EXAMPLES, pa.table(examples), row_group_size=EXAMPLE_GROUP_LATENTS * per_latent)
    ids = sorted(vocabulary)
    _write_table(uri, VOCABULARY, pa.table({"token": pa.array(ids, pa.int32()),
                                            "text": pa.array([vocabulary[i] for i in ids], pa.string())}))
    manifest = {"format": ANALYSIS_FORMAT, **manifest, "files": [LATENTS, EXAMPLES, VOCABULARY]}
    with fs.open(join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return uri


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest, or None when the folder holds no (finished) analysis."""
    fs, path = filesystem(uri)
    try:
        with fs.open(join(path, MANIFEST)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_table(uri: str, name: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    fs, path = filesystem(uri)
    return pq.read_table(join(path, name), filesystem=fs, columns=columns, filters=filters)


def read_examples(uri: str, latent: int) -> pa.Table:
    return read_table(uri, EXAMPLES, filters=[("latent", "==", latent)])


def read_vocabulary(uri: str) -> dict[int, str]:
    table = read_table(uri, VOCABULARY)
    return dict(zip(table["token"].to_pylist(), table["text"].to_pylist(), strict=True))


def list_analyses(output_uri: str) -> list[str]:
    """Names of the dictionaries of a job's output that have a finished analysis."""
    fs, path = filesystem(join(output_uri, "analysis"))
    try:
        found = fs.glob(join(path, "*", MANIFEST))
    except FileNotFoundError:
        return []
    return sorted(p.rstrip("/").split("/")[-2] for p in found)


def write_delphi_cache(uri: str, hook: str, locations: np.ndarray, activations: np.ndarray, tokens: np.ndarray,
                       latents: int, config: dict[str, Any], splits: int = 5) -> list[str]:
    """delphi's layout: per latent range [start, end] (inclusive, the ranges of delphi's `save_splits` in
    delphi/latents/cache.py), the firings of those latents; locations [n, 3] int64 (window, position, latent)
    given, written relative to start. A range without firings still gets its file: delphi's `_build_selected`
    finds files by the ranges' edges."""
    from safetensors.numpy import save as save_safetensors

    fs, path = filesystem(join(uri, hook))
    fs.makedirs(path, exist_ok=True)
    boundaries = np.linspace(0, latents, splits + 1).astype(np.int64)
    written = []
    for start, stop in zip(boundaries[:-1], boundaries[1:], strict=True):
        end = int(stop) - 1
        mask = (locations[:, 2] >= start) & (locations[:, 2] <= end)
        part = locations[mask].copy()
        part[:, 2] -= start
        small = len(part) == 0 or part.max() < 2**16  # delphi's rule, with the position column checked too
        data = {"locations": part.astype(np.uint16 if small else np.uint32),
                "activations": activations[mask].astype(np.float16), "tokens": tokens.astype(np.int64)}
        name = join(path, f"{int(start)}_{end}.safetensors")
        with fs.open(name, "wb") as f:
            f.write(save_safetensors(data))
        written.append(name)
    with fs.open(join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=4)
    return written
