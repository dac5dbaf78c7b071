"""RowSparseAdam against torch's dense Adam (the reference) on the rows a gradient touches."""

import torch

from trainers.optim import RowSparseAdam


def _sparse(dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.sparse_coo_tensor(rows[None], dense[rows], dense.shape).coalesce()


def test_equals_adam_when_every_row_is_touched():
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(50, 8, generator=generator, dtype=torch.float64)
    dense, sparse = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    adam = torch.optim.Adam([dense], lr=1e-2, eps=1e-8)
    lazy = RowSparseAdam([sparse], lr=1e-2, eps=1e-8, chunk_rows=7)  # several chunks, a ragged last one
    for _ in range(5):
        grad = torch.randn(50, 8, generator=generator, dtype=torch.float64)
        dense.grad, sparse.grad = grad.clone(), _sparse(grad, torch.arange(50))
        adam.step()
        lazy.step()
    torch.testing.assert_close(sparse.detach(), dense.detach())
    torch.testing.assert_close(lazy.state[sparse]["exp_avg_sq"], adam.state[dense]["exp_avg_sq"])


def test_untouched_rows_keep_weights_and_moments():
    generator = torch.Generator().manual_seed(1)
    param = torch.nn.Parameter(torch.randn(20, 4, generator=generator))
    lazy = RowSparseAdam([param], lr=1e-2)
    param.grad = _sparse(torch.randn(20, 4, generator=generator), torch.arange(20))
    lazy.step()
    before, moment = param.detach().clone(), lazy.state[param]["exp_avg"].clone()
    touched = torch.tensor([3, 11])
    param.grad = _sparse(torch.randn(20, 4, generator=generator), touched)
    lazy.step()
    untouched = torch.ones(20, dtype=torch.bool).index_fill_(0, touched, False)
    assert torch.equal(param.detach()[untouched], before[untouched])
    assert torch.equal(lazy.state[param]["exp_avg"][untouched], moment[untouched])
    assert not torch.equal(param.detach()[touched], before[touched])
    assert lazy.state[param]["step"] == 2  # bias correction counts every step, touched or not


def test_dense_gradients_get_plain_adam():
    """The biases have dense gradients: one RowSparseAdam steps the whole dictionary, as DeepSpeed's client."""
    generator = torch.Generator().manual_seed(2)
    start = torch.randn(30, generator=generator, dtype=torch.float64)
    dense, ours = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    adam, lazy = torch.optim.Adam([dense], lr=1e-2, eps=1e-8), RowSparseAdam([ours], lr=1e-2, eps=1e-8)
    for _ in range(4):
        grad = torch.randn(30, generator=generator, dtype=torch.float64)
        dense.grad, ours.grad = grad.clone(), grad.clone()
        adam.step()
        lazy.step()
    torch.testing.assert_close(ours.detach(), dense.detach())
    assert float(lazy.state[ours]["step"]) == 4
