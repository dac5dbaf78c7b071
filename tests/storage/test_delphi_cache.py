"""The delphi latent cache: exactly the files EleutherAI delphi's loader reads.

delphi itself is not a test dependency (eai-delphi 0.1.3 requires vllm, which would replace this venv's torch), so
these tests pin the layout its loader reads, from eai-delphi 0.1.3's source:
- delphi/latents/loader.py `LatentDataset._edges` / `_build_selected`: files `<start>_<end>.safetensors` per
  hook folder, the ranges contiguous ([start, end] inclusive) and every range present;
- loader.py `TensorBuffer.load`: safetensors keys `locations` (to_int64_tensor: uint16/uint32/int…),
  `activations`, `tokens` (cast to int64; delphi's tokens and context length come from it); latent = the file
  name's start + locations[:, 2];
- delphi/latents/cache.py `save_splits` / `_generate_split_indices`: the ranges of torch.linspace(0, width,
  n_splits + 1).long(), locations uint16 unless a value reaches 2**16 (then uint32), activations float16;
- loader.py `LatentDataset.__init__` + delphi/config.py `CacheConfig`: config.json per hook folder with the
  CacheConfig fields and `model_name`.
"""

import json

import numpy as np
from safetensors.numpy import load_file

from storage.analysis import write_delphi_cache

HOOK = "blocks.1.hook_resid_post"
CONFIG = {"dataset_repo": "embedded", "dataset_split": "held-out", "dataset_name": "", "dataset_column": "text",
          "batch_size": 4, "cache_ctx_len": 16, "n_tokens": 96, "n_splits": 5, "model_name": "random-llama-d8-l1-seed0"}
DELPHI_CONFIG_KEYS = {"dataset_repo", "dataset_split", "dataset_name", "dataset_column", "batch_size",
                      "cache_ctx_len", "n_tokens", "n_splits", "model_name"}


def _firings(latents: int, skip: range, windows: int, context: int) -> np.ndarray:
    """[n, 4] (window, position, latent, activation), shuffled; no latent in `skip` fires."""
    rng = np.random.default_rng(0)
    rows = []
    for latent in (j for j in range(latents) if j not in skip and j % 3):
        for flat in rng.choice(windows * context, size=int(rng.integers(1, 6)), replace=False):
            rows.append((flat // context, flat % context, latent, rng.uniform(0.1, 9.0)))
    return rng.permutation(np.array(rows))


def _read_back(folder) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Each file's arrays, and all firings as (window, position, latent, activation) with latent = start + column."""
    files = {f.name: load_file(str(f)) for f in sorted(folder.glob("*.safetensors"))}
    rows = []
    for name, data in files.items():
        start = int(name.split("_")[0])
        loc = data["locations"].astype(np.int64)
        rows.append(np.column_stack([loc[:, :2], loc[:, 2] + start, data["activations"].astype(np.float64)]))
    return files, np.concatenate(rows)


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def test_the_delphi_cache_has_the_files_names_dtypes_and_config_delphi_reads(tmp_path):
    windows, context, latents = 6, 16, 64
    tokens = np.random.default_rng(1).integers(0, 250, size=(windows, context)).astype(np.int32)
    fired = _firings(latents, range(25, 38), windows, context)  # the third range (25..37) never fires
    written = write_delphi_cache(str(tmp_path), HOOK, fired[:, :3].astype(np.int64), fired[:, 3].astype(np.float32),
                                 tokens, latents, CONFIG)
    folder = tmp_path / HOOK
    # delphi's save_splits for width 64, 5 splits: linspace(0, 64, 6).long() = 0, 12, 25, 38, 51, 64
    names = ["0_11.safetensors", "12_24.safetensors", "25_37.safetensors", "38_50.safetensors", "51_63.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "config.json"]), "file names differ"
    assert len(written) == 5
    files, rows = _read_back(folder)
    for name, data in files.items():
        assert set(data) == {"locations", "activations", "tokens"}, f"{name}: safetensors keys differ"
        assert data["locations"].dtype == np.uint16 and data["locations"].ndim == 2, f"{name}: locations"
        assert data["locations"].shape[1] == 3
        assert data["activations"].dtype == np.float16 and data["activations"].shape == (len(data["locations"]),)
        assert data["tokens"].dtype == np.int64 and (data["tokens"] == tokens).all(), f"{name}: tokens differ"
    assert files["25_37.safetensors"]["locations"].shape == (0, 3), "a range without firings needs an empty file"
    expected = fired.copy()
    expected[:, 3] = expected[:, 3].astype(np.float16)
    np.testing.assert_array_equal(_sorted_rows(rows), _sorted_rows(expected), err_msg="firings differ")
    config = json.loads((folder / "config.json").read_text())
    assert set(config) >= DELPHI_CONFIG_KEYS and config["model_name"] == CONFIG["model_name"]


def test_the_delphi_cache_widens_locations_to_uint32_past_2_16(tmp_path):
    fired = np.array([(0, 5, 3, 1.5), (2, 15, 70_000, 2.25), (1, 0, 199_999, 0.75)])
    tokens = np.zeros((3, 16), np.int64)
    write_delphi_cache(str(tmp_path), HOOK, fired[:, :3].astype(np.int64), fired[:, 3].astype(np.float32), tokens,
                       200_000, CONFIG, splits=1)
    files, rows = _read_back(tmp_path / HOOK)
    assert list(files) == ["0_199999.safetensors"]
    assert files["0_199999.safetensors"]["locations"].dtype == np.uint32, "latent 70000 does not fit uint16"
    np.testing.assert_array_equal(_sorted_rows(rows), _sorted_rows(fired))
