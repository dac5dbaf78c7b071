"""Activation arrays between torch and numpy at their own width: float32, float16 and bfloat16.

numpy has no bfloat16 of its own; ml_dtypes gives it one, so a bf16 batch travels through the object store,
the buffer's mixing and the caches as a self-describing numpy array of half the bytes of float32. Both
directions share memory with their input (no copy) where it is on the CPU already.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy array of the tensor, bf16 included (as ml_dtypes.bfloat16)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory, bf16 included; read-only arrays (the object store) are not written."""
    if array.dtype == BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
