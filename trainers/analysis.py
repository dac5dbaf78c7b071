"""What a trained dictionary learned, computed in one streaming pass and bounded memory whatever the token count.

Per latent (`LatentStatistics`, updated batch by batch with the sparse activations of every token):
- firing count, sum and max of its activation (frequency = count / tokens, mean = sum / count: over firings);
- the top-N activating positions, with the latent's activation over each one's context window;
- N "quantile" examples: a uniform sample of its firings without replacement (bottom-k sampling: every firing
  gets a deterministic pseudo-random key from its (position, latent), and the N firings with the largest keys
  are kept — the same streaming top-N as above, on keys instead of activations), shown sorted by activation,
  so example j sits at the j/N quantile of the latent's firing distribution;
- a histogram of its activation with `bins` (a power of two) bins over [0, 2^e): e grows with the latent's max,
  and when it grows by g the counts of 2^g neighbouring bins merge, which is exact (the bins nest).

Memory: per latent 2·N·(4 + 8 + 2·C) bytes for the examples (value, position, C context activations as float16),
bins·8 for the histogram and ~24 for the scalars — at 131,072 latents, N = 20, C = 32: ~0.75 GiB.

Per dictionary (`logit_effects`, `nearest_latents`): the top and bottom tokens of W_U · (norm weight ⊙ W_dec,i)
(the model's final norm taken as its elementwise weight, centred first for a LayerNorm; its division by the
RMS is left out, as in direct logit attribution), and each latent's nearest latents by decoder cosine —
chunked over latents; exact up to EXACT_NEIGHBOURS_LATENTS, above it against a fixed uniform sample of that
many latents (the method is returned with the result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trainers.kernels import _sort_threads

EXACT_NEIGHBOURS_LATENTS = 131_072
_M31 = (1 << 31) - 1


def sample_keys(positions: Tensor, latents: Tensor) -> Tensor:
    """A pseudo-random key in [0, 1) per (position, latent): deterministic, so a brute force can recompute it.
    31-bit multiply-xorshift rounds (products stay below 2^62: no int64 overflow on any device)."""
    h = ((positions & _M31) * 0x2545F491) & _M31
    h = ((h ^ (latents & _M31)) * 0x6C078965) & _M31
    h = h ^ (h >> 15)
    h = (h * 0x3C6EF372 + 0x1B873593) & _M31
    h = h ^ (h >> 13)
    return h.to(torch.float64).div(float(1 << 31)).to(torch.float32)


def group_ranks(groups: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """(order, rank): `order` sorts the entries by group, then by score descending; rank is each sorted entry's
    place within its group (0 = largest score)."""
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(groups[by_score], stable=True)]
    sorted_groups = groups[order]
    _, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=groups.device) - torch.repeat_interleave(starts, counts)
    return order, rank


@dataclass
class TopSlots:
    """The N best entries per latent by score, with their payload; slots are unordered (`sorted()` orders them).

    An entering entry takes the slot of the one it evicts, so a batch writes the contexts of the entries that
    enter only — never moving the [M, N, C] context block."""
    scores: Tensor  # [M, N] float32, -inf where empty
    values: Tensor  # [M, N] float32 activation
    positions: Tensor  # [M, N] int64 global token position, -1 where empty
    contexts: Tensor  # [M, N, C] float16 the latent's activation over the context window

    @classmethod
    def empty(cls, latents: int, n: int, context: int, device: torch.device | str) -> TopSlots:
        return cls(torch.full((latents, n), float("-inf"), device=device),
                   torch.zeros(latents, n, device=device),
                   torch.full((latents, n), -1, dtype=torch.long, device=device),
                   torch.zeros(latents, n, context, dtype=torch.float16, device=device))

    def candidates(self, latents: Tensor, scores: Tensor) -> Tensor:
        """Indices of the entries that can enter: above their latent's current lowest score, and among the N best
        of their latent in this batch."""
        n = self.scores.shape[1]
        better = torch.nonzero(scores > self.scores[latents].min(dim=1).values).squeeze(1)
        if better.numel() == 0:
            return better
        order, rank = group_ranks(latents[better], scores[better])
        return better[order[rank < n]]  # grouped by latent, by score descending within a latent: what merge takes

    def merge(self, latents: Tensor, scores: Tensor, values: Tensor, positions: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
        """Merge candidate entries — at most N per latent, grouped by latent and by score descending within one,
        as `candidates` returns them; returns (entered, rows, slots): the indices of the candidates that entered
        and the (latent, slot) each took, for their contexts."""
        n = self.scores.shape[1]
        empty = latents.new_zeros(0)
        if latents.numel() == 0:
            return empty, empty, empty
        touched, counts = torch.unique_consecutive(latents, return_counts=True)
        u = len(touched)
        row_of = torch.repeat_interleave(torch.arange(u, device=latents.device), counts)
        column = torch.arange(len(latents), device=latents.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)  # the entry's place among its latent's candidates
        new_scores = torch.full((u, n), float("-inf"), device=scores.device)
        new_scores[row_of, column] = scores
        candidate = torch.full((u, n), -1, dtype=torch.long, device=scores.device)
        candidate[row_of, column] = torch.arange(len(latents), device=scores.device)
        both = torch.cat([self.scores[touched], new_scores], 1)
        kept = torch.zeros_like(both, dtype=torch.bool).scatter_(1, both.topk(n, dim=1).indices, True)
        entering = kept[:, n:] & (candidate >= 0)
        evicted = ~kept[:, :n]  # as many per row as entering, or more (empty slots lost to empty candidates)
        enter_row, enter_col = torch.nonzero(entering, as_tuple=True)
        evict_row, evict_slot = torch.nonzero(evicted, as_tuple=True)
        enter_rank = torch.arange(len(enter_row), device=scores.device) - (
            torch.cumsum(entering.sum(1), 0) - entering.sum(1))[enter_row]
        evict_start = torch.cumsum(evicted.sum(1), 0) - evicted.sum(1)
        slot = evict_slot[evict_start[enter_row] + enter_rank]
        entered = candidate[enter_row, enter_col]
        rows = touched[enter_row]
        self.scores[rows, slot] = scores[entered]
        self.values[rows, slot] = values[entered]
        self.positions[rows, slot] = positions[entered]
        return entered, rows, slot

    def sorted(self) -> TopSlots:
        """The same entries, by score descending per latent (empty slots last)."""
        order = torch.argsort(self.scores, dim=1, descending=True, stable=True)
        c = self.contexts.shape[2]
        return TopSlots(self.scores.gather(1, order), self.values.gather(1, order), self.positions.gather(1, order),
                        self.contexts.gather(1, order[:, :, None].expand(-1, -1, c)))


class BatchLookup:
    """The activation of (token, latent) pairs of one batch, by binary search over its sorted firings."""

    def __init__(self, token: Tensor, latents: Tensor, acts: Tensor, num_latents: int, tokens: int, window: int):
        self.keys, order = (token * num_latents + latents).sort()
        self.acts = acts[order]
        self.num_latents, self.tokens, self.window = num_latents, tokens, window

    def contexts(self, flat: Tensor, latents: Tensor, before: int, after: int) -> Tensor:
        """[E, before + 1 + after]: latents[e]'s activation at the positions around flat[e] (its window only)."""
        if flat.numel() == 0 or self.keys.numel() == 0:
            return torch.zeros(len(flat), before + 1 + after, device=flat.device)
        where = flat[:, None] + torch.arange(-before, after + 1, device=flat.device)  # [E, C]
        inside = (where >= 0) & (where < self.tokens) & (
            where.div(self.window, rounding_mode="floor") == flat.div(self.window, rounding_mode="floor")[:, None])
        query = where.clamp(0, self.tokens - 1) * self.num_latents + latents[:, None]
        at = torch.searchsorted(self.keys, query).clamp_(max=len(self.keys) - 1)
        found = (self.keys[at] == query) & inside
        return torch.where(found, self.acts[at], torch.zeros((), device=flat.device))


