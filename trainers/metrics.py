"""Training metrics of a dictionary: firing statistics over a token window, L0, FVU."""

from __future__ import annotations

import torch
from torch import Tensor


class FiringTracker:
    """Counts, per latent, the tokens since it last fired; a latent is dead once that reaches `window`.

    A latent "fires" on a token when its activation exceeds `threshold` (1e-3, as in Gao et al.'s code).
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
        fired = indices[acts > self.threshold]
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

    def firing_frequencies(self) -> Tensor:
        """Fraction of the counted tokens on which each latent fired."""
        return self.fire_counts.float() / max(self.tokens_counted, 1)

    def dense_fraction(self, above: float = 0.1) -> float:
        return float((self.firing_frequencies() > above).float().mean())

    def reset_counts(self) -> None:
        self.fire_counts.zero_()
        self.tokens_counted = 0


def l0(acts: Tensor, threshold: float = 0.0) -> float:
    """Mean number of active latents per token."""
    return float((acts > threshold).sum(dim=-1).float().mean())
