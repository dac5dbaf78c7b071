"""ActivationProducer: a Ray actor that turns its slice of the corpus into activation batches.

It loads the model cut at the deepest hooked layer, packs tokenized documents into fixed context windows,
runs the forward pass, captures every hooked site in that one pass, drops special tokens (BOS, EOS,
padding) and returns batches of exactly `batch_tokens` rows as numpy arrays: the caller owns the result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import ray
import torch

from api.jobspec import JobSpec
from services.data import load_documents, producer_slice, split_documents
from services.models import capture, load_language_model, run_blocks


class TokenWindows:
    """Documents tokenized and packed into windows of `context_length` tokens, cycling over epochs.

    Each window starts with BOS (when the tokenizer has one) and documents are separated by EOS; those
    positions carry no activation for the stream.
    """

    def __init__(self, tokenizer, documents: list[str], context_length: int, cycle: bool = True):
        self.tokenizer = tokenizer
        self.documents = documents
        self.context_length = context_length
        self.cycle = cycle
        self.epoch = 0
        self.bos = tokenizer.bos_token_id
        self.separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.bos
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        body = self.context_length - (self.bos is not None)
        pending: list[int] = []
        while True:
            for doc in self.documents:
                pending.extend(self.tokenizer(doc, add_special_tokens=False)["input_ids"])
                if self.separator is not None:
                    pending.append(self.separator)
                while len(pending) >= body:
                    window, pending = pending[:body], pending[body:]
                    yield np.array(([self.bos] if self.bos is not None else []) + window, dtype=np.int64)
            self.epoch += 1
            if not self.cycle:
                return

    def keep_mask(self, windows: np.ndarray) -> np.ndarray:
        """True where a position is a real token (not BOS/EOS/padding)."""
        return ~np.isin(windows, self.special_ids)


class ActivationProducer:
    def __init__(self, spec_json: str, producer_index: int = 0, producers: int = 1):
        self.spec = JobSpec.model_validate_json(spec_json)
        self.hooks = self.spec.hooks()
        deepest = max(hook.layer for hook in self.hooks)
        use_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids()) if ray.is_initialized() else False
        self.lm = load_language_model(self.spec.model, keep_layers=deepest + 1,
                                      device="cuda" if use_gpu else "cpu")
        documents = load_documents(self.spec.data)
        train, held_out = split_documents(documents, self.spec.data.holdout_fraction, self.spec.training.seed)
        mine = producer_slice(train, producer_index, producers)
        if not mine:
            raise ValueError(f"cluster.producers ({producers}): producer {producer_index} gets no document of the "
                             f"{len(train)} training documents; use fewer producers or more data")
        self.train_windows = TokenWindows(self.lm.tokenizer, [documents[i] for i in mine],
                                          self.spec.data.context_length)
        self.held_out_windows = TokenWindows(self.lm.tokenizer, [documents[i] for i in held_out],
                                             self.spec.data.context_length, cycle=False)
        self.documents = len(mine)
        self._windows = iter(self.train_windows)
        self._carry: dict[str, list[np.ndarray]] = {hook.name: [] for hook in self.hooks}
        self._carry_rows = 0
        self.batches = 0
        self.tokens_forwarded = 0
        self.forward_seconds = 0.0

    def info(self) -> dict:
        return {"num_layers": self.lm.num_layers, "kept_layers": self.lm.kept_layers, "d_model": self.lm.d_model,
                "hooks": [hook.name for hook in self.hooks], "documents": self.documents,
                "device": str(self.lm.device)}

    def _forward(self, windows: np.ndarray, keep: np.ndarray) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        with torch.inference_mode(), capture(self.lm.model, self.hooks) as captured:
            run_blocks(self.lm, torch.from_numpy(windows))
        mask = torch.from_numpy(keep).to(self.lm.device)
        rows = {name: acts[mask].float().cpu().numpy() for name, acts in captured.items()}
        self.forward_seconds += time.perf_counter() - started
        self.tokens_forwarded += windows.size
        return rows

    def _batch_from(self, windows_iter: Iterator[np.ndarray], rows_wanted: int, allow_short: bool
                    ) -> dict[str, np.ndarray] | None:
        per_forward = max(1, self.spec.training.batch_tokens // self.spec.data.context_length)
        while self._carry_rows < rows_wanted:
            group = [w for _, w in zip(range(per_forward), windows_iter, strict=False)]
            if not group:
                if allow_short and self._carry_rows:
                    break
                return None
            windows = np.stack(group)
            rows = self._forward(windows, self.train_windows.keep_mask(windows))
            for name, array in rows.items():
                self._carry[name].append(array)
            self._carry_rows += len(next(iter(rows.values())))
        batch = {}
        for name, parts in self._carry.items():
            joined = np.concatenate(parts)
            batch[name], rest = joined[:rows_wanted], joined[rows_wanted:]
            self._carry[name] = [rest] if len(rest) else []
        self._carry_rows = max(self._carry_rows - rows_wanted, 0)
        return batch

    @ray.method(num_returns=2)
    def next_batch(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(metadata, {hook name: float32 array [batch_tokens, d]}): two returns, so a buffer can read the
        small metadata without fetching the arrays."""
        batch = self._batch_from(self._windows, self.spec.training.batch_tokens, allow_short=False)
        self.batches += 1
        meta = {"tokens": self.spec.training.batch_tokens, "batch": self.batches,
                "epoch": self.train_windows.epoch, "forward_seconds": self.forward_seconds,
                "tokens_forwarded": self.tokens_forwarded}
        return meta, batch

    def held_out_batch(self, tokens: int) -> dict[str, np.ndarray] | None:
        """Activations of up to `tokens` tokens of held-out documents (never in the training stream)."""
        saved_carry, saved_rows = self._carry, self._carry_rows
        self._carry, self._carry_rows = {hook.name: [] for hook in self.hooks}, 0
        try:
            return self._batch_from(iter(self.held_out_windows), tokens, allow_short=True)
        finally:
            self._carry, self._carry_rows = saved_carry, saved_rows
