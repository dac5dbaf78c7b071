"""Sparse kernels of a TopK-style dictionary, in plain PyTorch (CPU and CUDA), as custom autograd Functions.

The cost model (FIELD-NOTES): the only unavoidable dense work is the encoder product, 2·d·M FLOPs per token.
Everything else here touches the k selected rows per token:

- `topk_encode`: the encoder, chunked over latents with a running top-k, so the N×M pre-activation matrix is
  never held (peak extra memory O(N·(chunk + k))). Optionally also the top-k_aux pre-activations among dead
  latents (AuxK) from the same pass. Backward: the gradients of W_enc and b_enc are sums over the selected
  (token, latent) pairs only (an embedding_bag over latents), the input gradient is an embedding_bag over
  tokens.
- `sparse_decode`: x̂ = Σ_j a_j · W_dec[i_j] / ‖W_dec[i_j]‖ as one embedding_bag with per-sample weights; the
  row norms are computed for the touched rows only, and the backward removes each touched row's parallel
  gradient component (d(w/‖w‖)/dw = (I − ŵŵᵀ)/‖w‖) on those rows only. `bag_decode` is the same with bags
  of varying size (Matryoshka's per-group partial decodes).

Both Functions return the weight gradients either dense-shaped (torch.optim.Adam, for exact dense Adam and
ZeRO-1/2, which flatten gradients) or as sparse COO tensors holding only the touched rows (`sparse_grads=True`,
for the touched-row lazy Adam of trainers/optim.py that the job's DeepSpeed engine runs by default): no
[M, d] zero-fill per step, and at a million latents a dense gradient is 2.4 GB per matrix, the difference
between fitting in 24 GiB or not — see the README's trainer section.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of the selection are narrowed through block maxima while a row is longer than this many times k:
# torch's CPU topk costs ~2 ns per element (it copies every row into (value, index) pairs), a strided max
# over blocks is memory-bound and ~5x cheaper, so the expensive selection only sees candidate blocks.
_BLOCK = 8
_NARROW_FACTOR = 16


def topk_blockwise(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact row-wise top-k (unsorted) of `values` [N, C], cheaper than `Tensor.topk` for C ≫ k.

    The columns are split into _BLOCK strided slices; the top-k elements of a row lie in the k blocks with the
    largest maxima (a block holding one of them has a maximum ≥ the k-th value, and at most k blocks can),
    so the selection recurses on the block maxima and finishes on k·_BLOCK gathered candidates.
    """
    n, c = values.shape
    if c <= _NARROW_FACTOR * k or c % _BLOCK != 0 or n == 0:
        return values.topk(min(k, c), dim=1, sorted=False)
    blocks = c // _BLOCK
    block_max = values.view(n, _BLOCK, blocks).amax(dim=1)  # element (r, j) = max over columns j + s·blocks
    _, top_blocks = topk_blockwise(block_max, k)
    offsets = torch.arange(_BLOCK, device=values.device) * blocks
    columns = (top_blocks[:, :, None] + offsets).reshape(n, -1)
    candidates = values.gather(1, columns)
    top_values, positions = candidates.topk(k, dim=1, sorted=False)
    return top_values, columns.gather(1, positions)


def select_topk(values: Tensor, indices: Tensor, k: int, by_magnitude: bool = False) -> tuple[Tensor, Tensor]:
    """The row-wise top-k (unsorted) of candidate `values` [N, C] and their latent `indices`; `by_magnitude`:
    by |value|, values kept with their sign (AbsTopK). Rows of at most k candidates come back as they are."""
    if values.shape[1] <= k:
        return values, indices
    if by_magnitude:
        positions = values.abs().topk(k, dim=1, sorted=False).indices
        return values.gather(1, positions), indices.gather(1, positions)
    values, positions = values.topk(k, dim=1, sorted=False)
    return values, indices.gather(1, positions)


