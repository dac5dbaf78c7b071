"""ActivationProducer: a Ray actor that turns its slice of the corpus into activation batches with the model.

It loads the model cut at the deepest hooked layer (on the GPU when its Ray resources hold one, in the spec's
dtype), packs tokenized documents into fixed context windows (services/windows.py), runs the forward pass,
captures every hooked site in that one pass, drops special tokens (BOS, EOS, padding) and returns batches of
`batch_tokens` rows (services/rows.py) as numpy arrays: the caller owns the result.

A producer's stream is deterministic, and `next_batch(offset)` returns the rows from that position on: a
producer restarted by Ray (it loses its state) seeks to the offset its caller asks for, so a job neither loses
nor repeats rows when a producer dies. Every batch's metadata carries the `Cursor` of a window at or before its
end; given back with the offset, it lets a restarted producer start reading at that window's document instead of
at the beginning of its pieces.
"""

from __future__ import annotations

import collections
import time
from dataclasses import asdict

import numpy as np
import ray
import torch

from api.jobspec import JobSpec
from services.data import corpus_fingerprint, corpus_pieces, documents, known_documents, producer_pieces
from services.models import capture, load_language_model, run_blocks, stream_dtype
from services.remote_code import check_remote_code
from services.rows import HELD_OUT_PRODUCER, ROW_IDS, TOKEN_IDS, row_ids
from services.windows import CorpusWindows, Cursor, TokenWindows
from storage.arrays import to_numpy


def producer_device() -> str:
    """'cuda' when this process may use a GPU (inside a Ray actor: only when Ray gave it one), else 'cpu'."""
    if not torch.cuda.is_available():
        return "cpu"
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return "cuda" if ray.get_gpu_ids() else "cpu"
    return "cuda"


