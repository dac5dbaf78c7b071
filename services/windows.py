"""Documents tokenized and packed into fixed context windows: what a model-backed producer runs the model on."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class TokenWindows:
    """Documents tokenized and packed into windows of `context_length` tokens, over `epochs` epochs (None: forever).

    Each window starts with BOS (when the tokenizer has one) and documents are separated by EOS; those
    positions carry no activation for the stream.
    """

    def __init__(self, tokenizer, documents: list[str], context_length: int, cycle: bool = True,
                 epochs: int | None = None):
        self.tokenizer = tokenizer
        self.documents = documents
        self.context_length = context_length
        self.epochs = epochs if epochs is not None else (None if cycle else 1)
        self.epoch = 0
        self.bos = tokenizer.bos_token_id
        self.separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.bos
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        body = self.context_length - (self.bos is not None)
        pending: list[int] = []
        self.epoch = 0
        while self.epochs is None or self.epoch < self.epochs:
            for doc in self.documents:
                pending.extend(self.tokenizer(doc, add_special_tokens=False)["input_ids"])
                if self.separator is not None:
                    pending.append(self.separator)
                while len(pending) >= body:
                    window, pending = pending[:body], pending[body:]
                    yield np.array(([self.bos] if self.bos is not None else []) + window, dtype=np.int64)
            self.epoch += 1

    def keep_mask(self, windows: np.ndarray) -> np.ndarray:
        """True where a position is a real token (not BOS/EOS/padding)."""
        return ~np.isin(windows, self.special_ids)
