"""Training metrics of a dictionary: firing statistics over a token window, L0, FVU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class FiringTracker:
    """Counts, per latent, the tokens since it last fired; a latent is dead once that reaches `window`.

    A latent "fires" on a token when its activation exceeds `threshold` in magnitude (1e-3, as in Gao et al.'s
    code). Until `window_tokens` tokens are counted no latent can be dead (`window_complete` is False): what
    is measurable then is only which latents never fired.
    """

    def __init__(self, latents: int, window_tokens: int, device: torch.device | str | None = None,
                 threshold: float = 1e-3):
        self.window_tokens = window_tokens
        self.threshold = threshold
        self.tokens_since_fired = torch.zeros(latents, dtype=torch.long, device=device)
        self.fire_counts = torch.zeros(latents, dtype=torch.long, device=device)
        self.tokens_counted = 0

    @torch.no_grad()
    def batch_counts(self, acts: Tensor, indices: Tensor) -> Tensor:
        """Per latent, on how many of the batch's tokens it fired; acts, indices [N, k]."""
        fired = indices[acts.abs() > self.threshold]  # AbsTopK codes fire in either direction
        return torch.bincount(fired, minlength=self.tokens_since_fired.numel())

    @torch.no_grad()
    def update(self, acts: Tensor, indices: Tensor) -> None:
        """acts, indices [N, k]: the active latents of a batch of N tokens."""
        self.update_counts(self.batch_counts(acts, indices), acts.shape[0])

    @torch.no_grad()
    def update_counts(self, counts: Tensor, tokens: int) -> None:
        """Add firing counts gathered elsewhere (e.g. summed over data-parallel ranks) for `tokens` tokens."""
        self.fire_counts += counts
        self.tokens_since_fired += tokens
        self.tokens_since_fired[counts > 0] = 0
        self.tokens_counted += tokens

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.window_tokens

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    @property
    def window_complete(self) -> bool:
        """Whether one whole window has been counted, i.e. whether `dead_fraction` can be above 0 at all."""
        return self.tokens_counted >= self.window_tokens

    def never_fired_mask(self) -> Tensor:
        return self.fire_counts == 0

    def never_fired_fraction(self) -> float:
        return float(self.never_fired_mask().float().mean())

    def firing_frequencies(self) -> Tensor:
        """Fraction of the counted tokens on which each latent fired."""
        return self.fire_counts.float() / max(self.tokens_counted, 1)

    def dense_fraction(self, above: float = 0.1) -> float:
        return float((self.firing_frequencies() > above).float().mean())


def l0(acts: Tensor, threshold: float = 0.0) -> float:
    """Mean number of active latents per token."""
    return float((acts > threshold).sum(dim=-1).float().mean())


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − x̄‖² over a batch [N, d]."""
    denominator = (x - x.mean(dim=0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return float((x - x_hat).pow(2).sum() / denominator)


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    return 1.0 - fvu(x, x_hat)


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero_ablated: float) -> float:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 = the reconstruction is as good as the activation."""
    gap = ce_zero_ablated - ce_clean
    return float("nan") if abs(gap) < 1e-12 else (ce_zero_ablated - ce_spliced) / gap


def next_token_ce(logits: Tensor, input_ids: Tensor, exclude_first: bool = True) -> float:
    """Mean next-token cross-entropy; the prediction made at the BOS position is excluded by default."""
    logits, targets = logits[:, :-1].float(), input_ids[:, 1:]
    if exclude_first:
        logits, targets = logits[:, 1:], targets[:, 1:]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))


@torch.no_grad()
def splice_metrics(logits_of: Callable[[], Tensor], splice: Callable[[Callable[[Tensor], Tensor]], Any],
                   reconstruct: Callable[[Tensor], Tensor], input_ids: Tensor) -> dict[str, float]:
    """Delta LM loss and CE loss recovered with the reconstruction spliced in at the hooked site.

    `logits_of()` runs the model on `input_ids` and returns logits; `splice(replace)` is a context manager
    within which the hooked activation a [..., d] is replaced by replace(a) (services.models.splice with the
    hook bound); `reconstruct(a)` is the dictionary's x̂ (on [..., d]). The zero-ablation baseline replaces
    the activation by zeros. The first (BOS) position is excluded.
    """
    clean = next_token_ce(logits_of(), input_ids)
    with splice(reconstruct):
        spliced = next_token_ce(logits_of(), input_ids)
    with splice(torch.zeros_like):
        zero = next_token_ce(logits_of(), input_ids)
    return {"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablated": zero,
            "delta_lm_loss": spliced - clean,
            "ce_loss_recovered": ce_loss_recovered(clean, spliced, zero)}