class LatentStatistics:
    """Streaming per-latent statistics of one dictionary (see the module docstring)."""

    def __init__(self, latents: int, top_n: int = 20, before: int = 24, after: int = 8, bins: int = 32,
                 device: torch.device | str = "cpu", signed: bool = False):
        """`signed` (AbsTopK codes, either sign): a nonzero code is a firing; the top examples, the maximum and
        the histogram go by |activation|, the examples and the mean keep the sign."""
        if bins & (bins - 1) or bins < 2:
            raise ValueError(f"bins must be a power of two ≥ 2; got {bins}")
        self.latents, self.top_n, self.before, self.after, self.bins = latents, top_n, before, after, bins
        self.signed = signed
        context = before + 1 + after
        self.count = torch.zeros(latents, dtype=torch.long, device=device)
        self.total = torch.zeros(latents, dtype=torch.float64, device=device)
        self.max = torch.zeros(latents, device=device)
        self.top = TopSlots.empty(latents, top_n, context, device)
        self.sample = TopSlots.empty(latents, top_n, context, device)
        self.histogram = torch.zeros(latents, bins, dtype=torch.long, device=device)
        self.exponent = torch.full((latents,), -126, dtype=torch.int32, device=device)  # histogram over [0, 2^e)
        self.tokens = 0

    def bytes(self) -> int:
        tensors = [self.count, self.total, self.max, self.histogram, self.exponent,
                   *(t for slots in (self.top, self.sample) for t in vars(slots).values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def update(self, values: Tensor, indices: Tensor, first_position: int, window: int, keep: Tensor) -> None:
        """One batch: values / indices [T, k] (the sparse code of T = windows · window tokens, row-major; zero
        values are no firing), their global positions first_position + arange(T); `keep` [T] False at special
        tokens (BOS/EOS/padding), which neither count nor fire (their context activations show as 0).
        On CPU on one thread: the update is sorts, gathers and scatters of ~10⁵ entries, which torch runs far
        slower across busy threads (see trainers.kernels._sort_threads)."""
        with _sort_threads(values):
            self._update(values, indices, first_position, window, keep)

    def _update(self, values: Tensor, indices: Tensor, first_position: int, window: int, keep: Tensor) -> None:
        values = values.float() * keep[:, None]
        self.tokens += int(keep.sum())
        token, slot = torch.nonzero(values != 0 if self.signed else values > 0, as_tuple=True)
        latents, acts = indices[token, slot].long(), values[token, slot]
        if latents.numel() == 0:
            return
        magnitude = acts.abs() if self.signed else acts
        self.count.index_add_(0, latents, torch.ones_like(latents))
        self.total.index_add_(0, latents, acts.double())
        self.max.scatter_reduce_(0, latents, magnitude, reduce="amax")
        self._histogram(latents, magnitude)
        positions = token + first_position
        keys = sample_keys(positions, latents)
        lookup = BatchLookup(token, latents, acts, self.latents, len(values), window)
        for slots, scores in ((self.top, magnitude), (self.sample, keys)):
            chosen = slots.candidates(latents, scores)
            entered, rows, slot = slots.merge(latents[chosen], scores[chosen], acts[chosen], positions[chosen])
            entered = chosen[entered]
            slots.contexts[rows, slot] = lookup.contexts(token[entered], latents[entered], self.before,
                                                         self.after).to(torch.float16)

    def _histogram(self, latents: Tensor, acts: Tensor) -> None:
        _, exponents = torch.frexp(acts)  # acts < 2^exponent
        needed = self.exponent.clone().scatter_reduce_(0, latents, exponents.int(), reduce="amax")
        grow = torch.nonzero(needed > self.exponent).squeeze(1)
        if grow.numel():
            shift = (needed[grow] - self.exponent[grow]).clamp(max=62).long()
            target = torch.arange(self.bins, device=acts.device)[None] >> shift[:, None]
            merged = torch.zeros(len(grow), self.bins, dtype=torch.long, device=acts.device)
            self.histogram[grow] = merged.scatter_add_(1, target, self.histogram[grow])
            self.exponent[grow] = needed[grow]
        scale = self.exponent[latents] - (self.bins.bit_length() - 1)  # bin width 2^(e - log2 bins), exact
        bin_index = torch.ldexp(acts, -scale.float()).floor().long().clamp_(0, self.bins - 1)
        self.histogram.view(-1).index_add_(0, latents * self.bins + bin_index, torch.ones_like(bin_index))

    def histogram_upper(self) -> Tensor:
        """The upper edge 2^e of each latent's histogram (0 for a latent that never fired)."""
        return torch.where(self.count > 0, torch.ldexp(torch.ones_like(self.max), self.exponent.float()),
                           torch.zeros_like(self.max))

    def frequency(self) -> Tensor:
        return self.count.double() / max(self.tokens, 1)

    def mean(self) -> Tensor:
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1), torch.zeros_like(self.total))

    def top_examples(self) -> TopSlots:
        """The top-N firings, by activation (descending) per latent; empty slots (position -1) last."""
        return self.top.sorted()

    def quantile_examples(self) -> TopSlots:
        """The sampled firings, sorted by activation (descending; signed: by |activation|) per latent; empty
        slots last."""
        filled = self.sample.positions >= 0
        order_by = self.sample.values.abs() if self.signed else self.sample.values
        by_value = TopSlots(torch.where(filled, order_by, torch.full_like(self.sample.values, float("-inf"))),
                            self.sample.values, self.sample.positions, self.sample.contexts)
        return by_value.sorted()


