"""bf16 activation arrays between torch and numpy: exact, at half the bytes, without copies, and into caches."""

import numpy as np
import torch

from storage.arrays import BFLOAT16, to_numpy, to_torch
from storage.cache import ActivationCache, CacheWriter


def test_bf16_round_trip_is_exact_and_shares_memory():
    x = torch.randn(64, 16).bfloat16()
    array = to_numpy(x)
    assert array.dtype == BFLOAT16 and array.nbytes == x.numel() * 2
    back = to_torch(array)
    assert back.dtype == torch.bfloat16 and torch.equal(back, x)
    assert back.data_ptr() == x.data_ptr()  # one buffer all the way
    np.testing.assert_array_equal(array.astype(np.float32), x.float().numpy())


def test_mixing_rows_keeps_the_width():
    """The buffer's reservoir: np.empty of the batch dtype, rows indexed in and out."""
    a, b = to_numpy(torch.randn(8, 4).bfloat16()), to_numpy(torch.randn(8, 4).bfloat16())
    pool = np.empty((16, 4), dtype=a.dtype)
    pool[:8], pool[8:] = a, b
    picked = pool[np.array([3, 12, 0])]
    assert picked.dtype == BFLOAT16
    torch.testing.assert_close(to_torch(picked), torch.cat([to_torch(a)[[3]], to_torch(b)[[4]], to_torch(a)[[0]]]))


def test_float32_arrays_pass_through():
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    assert to_torch(x).dtype == torch.float32 and to_torch(x).data_ptr() == x.ctypes.data
    np.testing.assert_array_equal(to_numpy(torch.from_numpy(x)), x)


def test_a_bf16_stream_goes_into_a_bf16_cache_losslessly(tmp_path):
    hook = "blocks.0.hook_resid_post"
    base = {"model": "m", "num_layers": 1, "d": 8, "hooks": [{"name": hook, "layer": 0, "site": "resid_post"}]}
    x = to_numpy(torch.randn(40, 8).bfloat16())
    writer = CacheWriter(str(tmp_path / "c"), base, [hook], 100, dtype="bfloat16")
    writer.add({hook: x})
    writer.close()
    np.testing.assert_array_equal(ActivationCache(str(tmp_path / "c")).shard(0)[hook], x.astype(np.float32))
