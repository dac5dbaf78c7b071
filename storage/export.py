"""Finished dictionaries in the layouts the ecosystem loads.

SAELens: a folder with `cfg.json` and `sae_weights.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc [d_sae], b_dec [d_in], plus `threshold` for JumpReLU), read by `sae_lens.SAE.load_from_disk`.
sparsify (EleutherAI): a folder per hookpoint with `cfg.json` (its SparseCoderConfig plus d_in) and
`sae.safetensors` (encoder.weight [M, d], encoder.bias [M], W_dec [M, d], b_dec [d]), read by
`sparsify.SparseCoder.load_from_disk`; TopK only, the one activation both define the same way.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from storage.uri import filesystem, join

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"  # sparsify's config file has the same name
SPARSIFY_WEIGHTS = "sae.safetensors"
# The cfg layout we write is SAELens 6's; without a version in metadata it would be read as a pre-6 cfg
# and our metadata (model, hook, context size, tokens) would be dropped.
SAELENS_FORMAT_VERSION = "6.0.0"


def saelens_config(d_in: int, d_sae: int, architecture_config: dict[str, Any], metadata: dict[str, Any]) -> dict:
    return {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        **architecture_config,
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, **metadata},
    }


def save_saelens(uri: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """Write the dictionary folder at `uri`; returns `uri`."""
    return _write_folder(uri, SAELENS_WEIGHTS, tensors, config)


def _write_folder(uri: str, weights_file: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """A folder with the weights (float32 safetensors) and cfg.json, on any file system; returns `uri`."""
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)
    payload = {name: t.detach().to(torch.float32).contiguous().cpu() for name, t in tensors.items()}
    with fs.open(join(path, weights_file), "wb") as f:
        f.write(save_safetensors_bytes(payload))
    with fs.open(join(path, SAELENS_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return uri


def save_sparsify(uri: str, tensors: dict[str, torch.Tensor], k: int, metadata: dict[str, Any],
                  transcode: bool = False) -> str:
    """Write a TopK dictionary, given in SAELens naming (export tensors), as a sparsify folder at `uri`.

    A transcoder (`transcode`): sparsify encodes x without subtracting b_dec, as ours does, and a `W_skip` among
    the tensors becomes its skip connection (both [d_out, d_in], applied as x W_skipᵀ)."""
    d_sae, d_in = tensors["W_dec"].shape
    payload = {"encoder.weight": tensors["W_enc"].T, "encoder.bias": tensors["b_enc"], "W_dec": tensors["W_dec"],
               "b_dec": tensors["b_dec"]}
    if "W_skip" in tensors:
        payload["W_skip"] = tensors["W_skip"]
    # sparsify reads the fields it knows (drop_extra_fields) and ignores our metadata block
    config = {"activation": "topk", "expansion_factor": max(d_sae // d_in, 1), "normalize_decoder": True,
              "num_latents": d_sae, "k": k, "multi_topk": False, "skip_connection": "W_skip" in tensors,
              "transcode": transcode, "d_in": d_in, "saeforge": metadata}
    return _write_folder(uri, SPARSIFY_WEIGHTS, payload, config)


def load_saelens(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    fs, path = filesystem(uri)
    with fs.open(join(path, SAELENS_WEIGHTS), "rb") as f:
        tensors = load_safetensors_bytes(f.read())
    with fs.open(join(path, SAELENS_CONFIG)) as f:
        config = json.load(f)
    return tensors, config
