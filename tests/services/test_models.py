"""Hook capture on a tiny random model: the right tensors, one pass for several sites, and the cut model."""

import torch

from api.jobspec import HookSpec, ModelSpec, RandomModelSpec
from services.models import capture, load_language_model, run_blocks, splice

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
