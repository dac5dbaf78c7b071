"""The sparse autoencoder: parameters, encoder, decoder and loss of one dictionary (or one latent shard).

Shapes follow FIELD-NOTES: W_enc [M, d], b_enc [M], W_dec [M, d] (rows are dictionary directions), b_dec [d].
The decoder is used through its row-normalised form, so every direction has unit norm whatever the optimizer
(or DeepSpeed's master copy of the weights) does to the raw rows, and the gradient reaching a raw row has its
component parallel to that row removed (d(w/|w|)/dw = (I - ŵŵᵀ)/|w|).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainers.init import geometric_median, random_unit_rows


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    latents: int
    k: int
    architecture: str = "topk"
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None  # None: d_in // 2, the common heuristic

    @property
    def effective_k_aux(self) -> int:
        return min(self.k_aux if self.k_aux is not None else self.d_in // 2, self.latents)


@dataclass
class SAEOutput:
    x_hat: Tensor  # [N, d]
    latent_acts: Tensor  # [N, k] values of the active latents
    latent_indices: Tensor  # [N, k] their indices
    fvu: Tensor  # scalar: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    auxk_loss: Tensor  # scalar, 0 when no latent is dead
    loss: Tensor  # fvu + auxk_alpha * auxk_loss


def unit_rows(weight: Tensor) -> Tensor:
    return weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def variance_denominator(x: Tensor) -> Tensor:
    return (x - x.mean(dim=0, keepdim=True)).pow(2).sum().clamp_min(1e-12)


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None, dtype=torch.float32):
        super().__init__()
        if not 0 < cfg.k <= cfg.latents:
            raise ValueError(f"k must be in 1..latents ({cfg.latents}); got {cfg.k}")
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.latents, cfg.d_in, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.latents, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.latents, cfg.d_in, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))

    @torch.no_grad()
    def initialize(self, sample: Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
        """b_dec = geometric median of the sample; random unit decoder rows; W_enc = W_dec at init."""
        sample = sample.to(self.b_dec.device, torch.float32)
        self.b_dec.copy_(geometric_median(sample))
        rows = random_unit_rows(self.cfg.latents, self.cfg.d_in, generator=generator)
        self.W_dec.copy_(rows)
        self.W_enc.copy_(rows)
        self.b_enc.zero_()
        return {}

    def decoder_directions(self) -> Tensor:
        return unit_rows(self.W_dec)

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        acts, indices = torch.relu(self.pre_activations(x)).topk(self.cfg.k, dim=-1, sorted=False)
        return acts, indices

    def decode(self, acts: Tensor, indices: Tensor) -> Tensor:
        dense = torch.zeros(acts.shape[0], self.cfg.latents, dtype=acts.dtype, device=acts.device)
        dense.scatter_(-1, indices, acts)
        return dense @ self.decoder_directions() + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        pre = self.pre_activations(x)
        acts, indices = torch.relu(pre).topk(self.cfg.k, dim=-1, sorted=False)
        x_hat = self.decode(acts, indices)
        denominator = variance_denominator(x)
        fvu = (x - x_hat).pow(2).sum() / denominator
        auxk_loss = self._auxk_loss(x - x_hat.detach(), pre, dead_mask, denominator)
        return SAEOutput(x_hat, acts, indices, fvu, auxk_loss, fvu + self.cfg.auxk_alpha * auxk_loss)

    def _auxk_loss(self, residual: Tensor, pre: Tensor, dead_mask: Tensor | None, denominator: Tensor) -> Tensor:
        """Reconstruct the residual from the top-k_aux pre-activations among dead latents (Gao et al.)."""
        if dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(())
        k_aux = min(self.cfg.effective_k_aux, int(dead_mask.sum()))
        masked = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf))
        aux_acts, aux_indices = torch.relu(masked).topk(k_aux, dim=-1, sorted=False)
        dense = torch.zeros_like(pre).scatter_(-1, aux_indices, aux_acts)
        residual_hat = dense @ self.decoder_directions()
        loss = (residual - residual_hat).pow(2).sum() / denominator
        return torch.nan_to_num(loss, nan=0.0)

    @torch.no_grad()
    def export_tensors(self) -> dict[str, Tensor]:
        """Weights in the SAELens naming: W_enc [d, M], W_dec [M, d] (unit rows), b_enc [M], b_dec [d]."""
        return {
            "W_enc": self.W_enc.detach().T.contiguous().float().cpu(),
            "W_dec": self.decoder_directions().detach().contiguous().float().cpu(),
            "b_enc": self.b_enc.detach().float().cpu().clone(),
            "b_dec": self.b_dec.detach().float().cpu().clone(),
        }