def _merge_topk(values: Tensor, indices: Tensor, new_values: Tensor, new_indices: Tensor, k: int,
                by_magnitude: bool = False) -> tuple[Tensor, Tensor]:
    return select_topk(torch.cat([values, new_values], dim=1), torch.cat([indices, new_indices], dim=1), k,
                       by_magnitude)


def _select(pre: Tensor, k: int, signed: bool, magnitudes: Tensor | None) -> tuple[Tensor, Tensor]:
    """Row-wise top-k of `pre` (signed: by |pre| into the reused `magnitudes` buffer, returning signed values)."""
    if not signed:
        return topk_blockwise(pre, k)
    _, indices = topk_blockwise(torch.abs(pre, out=magnitudes), k)
    return pre.gather(1, indices), indices


@contextmanager
def _sort_threads(tensor: Tensor):
    """Sort on one thread on CPU: torch 2.13's parallel CPU sort of ~10⁵ int64 keys took 110 ms on 2 busy
    cores against 3 ms on one (measured), and these sorts sit on every step's critical path."""
    if tensor.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rows_weighted_sum(indices: Tensor, weights: Tensor, source: Tensor, bag_of: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
    """For every latent m with a nonzero weight in `indices` [N, K]:
    Σ_{(n, j): indices[n, j] = m} weights[n, j]·source[n].

    Returns (rows [U] sorted unique latents, sums [U, d]). One embedding_bag over tokens, one bag per latent:
    no [N·K, d] intermediate and no dense [M, d] product. `bag_of` [E] (indices then [E, 1]): the row of
    `source` each entry belongs to, for bags of varying size (bag_decode).

    Entries of weight zero are left out, so a latent whose every entry is zero is not a row of the result: a
    candidate that the global selection across shards, BatchTopK's threshold or the ReLU set to zero is not
    touched, and the touched-row optimizer leaves it alone, the same on any number of latent shards.
    """
    kk = indices.shape[1]
    flat_weights = weights.reshape(-1)
    entries = flat_weights.nonzero().squeeze(1)
    flat = indices.reshape(-1)[entries]
    with _sort_threads(flat):
        order = torch.argsort(flat)
    entries = entries[order]
    rows, counts = torch.unique_consecutive(flat[order], return_counts=True)
    if rows.numel() == 0:
        return rows, source.new_zeros(0, source.shape[1])
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    tokens = torch.div(entries, kk, rounding_mode="floor") if bag_of is None else bag_of[entries]
    sums = F.embedding_bag(tokens, source, offsets, mode="sum",
                           per_sample_weights=flat_weights[entries].to(source.dtype))
    return rows, sums


def _unit_rows_grad(W_dec: Tensor, rows: Tensor, norms: Tensor, grad_rows: Tensor, sums: Tensor) -> Tensor:
    """The gradient of W_dec[grad_rows] through the unit rows ŵ = w/‖w‖, from `sums` = ∂L/∂ŵ / ‖w‖ (the
    decode's per-row sums with weights a/‖w‖): (I − ŵŵᵀ)·sums = sums − w·(w·sums)/‖w‖², written into `sums`.
    `rows`, `norms`: the forward's sorted decoded rows and their norms; `grad_rows` is a subset of them (the
    rows with a nonzero code).

    In place, with batched dots: each fresh [rows, d] tensor costs its page faults on CPU, and the
    out-of-place form (four temporaries) took 0.4 s of a 131,072-latent step's backward against 45 ms
    for this (measured)."""
    norms = norms[torch.searchsorted(rows, grad_rows)]
    w = W_dec.index_select(0, grad_rows)
    dots = torch.bmm(w.unsqueeze(1), sums.unsqueeze(2)).view(-1)
    return sums.addcmul_(w, (dots / norms.square()).neg_().unsqueeze(1))


def _weight_grad(rows: Tensor, values: Tensor, like: Tensor, sparse: bool) -> Tensor:
    if sparse:
        return torch.sparse_coo_tensor(rows[None], values, like.shape, is_coalesced=True,
                                       check_invariants=False)
    return torch.zeros_like(like).index_copy_(0, rows, values.to(like.dtype))


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, chunk: int, dead_mask: Tensor | None,
                k_aux: int, sparse_grads: bool, signed: bool):
        n, m = x.shape[0], W_enc.shape[0]
        k = min(k, m)
        top_v = x.new_empty(n, 0)
        top_i = torch.empty(n, 0, dtype=torch.long, device=x.device)
        aux_v, aux_i = top_v, top_i
        dead_rows = dead_mask.nonzero().squeeze(1) if dead_mask is not None and k_aux > 0 else None
        buffer = magnitudes = None
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            width = stop - start
            if buffer is None or buffer.shape[1] != width:
                buffer = x.new_empty(n, width)
                magnitudes = x.new_empty(n, width) if signed else None
            # addmm into one reused buffer (no page faults per chunk). Folding the bias in as a column of ones
            # (K = d + 1) measured slower: MKL prefers the aligned K.
            pre = torch.addmm(b_enc[start:stop], x, W_enc[start:stop].T, out=buffer)
            values, indices = _select(pre, min(k, width), signed, magnitudes)
            top_v, top_i = _merge_topk(top_v, top_i, values, indices + start, k, signed)
            if dead_rows is not None:
                lo, hi = torch.searchsorted(dead_rows, torch.tensor([start, stop], device=x.device)).tolist()
                if hi > lo:
                    local = dead_rows[lo:hi] - start
                    dead_pre = pre.index_select(1, local)
                    values, positions = _select(dead_pre, min(k_aux, hi - lo), signed, None)
                    aux_v, aux_i = _merge_topk(aux_v, aux_i, values, local[positions] + start, k_aux, signed)
        if not signed:
            # ReLU after the selection: monotone, so top-k of ReLU(pre) = ReLU(top-k of pre) (ties at 0 aside).
            top_v = top_v.clamp_min(0)
            aux_v = aux_v.clamp_min(0)
        ctx.save_for_backward(x, W_enc, top_v, top_i, aux_v, aux_i)
        ctx.sparse_grads = sparse_grads
        ctx.signed = signed
        ctx.mark_non_differentiable(top_i, aux_i)
        return top_v, top_i, aux_v, aux_i

    @staticmethod
    def backward(ctx, grad_top, _grad_top_i, grad_aux, _grad_aux_i):
        x, W_enc, top_v, top_i, aux_v, aux_i = ctx.saved_tensors
        # The gradient reaches a pre-activation only where ReLU passed it (signed codes: every selected one).
        if ctx.signed:
            weights = torch.cat([grad_top, grad_aux], dim=1)
        else:
            weights = torch.cat([grad_top * (top_v > 0), grad_aux * (aux_v > 0)], dim=1)
        indices = torch.cat([top_i, aux_i], dim=1)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc, mode="sum", per_sample_weights=weights.to(W_enc.dtype))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            rows, sums = rows_weighted_sum(indices, weights, x)
            grad_W = _weight_grad(rows, sums, W_enc, ctx.sparse_grads)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[0], dtype=weights.dtype, device=weights.device)
            grad_b.index_add_(0, indices.reshape(-1), weights.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None, None, None, None


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, chunk: int = 8192,
                dead_mask: Tensor | None = None, k_aux: int = 0, sparse_grads: bool = False,
                signed: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(acts [N, k], indices [N, k], aux_acts [N, k_aux'], aux_indices [N, k_aux']) of ReLU(x W_encᵀ + b_enc).

    `x` is the already-centred input (x − b_dec). acts/indices: the row-wise top-k; aux: the top-k_aux among
    the latents of `dead_mask` (empty [N, 0] when there are none). Values are ReLU'd; order is unspecified.
    `signed` (AbsTopK): the top-k by |pre-activation|, values kept with their sign (no ReLU).
    """
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[1]:
        raise ValueError(f"x [N, d] and W_enc [M, d] expected; got {tuple(x.shape)} and {tuple(W_enc.shape)}")
    return _TopKEncode.apply(x, W_enc, b_enc, int(k), int(chunk), dead_mask, int(k_aux), bool(sparse_grads),
                             bool(signed))


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts: Tensor, indices: Tensor, W_dec: Tensor, normalize: bool, sparse_grads: bool):
        with _sort_threads(indices):
            rows, inverse = torch.unique(indices, return_inverse=True)
        if normalize:
            norms = W_dec.index_select(0, rows).norm(dim=1).clamp_min(1e-8)
            weights = (acts / norms[inverse].to(acts.dtype)).to(W_dec.dtype)
        else:
            norms = None
            weights = acts.to(W_dec.dtype)
        out = F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=weights)
        ctx.save_for_backward(weights, indices, W_dec, rows, inverse, norms)
        ctx.normalize = normalize
        ctx.sparse_grads = sparse_grads
        return out.to(acts.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weights, indices, W_dec, rows, inverse, norms = ctx.saved_tensors
        grad = grad_out.to(W_dec.dtype)
        grad_acts = grad_W = None
        if ctx.needs_input_grad[0]:
            # (W_dec[i]·g_n) / ‖W_dec[i]‖ for every selected (n, i), without gathering [N, K, d] rows.
            grad_acts = _gathered_dots(W_dec, indices, grad)
            if ctx.normalize:
                grad_acts = grad_acts / norms[inverse]
            grad_acts = grad_acts.to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            # Σ (a / ‖w‖)·g per row with a nonzero code (a subset of `rows`), then the projection in place
            grad_rows, sums = rows_weighted_sum(indices, weights, grad)
            if ctx.normalize:
                sums = _unit_rows_grad(W_dec, rows, norms, grad_rows, sums)
            grad_W = _weight_grad(grad_rows, sums, W_dec, ctx.sparse_grads)
        return grad_acts, None, grad_W, None, None


class _BagDecode(torch.autograd.Function):
    """sparse_decode with bags of varying size: entry e (value acts[e], latent indices[e]) adds to row bag_of[e]."""

    @staticmethod
    def forward(ctx, acts: Tensor, indices: Tensor, bag_of: Tensor, bags: int, W_dec: Tensor, sparse_grads: bool):
        with _sort_threads(indices):
            rows, inverse = torch.unique(indices, return_inverse=True)
        norms = W_dec.index_select(0, rows).norm(dim=1).clamp_min(1e-8)
        offsets = torch.zeros(bags, dtype=torch.long, device=indices.device)
        offsets[1:] = torch.bincount(bag_of, minlength=bags).cumsum(0)[:-1]
        weights = (acts / norms[inverse].to(acts.dtype)).to(W_dec.dtype)
        out = F.embedding_bag(indices, W_dec, offsets, mode="sum", per_sample_weights=weights)
        ctx.save_for_backward(weights, indices, bag_of, offsets, W_dec, rows, inverse, norms)
        ctx.sparse_grads = sparse_grads
        return out.to(acts.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weights, indices, bag_of, offsets, W_dec, rows, inverse, norms = ctx.saved_tensors
        grad = grad_out.to(W_dec.dtype)
        grad_acts = grad_W = None
        if ctx.needs_input_grad[0]:
            dots = _bag_dots(W_dec, indices, offsets, bag_of, grad)
            grad_acts = (dots / norms[inverse]).to(grad_out.dtype)
        if ctx.needs_input_grad[4]:
            grad_rows, sums = rows_weighted_sum(indices[:, None], weights, grad, bag_of=bag_of)
            sums = _unit_rows_grad(W_dec, rows, norms, grad_rows, sums)
            grad_W = _weight_grad(grad_rows, sums, W_dec, ctx.sparse_grads)
        return grad_acts, None, None, None, grad_W, None


def bag_decode(acts: Tensor, indices: Tensor, bag_of: Tensor, bags: int, W_dec: Tensor, *,
               sparse_grads: bool = False) -> Tensor:
    """[bags, d]: row b = Σ_{e: bag_of[e] = b} acts[e] · Ŵ_dec[indices[e]] (Ŵ: unit rows); entries sorted by bag.

    The Matryoshka prefix decode: every code once, in the bag of its (group, token), so splitting the codes
    over G groups costs one decode's work, not G."""
    if acts.numel() == 0:
        return acts.new_zeros(bags, W_dec.shape[1])
    return _BagDecode.apply(acts, indices, bag_of, int(bags), W_dec, bool(sparse_grads))


def _bag_dots(weight: Tensor, indices: Tensor, offsets: Tensor, bag_of: Tensor, grad: Tensor,
              block: int = 2048) -> Tensor:
    """[E] with element e = weight[indices[e]] · grad[bag_of[e]] (entries sorted by bag, `offsets` their starts).

    This is exactly the per-sample-weight gradient of embedding_bag, which ATen computes row by row without
    materialising the gathered rows (47 ms against 130-240 ms for gather + bmm at N=4096, K=32, d=576,
    M=131072, measured). Fallback: the gathered rows in blocks of `block` entries.
    """
    try:
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, weight, indices, offsets, bag_of, 0, -1)
    except (RuntimeError, AttributeError, NotImplementedError):  # a private op: absent, or not for this device/dtype
        out = grad.new_empty(indices.shape[0])
        for start in range(0, indices.shape[0], block):
            stop = min(start + block, indices.shape[0])
            rows = weight.index_select(0, indices[start:stop])
            out[start:stop] = (rows * grad.index_select(0, bag_of[start:stop])).sum(dim=1)
        return out