def sparse_code(x: Tensor, tensors: dict[str, Tensor], architecture: str, k: int | None,
                chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """(values [N, k'], indices [N, k']) of an exported dictionary (SAELens tensors: W_enc [d, M]) on x [N, d].

    TopK: the kernels' chunked top-k (no N×M matrix). JumpReLU (BatchTopK is exported as JumpReLU) and ReLU
    ("standard"): chunked over latents, every firing kept; k' is the most firings of any row (zero-padded).
    """
    from trainers.kernels import topk_encode

    W_enc, b_enc, b_dec = tensors["W_enc"], tensors["b_enc"], tensors["b_dec"]
    # A transcoder's b_dec is in its output space: its encoder reads x itself (SAELens apply_b_dec_to_input false)
    centred = x.to(W_enc.dtype) - (0 if "transcoder" in architecture else b_dec)
    if architecture in ("topk", "abstopk"):
        values, indices, _, _ = topk_encode(centred, W_enc.T, b_enc, int(k), chunk=chunk,
                                            signed=architecture == "abstopk")
        return values, indices
    threshold = tensors.get("threshold")
    rows, cols, vals = [], [], []
    for start in range(0, W_enc.shape[1], chunk):
        pre = centred @ W_enc[:, start:start + chunk] + b_enc[start:start + chunk]
        fires = pre > (threshold[start:start + chunk] if threshold is not None else 0)
        r, c = torch.nonzero(fires, as_tuple=True)
        rows.append(r)
        cols.append(c + start)
        vals.append(pre[r, c])
    r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    width = int(torch.bincount(r, minlength=x.shape[0]).max()) if len(r) else 1
    order, rank = group_ranks(r, v)
    values = torch.zeros(x.shape[0], width, device=x.device)
    indices = torch.zeros(x.shape[0], width, dtype=torch.long, device=x.device)
    values[r[order], rank] = v[order]
    indices[r[order], rank] = c[order]
    return values, indices


@torch.no_grad()
def logit_effects(W_dec: Tensor, unembedding: Tensor, norm_weight: Tensor | None, centre: bool, top: int = 10,
                  chunk: int = 4096) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top_values, top_tokens, bottom_values, bottom_tokens), each [M, top], of W_U · (γ ⊙ W_dec,i)."""
    directions = W_dec.float()
    if centre:
        directions = directions - directions.mean(dim=1, keepdim=True)
    if norm_weight is not None:
        directions = directions * norm_weight.float()
    W_U = unembedding.float().to(directions.device)  # [V, d]
    top = min(top, W_U.shape[0])
    parts: list[list[Tensor]] = [[], [], [], []]
    for start in range(0, len(directions), chunk):
        effects = directions[start:start + chunk] @ W_U.T
        high, low = effects.topk(top, dim=1), effects.topk(top, dim=1, largest=False)
        for part, t in zip(parts, (high.values, high.indices, low.values, low.indices), strict=True):
            part.append(t)
    return tuple(torch.cat(p) for p in parts)  # type: ignore[return-value]


@torch.no_grad()
def nearest_latents(W_dec: Tensor, count: int = 10, chunk: int = 4096, exact_up_to: int = EXACT_NEIGHBOURS_LATENTS,
                    seed: int = 0) -> tuple[Tensor, Tensor, str]:
    """(cosines [M, count], indices [M, count], method): each latent's nearest others by decoder cosine."""
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    m = len(unit)
    if m <= exact_up_to:
        pool, method = torch.arange(m, device=unit.device), f"exact over all {m} latents"
    else:
        generator = torch.Generator().manual_seed(seed)
        pool = torch.randperm(m, generator=generator)[:exact_up_to].sort().values.to(unit.device)
        method = (f"sampled: nearest among a uniform sample of {exact_up_to} of the {m} latents "
                  f"(torch.randperm, seed {seed}); exact only for pairs inside the sample")
    count = min(count, len(pool) - 1) if len(pool) > 1 else 0
    candidates = unit[pool]
    cosines, indices = [], []
    for start in range(0, m, chunk):
        sims = unit[start:start + chunk] @ candidates.T
        rows = torch.arange(start, min(start + chunk, m), device=unit.device)
        sims[pool[None, :] == rows[:, None]] = float("-inf")  # never a latent's own neighbour
        best = sims.topk(count, dim=1)
        cosines.append(best.values)
        indices.append(pool[best.indices])
    return torch.cat(cosines), torch.cat(indices), method
