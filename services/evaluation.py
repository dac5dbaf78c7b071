"""SpliceEvaluator: a Ray actor that measures what a dictionary costs the language model.

It holds the whole model (the LM head is needed) — on the GPU(s) Ray gave it, spread over several as a
producer's blocks are, else on the CPU — and windows of held-out text, and for a dictionary's
weights reports delta LM loss and CE loss recovered with the reconstruction spliced in at the hooked site
(zero-ablation baseline); a transcoder's prediction, made from its input site in the same forward pass,
replaces its target site (the MLP's output). Only real-token positions are replaced: BOS/EOS keep their
activations, since the dictionary never saw them in training.
"""

from __future__ import annotations

import numpy as np
import ray
import torch
from torch import Tensor

from api.jobspec import JobSpec
from services.data import documents
from services.model_producer import producer_device
from services.models import load_language_model, splice, splice_from
from services.windows import TokenWindows
from trainers.metrics import splice_metrics
from trainers.sae import SAEConfig, SparseAutoencoder


class SpliceEvaluator:
    def __init__(self, spec_json: str, monitor=None):
        self.spec = JobSpec.model_validate_json(spec_json)
        self.monitor = monitor
        self.lm = load_language_model(self.spec.model, device=producer_device(),
                                      gpus=len(ray.get_gpu_ids()) if ray.is_initialized() else 1)
        held_out = documents(self.spec.data, self.spec.training.seed, held_out=True)  # read until enough
        windows = TokenWindows(self.lm.tokenizer, held_out, self.spec.data.context_length, cycle=False)
        wanted = max(1, self.spec.training.splice_eval_tokens // self.spec.data.context_length)
        picked = [w for _, w in zip(range(wanted), windows, strict=False)]
        if not picked:
            raise ValueError("data.holdout_fraction: the held-out documents hold no full context window; raise "
                             "holdout_fraction or set training.splice_eval_tokens to 0")
        ids = np.stack(picked)
        self.input_ids = torch.from_numpy(ids).to(self.lm.device)
        self.keep = torch.from_numpy(windows.keep_mask(ids)).to(self.lm.device)

    def evaluate(self, index: int, cfg: SAEConfig, state: dict[str, Tensor], step: int = 0, tokens: int = 0
                 ) -> dict[str, float]:
        """Splice metrics of dictionary `index` with these weights; also reported to the monitor, if any."""
        sae = SparseAutoencoder(cfg, device=self.lm.device)
        sae.load_state_dict(state)
        sae.eval()
        dtype = next(self.lm.model.parameters()).dtype

        def reconstruct(activation: Tensor) -> Tensor:  # the hooked block may be on another GPU than the SAE
            flat = activation.reshape(-1, activation.shape[-1]).to(self.lm.device, torch.float32)
            return sae(flat).x_hat.reshape(activation.shape).to(activation.device, dtype)

        def spliced(replace):
            keep = self.keep[..., None]
            hook, out = self.spec.hook_of(index), self.spec.hook_out_of(index)
            if out is not None:  # the target site takes the prediction from the input site
                return splice_from(self.lm.model, hook, out,
                                   lambda a_in, a: torch.where(keep.to(a.device), replace(a_in).to(a.device), a))
            return splice(self.lm.model, hook, lambda a: torch.where(keep.to(a.device), replace(a), a))

        metrics = splice_metrics(lambda: self.lm.model(input_ids=self.input_ids, use_cache=False).logits,
                                 spliced, reconstruct, self.input_ids)
        if self.monitor is not None:
            self.monitor.report.remote(self.spec.dictionary_name(index), step, tokens, metrics)
        return metrics