class ActivationProducer:
    def __init__(self, spec_json: str, producer_index: int = 0, producers: int = 1, epochs: int | None = None):
        self.spec = JobSpec.model_validate_json(spec_json)
        check_remote_code(self.spec.model)
        self.index = producer_index
        self.hooks = self.spec.hooks()
        deepest = max(hook.layer for hook in self.hooks)
        started = time.perf_counter()
        # A producer given several GPUs spreads the kept blocks over them; it never loads the LM head.
        self.lm = load_language_model(self.spec.model, keep_layers=deepest + 1, device=producer_device(),
                                      gpus=len(ray.get_gpu_ids()) if ray.is_initialized() else 1, lm_head=False)
        self.stream_dtype = stream_dtype(self.spec, self.lm.device)  # bf16 on a GPU: half the bytes downstream
        self.model_load_s = time.perf_counter() - started
        pieces = corpus_pieces(self.spec.data)  # a list of files / row groups / ranges: nothing read yet
        self.corpus_list_s = time.perf_counter() - started - self.model_load_s
        self.fingerprint = corpus_fingerprint(pieces)
        self.corpus_documents = known_documents(pieces)
        self.corpus_pieces = pieces
        mine = producer_pieces(pieces, producer_index, producers)
        self.train_windows = CorpusWindows(self.lm.tokenizer, self.spec.data, mine, self.spec.training.seed,
                                           producer_index, epochs)
        self.pieces = len(mine)
        self.batches = 0
        self.tokens_forwarded = 0
        self.forward_seconds = 0.0
        self.seeks = 0
        self._restart_stream()

    def _restart_stream(self, cursor: Cursor | None = None) -> None:
        cursor = cursor or Cursor()
        self._windows = self.train_windows.windows(cursor)
        self._carry: dict[str, list[np.ndarray]] = {}
        self._carry_rows = 0
        self._rows_forwarded = cursor.row  # kept rows of the stream that went through the model (or were skipped)
        self._cursors: collections.deque = collections.deque([cursor])  # starts of windows not yet handed out
        self.position = cursor.row  # rows of the stream handed out

    def info(self) -> dict:
        return {"num_layers": self.lm.num_layers, "kept_layers": self.lm.kept_layers, "d_model": self.lm.d_model,
                "hooks": [hook.name for hook in self.hooks], "pieces": self.pieces,
                "corpus_pieces": len(self.corpus_pieces), "corpus_documents": self.corpus_documents,
                "model_load_s": self.model_load_s, "corpus_list_s": self.corpus_list_s,
                "device": str(self.lm.device), "dtype": self.spec.model.dtype, "model": self.spec.model.label,
                "corpus_fingerprint": self.fingerprint}

    def _forward(self, windows: np.ndarray, keep: np.ndarray, producer: int, first_row: int
                 ) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        device = self.lm.device
        ids = torch.from_numpy(windows)
        if device.type == "cuda":
            ids = ids.pin_memory().to(device, non_blocking=True)
        with torch.inference_mode(), capture(self.lm.model, self.hooks) as captured:
            run_blocks(self.lm, ids)
            mask = torch.from_numpy(keep).to(device)
            rows = {name: to_numpy(acts[mask].to(self.stream_dtype)) for name, acts in captured.items()}
        kept = int(keep.sum())
        rows[TOKEN_IDS] = windows[keep].astype(np.int32)
        rows[ROW_IDS] = row_ids(producer, first_row, kept)
        self.forward_seconds += time.perf_counter() - started
        self.tokens_forwarded += windows.size
        return rows

    def _take(self, rows_wanted: int) -> dict[str, np.ndarray]:
        batch = {}
        for name, parts in self._carry.items():
            joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
            batch[name], rest = joined[:rows_wanted], joined[rows_wanted:]
            self._carry[name] = [rest] if len(rest) else []
        self._carry_rows -= len(next(iter(batch.values())))
        return batch

    def _fill(self, rows_wanted: int) -> None:
        """Forward windows until the carry holds rows_wanted rows (or the stream ends)."""
        per_forward = max(1, self.spec.training.batch_tokens // self.spec.data.context_length)
        while self._carry_rows < rows_wanted:
            group = [w for _, w in zip(range(per_forward), self._windows, strict=False)]
            if not group:
                return
            self._cursors.extend(cursor for cursor, _ in group)
            windows = np.stack([window for _, window in group])
            rows = self._forward(windows, self.train_windows.keep_mask(windows), self.index, self._rows_forwarded)
            self._add(rows)

    def _add(self, rows: dict[str, np.ndarray]) -> None:
        count = len(rows[ROW_IDS])
        for name, array in rows.items():
            self._carry.setdefault(name, []).append(array)
        self._carry_rows += count
        self._rows_forwarded += count

    def _seek(self, offset: int, cursor: Cursor | None) -> None:
        """Position the stream at row `offset`, reading from `cursor` (a window start at or before it) or from
        the beginning: windows before `offset` are tokenized but not run through the model."""
        self.seeks += 1
        self._restart_stream(cursor if cursor is not None and cursor.row <= offset else None)
        for start, window in self._windows:
            self._cursors = collections.deque([start])
            keep = self.train_windows.keep_mask(window[None])
            kept = int(keep.sum())
            if self._rows_forwarded + kept <= offset:
                self._rows_forwarded += kept
                continue
            rows = self._forward(window[None], keep, self.index, self._rows_forwarded)
            drop = offset - self._rows_forwarded
            self._add({k: v[drop:] for k, v in rows.items()})
            self._rows_forwarded += drop  # _add counted the rows after the boundary only
            break
        self.position = offset

    @ray.method(num_returns=2)
    def next_batch(self, offset: int | None = None, cursor: dict | None = None
                   ) -> tuple[dict, dict[str, np.ndarray]]:
        """(metadata, {key: array with `batch_tokens` rows}) from row `offset` of this producer's stream (default:
        where the last call ended); two returns, so a buffer can read the small metadata without the arrays.
        `cursor`: a meta["cursor"] of an earlier batch at or before `offset`, where a seek starts reading.
        At the end of a finite stream the batch is short, and empty with meta["end"] once nothing is left."""
        if offset is not None and offset != self.position:
            self._seek(offset, Cursor(**cursor) if cursor else None)
        wanted = self.spec.training.batch_tokens
        self._fill(wanted)
        batch = self._take(min(wanted, self._carry_rows)) if self._carry_rows else {}
        rows = len(batch[ROW_IDS]) if batch else 0
        start = self.position
        self.position += rows
        self.batches += 1
        while len(self._cursors) > 1 and self._cursors[1].row <= self.position:
            self._cursors.popleft()  # keep the start of the window that holds row `position`
        meta = {"tokens": rows, "offset": start, "end": rows < wanted, "producer": self.index,
                "cursor": asdict(self._cursors[0]),
                "batch": self.batches, "epoch": self.train_windows.epoch, "forward_seconds": self.forward_seconds,
                "tokens_forwarded": self.tokens_forwarded, "seeks": self.seeks}
        return meta, batch

    def held_out_batch(self, tokens: int) -> dict[str, np.ndarray] | None:
        """Activations of up to `tokens` tokens of held-out documents (never in the training stream)."""
        parts: dict[str, list[np.ndarray]] = {}
        have = 0
        # read lazily from the start of the corpus until enough held-out documents are found
        held_out = TokenWindows(self.lm.tokenizer, documents(self.spec.data, self.spec.training.seed,
                                                             self.corpus_pieces, held_out=True),
                                self.spec.data.context_length, epochs=1)
        windows = iter(held_out)
        per_forward = max(1, self.spec.training.batch_tokens // self.spec.data.context_length)
        while have < tokens:
            group = [w for _, w in zip(range(per_forward), windows, strict=False)]
            if not group:
                break
            stacked = np.stack(group)
            rows = self._forward(stacked, held_out.keep_mask(stacked), HELD_OUT_PRODUCER, have)
            for name, array in rows.items():
                parts.setdefault(name, []).append(array)
            have += len(rows[ROW_IDS])
        if not have:
            return None
        return {name: np.concatenate(arrays)[:tokens] for name, arrays in parts.items()}
