"""The layout of an activation batch, shared by everything that makes, moves or stores one.

Every batch is {hook name: [rows, d] in the stream dtype (float32; bf16 from a GPU, services.models.stream_dtype)}
plus TOKEN_IDS (int32 [rows]) and ROW_IDS (int64 [rows], the producer's index in the high bits and the row's
position in its stream in the low bits: unique across a job).
"""

from __future__ import annotations

import numpy as np

from api.jobspec import JobSpec

TOKEN_IDS = "token_ids"
ROW_IDS = "row_ids"
STREAM_KEYS = (TOKEN_IDS, ROW_IDS)
ROW_ID_BITS = 40  # 2**40 rows per producer before its ids would collide with the next producer's
HELD_OUT_PRODUCER = (1 << 23) - 1  # the producer bits of held-out row ids


def row_ids(producer: int, start: int, count: int) -> np.ndarray:
    return (np.int64(producer) << ROW_ID_BITS) + np.arange(start, start + count, dtype=np.int64)


def hook_names(spec: JobSpec) -> list[str]:
    return [hook.name for hook in spec.hooks()]
