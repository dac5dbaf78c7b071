"""Hook capture on a tiny random model: the right tensors, one pass for several sites, and the cut model."""

import copy

import torch

from api.jobspec import HookSpec, ModelSpec, RandomModelSpec
from services.models import (
    capture,
    cut_config,
    decoder_layers,
    device_map_for,
    load_language_model,
    run_blocks,
    splice,
    splice_from,
)

SPEC = ModelSpec(random=RandomModelSpec(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, seed=1))
IDS = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _capture(lm, hooks):
    with torch.no_grad(), capture(lm.model, hooks) as captured:
        run_blocks(lm, IDS)
    return dict(captured)


def test_resid_post_is_next_resid_pre():
    lm = load_language_model(SPEC)
    got = _capture(lm, [HookSpec(layer=0, site="resid_post"), HookSpec(layer=1, site="resid_pre")])
    torch.testing.assert_close(got["blocks.0.hook_resid_post"], got["blocks.1.hook_resid_pre"])


def test_resid_post_is_resid_pre_plus_attn_and_mlp():
    lm = load_language_model(SPEC)
    sites = ["resid_pre", "attn_out", "mlp_out", "resid_post"]
    got = _capture(lm, [HookSpec(layer=1, site=s) for s in sites])
    pre, attn, mlp, post = (got[f"blocks.1.hook_{s}"] for s in sites)
    torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5)


def test_multi_site_capture_equals_single_site_forwards():
    lm = load_language_model(SPEC)
    hooks = [HookSpec(layer=2, site="attn_out"), HookSpec(layer=0, site="mlp_out"), HookSpec(layer=1)]
    together = _capture(lm, hooks)
    for hook in hooks:
        torch.testing.assert_close(together[hook.name], _capture(lm, [hook])[hook.name])


def test_cut_model_matches_full_model_and_drops_upper_blocks():
    full = load_language_model(SPEC)
    cut = load_language_model(SPEC, keep_layers=2)
    assert cut.kept_layers == 2 and cut.num_layers == 3
    assert sum(p.numel() for p in cut.model.parameters()) < sum(p.numel() for p in full.model.parameters())
    hook = HookSpec(layer=1, site="resid_post")
    torch.testing.assert_close(_capture(cut, [hook])[hook.name], _capture(full, [hook])[hook.name])


def test_splice_replaces_the_activation():
    lm = load_language_model(SPEC)
    hook = HookSpec(layer=0, site="resid_post")
    with torch.no_grad():
        clean = lm.model(IDS).logits
        with splice(lm.model, hook, lambda a: a):
            identity = lm.model(IDS).logits
        with splice(lm.model, hook, torch.zeros_like):
            ablated = lm.model(IDS).logits
    torch.testing.assert_close(clean, identity)
    assert not torch.allclose(clean, ablated)


def test_mlp_in_is_the_normalised_residual_the_mlp_reads():
    """mlp_in: the post-attention-norm residual; the MLP applied to it gives mlp_out (one capture pass)."""
    lm = load_language_model(SPEC)
    got = _capture(lm, [HookSpec(layer=1, site="mlp_in"), HookSpec(layer=1, site="mlp_out"),
                        HookSpec(layer=1, site="resid_pre"), HookSpec(layer=1, site="attn_out")])
    block = decoder_layers(lm.model)[1]
    assert "blocks.1.ln2.hook_normalized" in got
    with torch.no_grad():
        normalised = block.post_attention_layernorm(got["blocks.1.hook_resid_pre"] + got["blocks.1.hook_attn_out"])
        torch.testing.assert_close(got["blocks.1.ln2.hook_normalized"], normalised)
        torch.testing.assert_close(block.mlp(got["blocks.1.ln2.hook_normalized"]), got["blocks.1.hook_mlp_out"])


def test_splice_from_replaces_the_target_with_a_prediction_from_the_source():
    """A transcoder's splice: mlp_out replaced by f(mlp_in) of the same pass; f = the MLP itself changes nothing."""
    lm = load_language_model(SPEC)
    source, target = HookSpec(layer=1, site="mlp_in"), HookSpec(layer=1, site="mlp_out")
    mlp = copy.deepcopy(decoder_layers(lm.model)[1].mlp)  # a copy: the hooked module itself would recurse
    with torch.no_grad():
        clean = lm.model(IDS).logits
        with splice_from(lm.model, source, target, lambda a_in, _a: mlp(a_in)):
            same = lm.model(IDS).logits
        with splice_from(lm.model, source, target, lambda a_in, a: torch.zeros_like(a)):
            ablated = lm.model(IDS).logits
    torch.testing.assert_close(clean, same)
    assert not torch.allclose(clean, ablated)


def _saved_folder(tmp_path):
    """A tiny random Llama saved as a Hugging Face folder (safetensors weights, byte-level tokenizer)."""
    lm = load_language_model(SPEC)
    lm.model.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    return ModelSpec(name=str(tmp_path / "tiny")), lm


def _block_count(model) -> int:
    return len({name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("layers.")})


def test_cut_from_saved_folder_holds_embedding_and_kept_blocks_only(tmp_path):
    spec, full = _saved_folder(tmp_path)
    cut = load_language_model(spec, keep_layers=2, lm_head=False)
    per_block = sum(p.numel() for p in full.model.model.layers[0].parameters())
    embedding = full.model.get_input_embeddings().weight.numel()
    assert _block_count(cut.model) == 2 and cut.num_layers == 3 and cut.kept_layers == 2
    assert sum(p.numel() for p in cut.model.parameters()) == embedding + 2 * per_block + SPEC.random.hidden_size
    hook = HookSpec(layer=1, site="resid_post")
    torch.testing.assert_close(_capture(cut, [hook])[hook.name], _capture(full, [hook])[hook.name])


def test_device_map_of_a_two_gpu_producer_splits_the_cut_blocks_over_both():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("llama", vocab_size=384, hidden_size=64, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)
    cut_config(config, 4)
    plan = device_map_for(AutoModel, config, 2, torch.bfloat16, max_memory={0: 1 << 30, 1: 1 << 30})
    blocks = {name: device for name, device in plan.items() if name.startswith("layers.")}
    assert sorted(blocks) == [f"layers.{i}" for i in range(4)]  # only the blocks up to the cut
    assert set(blocks.values()) == {0, 1} and plan["embed_tokens"] == 0
    assert "lm_head" not in plan
