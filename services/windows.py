"""Documents tokenized and packed into fixed context windows: what a model-backed producer runs the model on.

Each window starts with BOS (when the tokenizer has one) and documents are separated by EOS; those positions
carry no activation for the stream. `CorpusWindows` packs a producer's pieces of the corpus as they are read,
and gives every window the `Cursor` of its first token, so a stream restarts at any window by reading from that
document of that piece on — never what came before it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from api.jobspec import DataSpec
from services.data import Piece, is_held_out, read_piece


@dataclass(frozen=True)
class Cursor:
    """Where a window starts: token `token` of document `doc` of the `piece`-th piece of `epoch`'s order, after
    `row` kept rows (real tokens) of the stream."""

    epoch: int = 0
    piece: int = 0
    doc: int = 0
    token: int = 0
    row: int = 0


class Packer:
    """Tokenizes documents and cuts the token stream into windows; knows which positions are special."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.bos = tokenizer.bos_token_id
        self.separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.bos
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)

    def tokens(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + ([self.separator] if self.separator is not None else [])

    def pack(self, documents: Iterable[tuple[tuple, list[int], int]]) -> Iterator[tuple[tuple, int, np.ndarray]]:
        """(where, first token, window) for documents given as (where, tokens, index of the first token used);
        a window's `where` and first token are those of its first body token. The last partial window is dropped."""
        body = self.context_length - (self.bos is not None)
        head = [self.bos] if self.bos is not None else []
        pending: list[int] = []
        origins: collections.deque = collections.deque()  # [where, first token, tokens left] behind `pending`
        for where, tokens, first in documents:
            if first >= len(tokens):
                continue
            pending.extend(tokens[first:])
            origins.append([where, first, len(tokens) - first])
            while len(pending) >= body:
                where0, token0 = origins[0][0], origins[0][1]
                window, pending = pending[:body], pending[body:]
                used = body
                while used:
                    take = min(used, origins[0][2])
                    origins[0][1] += take
                    origins[0][2] -= take
                    used -= take
                    if not origins[0][2]:
                        origins.popleft()
                yield where0, token0, np.array(head + window, dtype=np.int64)

    def keep_mask(self, windows: np.ndarray) -> np.ndarray:
        """True where a position is a real token (not BOS/EOS/padding)."""
        return ~np.isin(windows, self.special_ids)


class TokenWindows(Packer):
    """A list of documents packed into windows, over `epochs` epochs (None: forever)."""

    def __init__(self, tokenizer, documents: Iterable[str], context_length: int, cycle: bool = True,
                 epochs: int | None = None):
        super().__init__(tokenizer, context_length)
        self.documents = documents
        self.epochs = epochs if epochs is not None else (None if cycle else 1)
        self.epoch = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        def documents():
            self.epoch = 0
            while self.epochs is None or self.epoch < self.epochs:
                for index, doc in enumerate(self.documents):
                    yield (self.epoch, index), self.tokens(doc), 0
                self.epoch += 1

        for _, _, window in self.pack(documents()):
            yield window


class CorpusWindows(Packer):
    """A producer's pieces of the corpus, read piece by piece, training documents only, packed into windows over
    `epochs` epochs (None: forever). Epoch 0 reads the pieces in corpus order; later epochs in an order shuffled
    by (seed, producer, epoch)."""

    def __init__(self, tokenizer, data: DataSpec, pieces: list[Piece], seed: int, producer: int,
                 epochs: int | None):
        super().__init__(tokenizer, data.context_length)
        self.data = data
        self.pieces = pieces
        self.seed = seed
        self.producer = producer
        self.epochs = epochs
        self.epoch = 0  # the epoch of the latest window

    def order(self, epoch: int) -> list[int]:
        if epoch == 0:
            return list(range(len(self.pieces)))
        return np.random.default_rng([self.seed, self.producer, epoch]).permutation(len(self.pieces)).tolist()

    def _documents(self, start: Cursor) -> Iterator[tuple[tuple, list[int], int]]:
        epoch = start.epoch
        while self.epochs is None or epoch < self.epochs:
            order = self.order(epoch)
            for ordinal in range(start.piece if epoch == start.epoch else 0, len(order)):
                piece = self.pieces[order[ordinal]]
                resuming = (epoch, ordinal) == (start.epoch, start.piece)
                first = start.doc if resuming else 0
                for index, text in enumerate(read_piece(piece, self.data.text_field, first), first):
                    if not text or is_held_out(piece, index, self.data.holdout_fraction, self.seed):
                        continue
                    skip = start.token if resuming and index == start.doc else 0
                    yield (epoch, ordinal, index), self.tokens(text), skip
            epoch += 1

    def windows(self, start: Cursor | None = None) -> Iterator[tuple[Cursor, np.ndarray]]:
        """(cursor, window) from `start` (default: the beginning) to the end of the last epoch."""
        start = start or Cursor()
        row = start.row
        for (epoch, ordinal, doc), token, window in self.pack(self._documents(start)):
            self.epoch = epoch
            yield Cursor(epoch, ordinal, doc, token, row), window
            row += int(self.keep_mask(window).sum())
