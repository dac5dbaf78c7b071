"""Row mixing: a reservoir of the rows of the last `mix_batches` batches, so a trainer never sees one document's
tokens in a row.

Each new full batch takes the place of `batch_rows` rows drawn at random from the reservoir, and those rows
leave as the next batch; every row leaves exactly once (at the end of a finite stream `flush` hands out the
reservoir and the short last batch, shuffled). `state()` / `load()` carry the reservoir, the short batches and
the RNG through a checkpoint.
"""

from __future__ import annotations

import numpy as np


class Mixer:
    def __init__(self, mix_batches: int, batch_rows: int | None, seed: int):
        self.mix_batches = mix_batches
        self.batch_rows = batch_rows  # None until the first batch tells it
        self.rng = np.random.default_rng([seed, 7])
        self.reservoir: dict[str, np.ndarray] | None = None
        self.fill = 0  # rows in the reservoir
        self.leftovers: list[dict[str, np.ndarray]] = []  # short batches, handed out with the flush

    def mix(self, batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Swap the new batch into the reservoir; the rows it replaces are the batch handed out."""
        n = len(next(iter(batch.values())))
        if n != self.batch_rows:  # the short last batch of a finite stream: handed out with the flush
            self.leftovers.append({k: np.array(v) for k, v in batch.items()})
            return []
        size = self.mix_batches * n
        if self.reservoir is None:
            self.reservoir = {k: np.empty((size, *v.shape[1:]), dtype=v.dtype) for k, v in batch.items()}
        if self.fill < size:
            for k, v in batch.items():
                self.reservoir[k][self.fill:self.fill + n] = v
            self.fill += n
            return []
        slots = np.sort(self.rng.choice(size, n, replace=False))
        out = {}
        for k, v in batch.items():
            out[k] = self.reservoir[k][slots]
            self.reservoir[k][slots] = v
        return [out]

    def flush(self) -> list[dict[str, np.ndarray]]:
        """Everything held, shuffled, in batches of `batch_rows` (the last one shorter)."""
        parts = list(self.leftovers)
        if self.reservoir is not None and self.fill:
            parts.append({k: v[:self.fill] for k, v in self.reservoir.items()})
        self.reservoir, self.fill, self.leftovers = None, 0, []
        if not parts:
            return []
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        rows = len(next(iter(joined.values())))
        order = self.rng.permutation(rows)
        step = self.batch_rows or rows
        return [{k: v[order[i:i + step]] for k, v in joined.items()} for i in range(0, rows, step)]

    def fraction_full(self) -> float:
        size = self.mix_batches * (self.batch_rows or 0)
        return self.fill / size if size else 0.0

    def state(self) -> dict:
        """Copies of what the mixer holds and its RNG, for a checkpoint."""
        return {"reservoir": None if self.reservoir is None else
                {k: np.array(v[:self.fill]) for k, v in self.reservoir.items()},
                "reservoir_rows": 0 if self.reservoir is None else len(next(iter(self.reservoir.values()))),
                "leftovers": [{k: np.array(v) for k, v in b.items()} for b in self.leftovers],
                "rng": self.rng.bit_generator.state, "batch_rows": self.batch_rows}

    def load(self, state: dict) -> None:
        self.reservoir, self.fill = None, 0
        if state["reservoir"] is not None:
            saved = state["reservoir"]
            self.fill = len(next(iter(saved.values())))
            self.reservoir = {k: np.empty((state["reservoir_rows"], *v.shape[1:]), dtype=v.dtype)
                              for k, v in saved.items()}
            for k, v in saved.items():
                self.reservoir[k][:self.fill] = v
        self.leftovers = list(state["leftovers"])
        self.rng.bit_generator.state = state["rng"]
        self.batch_rows = state["batch_rows"] or self.batch_rows
