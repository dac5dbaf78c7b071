"""The sparse autoencoder: parameters, encoder, decoder and loss of one dictionary (or one latent shard).

Shapes follow FIELD-NOTES: W_enc [M, d], b_enc [M], W_dec [M, d] (rows are dictionary directions), b_dec [d].
The decoder is used through its row-normalised form, so every direction has unit norm whatever the optimizer
(or DeepSpeed's master copy of the weights) does to the raw rows, and the gradient reaching a raw row has its
component parallel to that row removed (d(w/|w|)/dw = (I - ŵŵᵀ)/|w|). No in-place renormalisation after the
optimizer step is ever needed, and for TopK-style dictionaries the norms are taken over the touched rows only.

Architectures (one shared encoder/decoder core; the piece that differs is the activation and the penalty):
- `topk` (Gao et al.): z = TopK(ReLU(W_enc(x − b_dec) + b_enc)); AuxK on dead latents.
- `batchtopk` (arXiv 2412.06410): keep the top N·k pre-activations of the whole batch; an inference threshold
  θ (EMA of the smallest kept activation) is a buffer and is exported as a JumpReLU threshold. Selection is
  exact as long as no token holds more than `batchtopk_row_cap` (default 4k) of the batch's top N·k: the
  share of tokens at that cap is reported as `batchtopk_capped_rows`.
- `abstopk` (arXiv 2510.00404): the top k latents by |W_enc(x − b_dec) + b_enc|, kept with their sign (no
  ReLU), so one latent carries a bidirectional feature; AuxK picks dead latents by magnitude too (as SAELens).
- `matryoshka_topk`, `matryoshka_batchtopk` (arXiv 2503.17547): TopK / BatchTopK whose latents form nested
  prefixes [0, m_1) ⊂ [0, m_2) ⊂ … ⊂ [0, M) (`matryoshka_prefixes`: the sizes, or a number of doubling
  groups); each prefix reconstructs x on its own from the codes of its latents, and the loss is the plain
  sum of the prefixes' FVUs (every prefix weighted 1, as in the paper) + AuxK on the whole dictionary. The
  prefix decodes are one bag decode (each code once, bagged by group and token), a cumulative sum over the
  groups and a sum across shards: exact when a prefix ends inside a shard, at one decode's cost. Exported as
  TopK / as BatchTopK's JumpReLU form.
- Transcoders (`transcoder`, any architecture above; `skip` adds W_skip [d_out, d_in]): the dictionary reads
  one site x (e.g. the MLP's normalised input) and reconstructs another, y (the MLP's output), passed as
  forward(x, target=y): the encoder sees x itself (b_dec lives in the output space, as SAELens/sparsify do),
  ŷ = Σ codes·Ŵ_dec + b_dec (+ W_skip x), and FVU, AuxK and the prefixes are all measured against y.
  `x_hat` is then ŷ. Here d_out = d_in (both sites are the model's width).
- `jumprelu` (arXiv 2407.14435): f = z·H(z − θ), θ = exp(log_threshold) per latent, straight-through threshold
  gradients with a rectangle kernel; loss FVU + λ·L0 with λ warmed up linearly over `sparsity_warmup` of
  training. The paper's ε = 0.001 and θ₀ = 0.001 assume inputs of unit mean squared norm; here they are
  multiplied by the RMS norm of the centred initialization sample (`input_scale` buffer) instead of
  rescaling the inputs.
- `relu` (the original, with Anthropic's April 2024 update): f = ReLU(W_enc(x − b_dec) + b_enc), raw decoder
  rows, loss FVU + λ·Σ f_i‖W_dec,i‖ / RMS(x) (decoder norms in the penalty so that shrinking the encoder and
  growing the decoder does not cheat it; divided by the batch RMS so that λ does not depend on the scale of
  the activations). Exported with the norms folded into the encoder (unit decoder rows, same function).

TopK, AbsTopK and BatchTopK run on the sparse kernels of `trainers.kernels` (no N×M matrix); JumpReLU and ReLU are
dense by nature during training (their activations are not k-sparse and the threshold gradient needs every
pre-activation near θ), so they use plain dense products and suit smaller dictionaries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.init import (
    NORM_SEARCH_GRID,
    decoder_bias,
    grid_search,
    principal_subspace,
    random_unit_rows,
    rank_of,
    subspace_unit_rows,
    unit_mean_square_factor,
)
from trainers.kernels import bag_decode, jumprelu, sparse_decode, step, topk_encode
from trainers.parallel import ShardMesh

ARCHITECTURES = ("topk", "batchtopk", "abstopk", "matryoshka_topk", "matryoshka_batchtopk", "jumprelu", "relu")
INITIALIZATIONS = ("subspace", "random")
INIT_SCALES = ("least_squares", "norm_search")  # how W_enc's common scale is set at initialization
B_ENC_INITS = ("zero", "mean_preactivation")


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    latents: int
    k: int = 32
    architecture: str = "topk"
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None  # None: d_in // 2, the common heuristic
    auxk_fit_scale: bool = True  # scale each token's AuxK reconstruction to its least-squares fit (see below)
    initialization: str = "subspace"
    variance_share: float = 0.99
    subspace_rank: int | None = None  # explicit rank; wins over variance_share
    b_dec_init: str = "geometric_median"
    subspace_rank_fraction: float | None = None  # explicit rank as a fraction of d_in (the paper: ~0.5)
    init_scale: str = "least_squares"  # or norm_search: the paper's grid search (see initialize)
    b_enc_init: str = "zero"  # or mean_preactivation: b_enc = −mean of W_enc(x − b_dec) over the sample
    normalize_inputs: bool = False  # x · f with mean ‖f·x‖² = 1 on the init sample (buffer; folded at export)
    l1_coefficient: float = 0.02  # relu
    l0_coefficient: float = 0.002  # jumprelu
    sparsity_warmup: float = 0.1  # fraction of training over which the L1/L0 coefficient ramps up from 0
    jumprelu_bandwidth: float = 0.001  # ε, in units of the input scale
    jumprelu_init_threshold: float = 0.001  # θ₀, in units of the input scale
    batchtopk_row_cap: int | None = None  # None: 4·k
    batchtopk_threshold_lr: float = 0.01  # EMA rate of the inference threshold (as SAELens)
    matryoshka_prefixes: tuple[int, ...] | list[int] | int | None = None  # sizes, or doubling groups; None: 4
    transcoder: bool = False  # reconstructs forward(..., target=y), another site, from x (d_out = d_in)
    skip: bool = False  # transcoder: + W_skip x, a learned linear skip path (zero at initialization)
    encoder_chunk: int = 8192  # latents per encoder chunk (memory O(N·chunk))
    sparse_grads: bool = False  # W_enc/W_dec grads as row-sparse COO, for trainers.optim.RowSparseAdam

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}; got {self.architecture!r}")
        if self.initialization not in INITIALIZATIONS:
            raise ValueError(f"initialization must be one of {INITIALIZATIONS}; got {self.initialization!r}")
        if self.d_in <= 0 or self.latents <= 0:
            raise ValueError(f"d_in and latents must be positive; got {self.d_in}, {self.latents}")
        if self.uses_k and not 0 < self.k <= self.latents:
            raise ValueError(f"k must be in 1..latents ({self.latents}); got {self.k}")
        if self.encoder_chunk <= 0:
            raise ValueError(f"encoder_chunk must be positive; got {self.encoder_chunk}")
        if self.init_scale not in INIT_SCALES:
            raise ValueError(f"init_scale must be one of {INIT_SCALES}; got {self.init_scale!r}")
        if self.b_enc_init not in B_ENC_INITS:
            raise ValueError(f"b_enc_init must be one of {B_ENC_INITS}; got {self.b_enc_init!r}")
        if self.normalize_inputs and self.transcoder:
            raise ValueError("normalize_inputs applies to autoencoders; a transcoder scales its target instead "
                             "(target_scale): leave normalize_inputs off")
        if self.skip and not self.transcoder:
            raise ValueError("skip applies to transcoders only (transcoder=True)")
        if self.matryoshka_prefixes is not None and not self.matryoshka:
            raise ValueError(f"matryoshka_prefixes applies to the matryoshka architectures only; got "
                             f"{self.architecture!r}")
        if self.matryoshka:
            ends = self.prefix_ends
            if any(b <= a for a, b in zip((0, *ends), ends, strict=False)) or ends[-1] != self.latents:
                raise ValueError(f"matryoshka_prefixes must be increasing sizes in 1..latents ({self.latents}); "
                                 f"got {self.matryoshka_prefixes!r}")

    @property
    def uses_k(self) -> bool:
        return self.architecture in ("topk", "batchtopk", "abstopk", "matryoshka_topk", "matryoshka_batchtopk")

    @property
    def batch_selection(self) -> bool:
        return self.architecture in ("batchtopk", "matryoshka_batchtopk")

    @property
    def matryoshka(self) -> bool:
        return self.architecture.startswith("matryoshka_")

    @property
    def prefix_ends(self) -> tuple[int, ...]:
        """The nested prefixes' sizes, ending at latents: an int n gives n doubling groups (M/2^(n-1), …, M/2, M);
        a list is taken as given, with the whole dictionary appended when it stops short of it."""
        prefixes = self.matryoshka_prefixes if self.matryoshka_prefixes is not None else 4
        if isinstance(prefixes, int):
            ends = [self.latents >> shift for shift in range(prefixes - 1, -1, -1)]
        else:
            ends = [int(size) for size in prefixes]
        if ends and ends[-1] < self.latents:
            ends.append(self.latents)
        return tuple(ends)

    @property
    def signed(self) -> bool:
        """Codes keep their sign (AbsTopK): a latent is active where its code is nonzero, not positive."""
        return self.architecture == "abstopk"

    @property
    def uses_auxk(self) -> bool:
        return self.uses_k and self.auxk_alpha > 0

    @property
    def effective_k_aux(self) -> int:
        return min(self.k_aux if self.k_aux is not None else self.d_in // 2, self.latents)

    @property
    def row_cap(self) -> int:
        cap = self.batchtopk_row_cap if self.batchtopk_row_cap is not None else 4 * self.k
        return min(max(cap, self.k), self.latents)


def sae_config_from_spec(dictionary: Mapping[str, Any], d_in: int, **overrides: Any) -> SAEConfig:
    """SAEConfig from a `DictionarySpec.model_dump()` (latents already resolved to an int).

    Keys that are not SAEConfig fields (name, hook, lr, expansion_factor, dead_window_tokens, ...) belong to
    the loop and are ignored; None means "the default". `overrides` (e.g. sparse_grads) win.
    """
    names = {f.name for f in fields(SAEConfig)} - {"d_in"}
    kwargs = {key: value for key, value in dictionary.items() if key in names and value is not None}
    kwargs["transcoder"] = dictionary.get("hook_out") is not None  # a DictionarySpec reads one site, predicts another
    kwargs.update(overrides)
    if not isinstance(kwargs.get("latents"), int):
        latents = dictionary.get("latents")
        raise ValueError(f"dictionary['latents'] must be resolved to an int; got {latents!r}")
    return SAEConfig(d_in=d_in, **kwargs)


@dataclass
class SAEOutput:
    x_hat: Tensor  # [N, d]
    latent_acts: Tensor  # [N, k'] values of the active latents (dense archs: [N, M])
    latent_indices: Tensor  # [N, k'] their indices (dense archs: an expanded arange, no memory)
    fvu: Tensor  # scalar: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    auxk_loss: Tensor  # scalar, 0 when no latent is dead
    loss: Tensor  # fvu + auxk_alpha * auxk_loss + sparsity_coefficient * sparsity_loss
    sparsity_loss: Tensor | None = None  # relu: normalized weighted L1; jumprelu: L0 (mean active per token)
    sparsity_coefficient: float = 0.0  # the warmed-up coefficient applied this step
    metrics: dict[str, Tensor] = field(default_factory=dict)  # extra scalars to log (0-dim tensors)


@torch.no_grad()
def _residual_fit_scale(residual: Tensor, residual_hat: Tensor) -> Tensor:
    """Per token, the factor s in [0, 1] that brings the AuxK reconstruction ê closest to the residual e.

    The k_aux dead latents are picked, and get their values, from their pre-activations on the input x, whose
    scale is the input's, not the residual's: summed, they overshoot e (an AuxK loss near or above 1), and
    the steepest way down that loss is then to shrink every dead latent's pre-activation — which keeps them
    dead (measured: 14.0% dead with AuxK against 9.3% without, issue 19). With ê rescaled by its own fit
    (no gradient through s) the shrinking direction is gone from the gradient, and what is left pushes up
    the dead latents that explain the residual better than the others and turns their decoder rows
    toward it. Never above 1: the term only removes overshoot, it does not amplify an undershoot.
    """
    fit = (residual * residual_hat).sum(dim=1, keepdim=True) / residual_hat.pow(2).sum(dim=1, keepdim=True)
    return torch.nan_to_num(fit, nan=0.0).clamp(0.0, 1.0)


def unit_rows(weight: Tensor) -> Tensor:
    return weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def variance_denominator(x: Tensor) -> Tensor:
    return (x - x.mean(dim=0, keepdim=True)).pow(2).sum().clamp_min(1e-12)


# The parameters with one entry per latent (split along dim 0 across latent shards); the rest every shard holds.
LATENT_PARAMETERS = ("W_enc", "b_enc", "W_dec", "log_threshold")


class SparseAutoencoder(nn.Module):
    """A dictionary of cfg.latents latents; with a sharded `mesh`, this rank's slice of them (trainers/parallel.py).

    Sharded, the forward exchanges top-k candidates and sums the partial decodes across the shard group, so
    every rank computes the same reconstruction and loss as one unsharded dictionary would.
    """

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, mesh: ShardMesh | None = None):
        super().__init__()
        self.cfg = cfg
        self.mesh = mesh or ShardMesh(world=1, rank=0, shards=1)
        self.latent_start, self.latent_stop = self.mesh.latent_range(cfg.latents)
        m, d = self.latent_stop - self.latent_start, cfg.d_in
        self.W_enc = nn.Parameter(torch.zeros(m, d, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(m, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(m, d, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.zeros(m, device=device, dtype=dtype))
            self.register_buffer("input_scale", torch.ones((), device=device, dtype=torch.float32))
        if cfg.batch_selection:
            self.register_buffer("threshold", torch.zeros((), device=device, dtype=torch.float32))
        if cfg.skip:  # every shard holds it, as b_dec; its gradient is summed over the shards
            self.W_skip = nn.Parameter(torch.zeros(d, d, device=device, dtype=dtype))
            self.mesh.all_reduce_shared_grad(self.W_skip)
        if cfg.transcoder:  # s: the target is learned as s·y, in the input's scale (see initialize_transcoder)
            self.register_buffer("target_scale", torch.ones((), device=device, dtype=torch.float32))
        self._target: Tensor | None = None  # the target rows of the forward call in progress (transcoders)
        if cfg.normalize_inputs:
            self.register_buffer("input_norm_factor", torch.ones((), device=device, dtype=torch.float32))
        self.mesh.all_reduce_shared_grad(self.b_dec)
        # Per-latent parameters: each shard holds its own slice, so the global gradient norm (the clip of
        # training.grad_clip_norm) adds their norms over the shards; DeepSpeed and RowSparseAdam read this mark.
        for name in LATENT_PARAMETERS:
            if hasattr(self, name):
                getattr(self, name).model_parallel = True

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, sample: Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
        """b_dec from the sample; decoder rows random or in the sample's principal subspace; W_enc = c · W_dec
        with c the least-squares scale on the sample (see _fit_encoder_scale) or the grid's best (norm_search);
        b_enc zero or −(mean pre-activation). With normalize_inputs, all of it on the normalized sample."""
        cfg = self.cfg
        sample = sample.to(self.b_dec.device, torch.float32)
        info: dict[str, float] = {}
        if cfg.normalize_inputs:  # one factor for all replicas, like input_scale below
            factor = sample.new_tensor([unit_mean_square_factor(sample)])
            factor = float(self.mesh.sum_over(factor, "replicas") / self.mesh.replicas)
            self.input_norm_factor.fill_(factor)
            sample = sample * factor
            info["input_norm_factor"] = factor
        b_dec = decoder_bias(sample, cfg.b_dec_init)
        self.b_dec.copy_(b_dec)
        # The generator fixes the dictionary: a shard draws its own rows of it (the same at any number of shards).
        seed = generator.initial_seed() if generator is not None else int(torch.randint(2**31, ()))
        if cfg.initialization == "subspace":
            rank = rank_of(cfg.d_in, cfg.variance_share, cfg.subspace_rank, cfg.subspace_rank_fraction)
            basis, subspace_info = principal_subspace(sample, cfg.variance_share, rank)
            info.update(subspace_info)
            rows = subspace_unit_rows(self.latent_start, self.latent_stop, basis.cpu(), seed)
        else:
            rows = random_unit_rows(self.latent_start, self.latent_stop, cfg.d_in, seed)
        self.W_dec.copy_(rows)
        self.W_enc.copy_(rows)
        self.b_enc.zero_()
        scale = (sample - b_dec).pow(2).sum(dim=1).mean().sqrt().clamp_min(1e-8).reshape(1)
        # Data-parallel replicas initialize from different batches: one scale for all, since DeepSpeed makes the
        # parameters identical across replicas but not this buffer.
        scale = float(self.mesh.sum_over(scale, "replicas") / self.mesh.replicas)
        info["input_scale"] = scale
        if cfg.architecture == "jumprelu":
            self.input_scale.fill_(scale)
            self.log_threshold.fill_(math.log(cfg.jumprelu_init_threshold * scale))
        if cfg.batch_selection:
            self.threshold.zero_()
        if cfg.uses_k:
            fit = self._search_encoder_scale if cfg.init_scale == "norm_search" else self._fit_encoder_scale
            info["encoder_scale"] = fit(sample - b_dec)
        if cfg.b_enc_init == "mean_preactivation":  # the mean of W_enc(x − b_dec) is W_enc(mean x − b_dec)
            self.b_enc.copy_(-(self.W_enc @ (sample.mean(dim=0) - b_dec)))
        return info

    @torch.no_grad()
    def _search_encoder_scale(self, centred: Tensor) -> float:
        """The paper's norm search: W_enc = c · (unit rows) for the c of NORM_SEARCH_GRID with the lowest
        reconstruction error Σ‖x − x̂‖² on the sample (tied weights of row norm s give s² = c). With b_enc = 0
        TopK's selection does not move with c, so the least-squares scale is this search's exact optimum; the
        grid lands within half a step (×1.26) of it."""
        rows = self.W_enc.detach().clone()

        def loss_of(c: float) -> float:
            self.W_enc.copy_(rows * c)
            x_hat = self._forward_normalized(centred + self.b_dec, None, 1.0).x_hat - self.b_dec
            return float((centred - x_hat).pow(2).sum())

        best, _ = grid_search(loss_of, NORM_SEARCH_GRID)
        self.W_enc.copy_(rows * best)
        if self.cfg.batch_selection:  # θ as the least-squares path leaves it: from one pass at the chosen scale
            self.threshold.zero_()
            self._forward_normalized(centred + self.b_dec, None, 1.0)
        return best

    @torch.no_grad()
    def initialize_transcoder(self, sample: Tensor, target: Tensor, generator: torch.Generator | None = None
                              ) -> dict[str, float]:
        """A transcoder from aligned rows of its input and target sites.

        The target is learned as s·y with s = RMS(x − x̄) / RMS(y − ȳ) (a buffer, one for all replicas): an MLP's
        output can be orders of magnitude smaller than its input, and Adam's steps, set by the learning rate in
        absolute units, then throw W_enc, W_skip and b_dec far past it (seen: held-out FVU 1.5e5 after 12 steps
        on the tiny model's mlp_in → mlp_out). s is folded away at export. The decoder (rows, b_dec) is as
        `initialize` makes it for s·y; the encoder the same directions with b_enc = −W_enc·mean(x), which
        centres the pre-activations (the input is not centred by b_dec), both scaled by the least-squares c of
        the prediction on the samples (a positive scale of W_enc and b_enc keeps the TopK selection)."""
        x = sample.to(self.b_dec.device, torch.float32)
        y = target.to(self.b_dec.device, torch.float32)
        spread = torch.stack([(rows - rows.mean(dim=0)).pow(2).sum(dim=1).mean() for rows in (x, y)])
        spread = self.mesh.sum_over(spread, "replicas")
        scale_y = float((spread[0] / spread[1].clamp_min(1e-12)).sqrt())
        self.target_scale.fill_(1.0)
        info = self.initialize(y * scale_y, generator)
        self.target_scale.fill_(scale_y)
        info["target_scale"] = scale_y
        self.W_enc.copy_(self.W_dec)
        self.b_enc.copy_(-(self.W_enc @ x.mean(dim=0)))
        if self.cfg.uses_k:
            y = y * scale_y  # from here on in the scaled units
            y_hat = self(x, target=y).x_hat * scale_y - self.b_dec
            scale = float(((y - self.b_dec) * y_hat).sum() / y_hat.pow(2).sum().clamp_min(1e-12))
            if scale > 0:
                self.W_enc.mul_(scale)
                self.b_enc.mul_(scale)
            info["encoder_scale"] = scale
            if self.cfg.batch_selection:
                self.threshold.zero_()  # the first training batch sets θ at the final scale
        return info

    @torch.no_grad()
    def _fit_encoder_scale(self, centred: Tensor) -> float:
        """Scale W_enc by the least-squares factor c = ⟨x − b, x̂ − b⟩ / ‖x̂ − b‖² over the sample.

        With W_enc = W_dec the k largest projections of a token add up far past it when the rows are correlated
        — 65,536 rows drawn in a 258-dimensional span start at FVU > 1 and the first steps go into undoing the
        overshoot. The selection does not change under a positive scale (b_enc = 0, threshold 0: TopK and
        BatchTopK pick the same latents), so only the magnitudes move, to where the reconstruction error is least.
        ReLU and JumpReLU keep W_enc = W_dec: their sparsity penalty, not a fixed k, sets how many rows add up.
        """
        x_hat = self._forward_normalized(centred + self.b_dec, None, 1.0).x_hat - self.b_dec
        scale = float((centred * x_hat).sum() / x_hat.pow(2).sum().clamp_min(1e-12))
        if scale > 0:
            self.W_enc.mul_(scale)
        return scale

    def decoder_directions(self) -> Tensor:
        return unit_rows(self.W_dec)

    # ------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *, progress: float = 1.0,
                target: Tensor | None = None) -> SAEOutput:
        """`target`: a transcoder's rows of the site it reconstructs [N, d]; None: x itself."""
        scale = self.target_scale if self.cfg.transcoder else None
        self._target = target if scale is None or target is None else target * scale.to(target.dtype)
        try:
            out = self._forward(x, dead_mask, progress=progress)
        finally:
            self._target = None
        if scale is not None:  # the prediction in the target's own units (FVU and the losses are the same)
            out.x_hat = out.x_hat / scale.to(out.x_hat.dtype)
        return out

    def _forward(self, x: Tensor, dead_mask: Tensor | None = None, *, progress: float = 1.0) -> SAEOutput:
        if self.cfg.normalize_inputs:  # the dictionary sees f·x; x̂ comes back in the input's units (FVU: same)
            factor = self.input_norm_factor.to(x.dtype)
            out = self._forward_normalized(x * factor, dead_mask, progress)
            out.x_hat = out.x_hat / factor
            return out
        return self._forward_normalized(x, dead_mask, progress)

    def _forward_normalized(self, x: Tensor, dead_mask: Tensor | None, progress: float) -> SAEOutput:
        if self.cfg.uses_k:
            return self._forward_sparse(x, dead_mask)
        return self._forward_dense(x, progress)

    def _forward_sparse(self, x: Tensor, dead_mask: Tensor | None) -> SAEOutput:
        cfg = self.cfg
        batch = cfg.batch_selection
        y = self._target if self._target is not None else x  # what is reconstructed
        aux_wanted = cfg.uses_auxk and self.training and dead_mask is not None and self._any_dead(dead_mask)
        acts, indices, aux_acts, aux_indices = topk_encode(
            self._encoder_input(x), self.W_enc, self.b_enc, cfg.row_cap if batch else cfg.k, chunk=cfg.encoder_chunk,
            dead_mask=dead_mask if aux_wanted else None, k_aux=cfg.effective_k_aux if aux_wanted else 0,
            sparse_grads=cfg.sparse_grads, signed=cfg.signed)
        metrics: dict[str, Tensor] = {}
        if batch:
            acts, metrics = self._batch_select(acts)
        elif self.mesh.sharded:
            acts = acts * self.mesh.select_global(acts.abs() if cfg.signed else acts, cfg.k)
        if cfg.matryoshka:
            x_hat, prefix_fvu = self._prefix_decodes(x, y, acts, indices, metrics)
            fvu = prefix_fvu[-1]
        else:
            x_hat = self._decode_sum(sparse_decode(acts, indices, self.W_dec, sparse_grads=cfg.sparse_grads), x)
            fvu = (y - x_hat).pow(2).sum() / variance_denominator(y)
        auxk_loss = x.new_zeros(())
        if aux_wanted and (aux_acts.shape[1] > 0 or self.mesh.sharded):
            # Reconstruct the residual from dead latents only; normalized by the residual's own variance (as
            # Gao et al.'s code does) so the term keeps its weight as the main FVU falls.
            residual = (y - x_hat).detach()
            if self.mesh.sharded:
                # A shard offers min(k_aux, its dead latents) candidates: pad to k_aux so every shard gathers
                # the same width (zeros decode to nothing), then keep the global top-k_aux, as one rank would.
                missing = cfg.effective_k_aux - aux_acts.shape[1]  # zero values at index 0 select nothing
                aux_acts, aux_indices = F.pad(aux_acts, (0, missing)), F.pad(aux_indices, (0, missing))
                aux_acts = aux_acts * self.mesh.select_global(aux_acts.abs() if cfg.signed else aux_acts,
                                                              cfg.effective_k_aux)
            residual_hat = self.mesh.sum_across_shards(
                sparse_decode(aux_acts, aux_indices, self.W_dec, sparse_grads=cfg.sparse_grads))
            if cfg.auxk_fit_scale:
                residual_hat = residual_hat * _residual_fit_scale(residual, residual_hat)
            auxk_loss = (residual - residual_hat).pow(2).sum() / variance_denominator(residual)
            auxk_loss = torch.nan_to_num(auxk_loss, nan=0.0, posinf=0.0)
        reconstruction = prefix_fvu.sum() if cfg.matryoshka else fvu
        loss = reconstruction + cfg.auxk_alpha * auxk_loss
        return SAEOutput(x_hat, acts, indices, fvu, auxk_loss, loss, metrics=metrics)

    def _prefix_decodes(self, x: Tensor, y: Tensor, acts: Tensor, indices: Tensor, metrics: dict[str, Tensor]
                        ) -> tuple[Tensor, Tensor]:
        """Matryoshka: (x̂ of the whole dictionary, FVU of every prefix [G]); per-prefix FVU and L0 into `metrics`.

        Group g holds latents [m_(g-1), m_g). One bag decode (every nonzero code once, in bag g·N + n: token n's
        codes of group g) gives every group's partial decode at one decode's cost; accumulated over groups and
        summed across shards, row p is prefix p's reconstruction. One autograd node, so one gradient per weight.
        """
        ends = self.cfg.prefix_ends
        boundaries = torch.tensor(ends, device=indices.device)
        group = torch.bucketize(indices + self.latent_start, boundaries, right=True)  # [N, k'] in 0..G-1
        groups = torch.arange(len(ends), device=indices.device)[:, None, None]
        n, d = y.shape
        token, slot = torch.nonzero(acts.detach(), as_tuple=True)
        bag, order = torch.sort(group[token, slot] * n + token, stable=True)
        token, slot = token[order], slot[order]
        partial = bag_decode(acts[token, slot], indices[token, slot], bag, len(ends) * n, self.W_dec,
                             sparse_grads=self.cfg.sparse_grads)
        prefix_hat = self._decode_sum(partial.view(len(ends), n, d).cumsum(0), x)  # b_dec (and skip) once
        prefix_fvu = (y[None] - prefix_hat).pow(2).sum(dim=(1, 2)) / variance_denominator(y)
        with torch.no_grad():
            active = ((acts != 0)[None] & (group[None] <= groups)).sum(dim=2).float().mean(dim=1)
            active = self.mesh.sum_over(active, "shards")
            for end, value, count in zip(ends, prefix_fvu.detach(), active, strict=True):
                metrics[f"fvu_prefix_{end}"] = value.clone()
                metrics[f"l0_prefix_{end}"] = count.clone()
        return prefix_hat[-1], prefix_fvu

    def _any_dead(self, dead_mask: Tensor) -> bool:
        """Whether any latent of the whole dictionary is dead: every shard must agree on taking the AuxK path,
        whose collectives would otherwise wait for a shard that skipped it."""
        if not self.mesh.sharded:
            return bool(dead_mask.any())
        return bool(self.mesh.sum_over(dead_mask.any().float().reshape(1), "shards") > 0)

    def _encoder_input(self, x: Tensor) -> Tensor:
        """x − b_dec for an autoencoder; a transcoder's b_dec is in the output space, so x itself."""
        return x if self.cfg.transcoder else x - self.b_dec

    def _decode_sum(self, partial: Tensor, x: Tensor) -> Tensor:
        """x̂ = Σ over shards of the partial decodes + b_dec (+ W_skip x): each shard adds 1/S of the shared
        terms, so they count once and their gradients, summed over the shards, are whole."""
        shared = self.b_dec if not self.cfg.skip else self.b_dec + x @ self.W_skip.T
        return self.mesh.sum_across_shards(partial + shared / self.mesh.shards)

    def _batch_select(self, acts: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """BatchTopK: keep the top N·k of the batch's candidates (training) or those above θ (inference)."""
        n = acts.shape[0]
        with torch.no_grad():
            if self.training:
                # Sharded: the same per-row cap, then the same N·k, over the candidates of all shards.
                values = acts.detach()
                if self.mesh.sharded:
                    values = values * self.mesh.select_global(values, self.cfg.row_cap)
                gathered = self.mesh.gather_candidates(values)
                flat = gathered.reshape(-1)
                keep_count = min(n * self.cfg.k, flat.numel())
                kept_values, kept = flat.topk(keep_count, sorted=False)
                mask = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, kept, True).view_as(gathered)
                mask = self.mesh.own_columns(mask, acts.shape[1]) & (values > 0)
                positive = kept_values[kept_values > 0]
                # θ is a buffer: the replicas' batches' minima are averaged, so that θ stays the same on every
                # data-parallel replica (each calls the all-reduce, with or without a positive value).
                has = positive.numel() > 0
                smallest = torch.stack([positive.min().float() if has else acts.new_zeros((), dtype=torch.float32),
                                        acts.new_tensor(float(has), dtype=torch.float32)])
                smallest = self.mesh.sum_over(smallest, "replicas")
                if float(smallest[1]) > 0:
                    # The first batch sets θ outright: an EMA from 0 would take ~1/lr steps to mean anything.
                    lr = self.cfg.batchtopk_threshold_lr if float(self.threshold) > 0 else 1.0
                    self.threshold.mul_(1 - lr).add_(lr * smallest[0] / smallest[1])
            else:
                mask = acts.detach() > self.threshold.to(acts.dtype)
            capped = mask.all(dim=1).float().mean() if acts.shape[1] > self.cfg.k else acts.new_zeros(())
        metrics = {"batchtopk_threshold": self.threshold.detach().clone(), "batchtopk_capped_rows": capped}
        return acts * mask, metrics

    def _forward_dense(self, x: Tensor, progress: float) -> SAEOutput:
        cfg = self.cfg
        y = self._target if self._target is not None else x  # what is reconstructed
        pre = self._encoder_input(x) @ self.W_enc.T + self.b_enc
        warm = min(1.0, progress / cfg.sparsity_warmup) if cfg.sparsity_warmup > 0 else 1.0
        if cfg.architecture == "relu":
            acts = torch.relu(pre)
            x_hat = self._decode_sum(acts @ self.W_dec, x)
            rms = (variance_denominator(y) / y.shape[0]).sqrt().detach()
            sparsity = self.mesh.sum_across_shards((acts * self.W_dec.norm(dim=1)).sum(dim=1).mean() / rms)
            coefficient = cfg.l1_coefficient * warm
        else:  # jumprelu
            threshold = self.log_threshold.exp()
            bandwidth = cfg.jumprelu_bandwidth * float(self.input_scale)
            acts = jumprelu(pre, threshold, bandwidth)
            x_hat = self._decode_sum(acts @ self.decoder_directions(), x)
            sparsity = self.mesh.sum_across_shards(step(pre, threshold, bandwidth).sum(dim=1).mean())
            coefficient = cfg.l0_coefficient * warm
        fvu = (y - x_hat).pow(2).sum() / variance_denominator(y)
        local = self.latent_stop - self.latent_start
        indices = torch.arange(local, device=x.device).expand(x.shape[0], local)
        loss = fvu + coefficient * sparsity
        return SAEOutput(x_hat, acts, indices, fvu, x.new_zeros(()), loss, sparsity_loss=sparsity.detach(),
                         sparsity_coefficient=coefficient)

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def export_tensors(self) -> dict[str, Tensor]:
        """SAELens naming: W_enc [d, M], W_dec [M, d] (unit rows), b_enc [M], b_dec [d] (+ threshold)."""
        W_enc, b_enc = self.W_enc.detach().float(), self.b_enc.detach().float()
        if self.cfg.architecture == "relu":
            # Fold the decoder norms into the encoder: ReLU(c·z) = c·ReLU(z) for c > 0 keeps the function.
            norms = self.W_dec.detach().float().norm(dim=1).clamp_min(1e-8)
            W_enc, b_enc = W_enc * norms[:, None], b_enc * norms
        tensors = {
            "W_enc": W_enc.T.contiguous().cpu(),
            "W_dec": self.decoder_directions().detach().float().contiguous().cpu(),
            "b_enc": b_enc.cpu().clone(),
            "b_dec": self.b_dec.detach().float().cpu().clone(),
        }
        if self.cfg.architecture == "jumprelu":
            tensors["threshold"] = self.log_threshold.detach().float().exp().cpu()
        if self.cfg.batch_selection:
            tensors["threshold"] = torch.full((self.latent_stop - self.latent_start,), float(self.threshold))
        if self.cfg.skip:
            tensors["W_skip"] = self.W_skip.detach().float().cpu().clone()
        if self.cfg.transcoder:  # trained to predict s·y: the codes (W_enc, b_enc, θ), b_dec and W_skip carry 1/s,
            scale = float(self.target_scale)  # the decoder keeps unit rows (every activation is homogeneous)
            for name in ("W_enc", "b_enc", "threshold", "b_dec", "W_skip"):
                if name in tensors:
                    tensors[name] = tensors[name] / scale
        if self.cfg.normalize_inputs:
            # Fold the input factor f away (as SAELens's fold_activation_norm_scaling_factor, with unit decoder
            # rows kept): every activation here is positively homogeneous, so codes of x/f·(f·x) are the codes of
            # f·x divided by f, and b_enc/f, b_dec/f, θ/f on raw x give the same x̂ (codes 1/f of the trained ones).
            factor = float(self.input_norm_factor)
            for name in ("b_enc", "b_dec", "threshold"):
                if name in tensors:
                    tensors[name] = tensors[name] / factor
        return tensors

    def export_config(self) -> dict[str, Any]:
        """The SAELens 6.x cfg.json entries that depend on the architecture.

        SAELens has no inference `batchtopk` class: its own BatchTopK trainer saves a JumpReLU SAE whose
        threshold is the learned global θ on every latent, and so do we. Its `matryoshka_batchtopk` is a training
        class too (saved as JumpReLU): Matryoshka dictionaries are exported in their inference form (TopK or
        JumpReLU), with the prefix sizes kept as `matryoshka_widths` (SAELens's own key, ignored on load).
        """
        arch = self.cfg.architecture
        prefixes = {"matryoshka_widths": list(self.cfg.prefix_ends)} if self.cfg.matryoshka else {}
        if self.cfg.transcoder:  # SAELens's transcoder classes: ReLU, or thresholded (JumpReLU); no TopK one
            if arch not in ("relu", "jumprelu", "batchtopk", "matryoshka_batchtopk"):
                raise ValueError(f"SAELens has no {arch} transcoder; export it in the sparsify layout (TopK) instead")
            kind = "transcoder" if arch == "relu" else "jumprelu_transcoder"
            if self.cfg.skip:
                kind = kind.replace("transcoder", "skip_transcoder")
            return {"architecture": kind, "d_out": self.cfg.d_in, "apply_b_dec_to_input": False, **prefixes}
        if arch in ("topk", "abstopk", "matryoshka_topk"):
            return {"architecture": arch.removeprefix("matryoshka_"), "k": self.cfg.k,
                    "rescale_acts_by_decoder_norm": False, **prefixes}
        if arch in ("batchtopk", "matryoshka_batchtopk", "jumprelu"):
            return {"architecture": "jumprelu", **prefixes}
        return {"architecture": "standard"}