def _gathered_dots(weight: Tensor, indices: Tensor, grad: Tensor) -> Tensor:
    """[N, K] with element (n, j) = weight[indices[n, j]] · grad[n]: `_bag_dots` with one bag of K per token."""
    n, kk = indices.shape
    offsets = torch.arange(0, n * kk, kk, device=indices.device)
    bag_of = torch.arange(n, device=indices.device).repeat_interleave(kk)
    return _bag_dots(weight, indices.reshape(-1), offsets, bag_of, grad).view(n, kk)


def sparse_decode(acts: Tensor, indices: Tensor, W_dec: Tensor, *, normalize: bool = True,
                  sparse_grads: bool = False) -> Tensor:
    """Σ_j acts[:, j] · Ŵ_dec[indices[:, j]] → [N, d]; Ŵ = row-normalised W_dec (raw if not `normalize`)."""
    if acts.shape != indices.shape:
        raise ValueError(f"acts and indices must have the same shape; got {tuple(acts.shape)}, "
                         f"{tuple(indices.shape)}")
    if acts.shape[1] == 0:
        return acts.new_zeros(acts.shape[0], W_dec.shape[1])
    return _SparseDecode.apply(acts, indices, W_dec, bool(normalize), bool(sparse_grads))


class _JumpReLU(torch.autograd.Function):
    """f = z·H(z − θ); ∂f/∂z = H(z − θ); ∂f/∂θ = −(θ/ε)·K((z − θ)/ε); K = unit rectangle (2407.14435)."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((z - threshold).abs() < eps / 2).to(grad.dtype)
        grad_z = grad * (z > threshold)
        grad_threshold = (grad * in_window * (-threshold / eps)).sum(0)
        return grad_z, grad_threshold, None


class _Step(torch.autograd.Function):
    """H(z − θ), straight-through ∂/∂θ = −(1/ε)·K((z − θ)/ε), no gradient to z (the L0 estimator)."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((z - threshold).abs() < eps / 2).to(grad.dtype)
        return None, (grad * in_window * (-1.0 / eps)).sum(0), None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(z, threshold, float(bandwidth))


def step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return _Step.apply(z, threshold, float(bandwidth))
