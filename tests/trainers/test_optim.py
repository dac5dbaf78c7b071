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


def test_clipping_equals_clip_grad_norm_then_adam():
    """max_grad_norm: the global norm over sparse and dense gradients, applied as torch's clip_grad_norm_ would."""
    generator = torch.Generator().manual_seed(3)
    weights, bias = torch.randn(40, 6, generator=generator, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    dense = [torch.nn.Parameter(weights.clone()), torch.nn.Parameter(bias.clone())]
    ours = [torch.nn.Parameter(weights.clone()), torch.nn.Parameter(bias.clone())]
    adam = torch.optim.Adam(dense, lr=1e-2, eps=1e-8)
    lazy = RowSparseAdam(ours, lr=1e-2, eps=1e-8, chunk_rows=9, max_grad_norm=0.5)
    for step in range(4):
        grads = [torch.randn(40, 6, generator=generator, dtype=torch.float64) * (step + 1),
                 torch.randn(6, generator=generator, dtype=torch.float64)]
        dense[0].grad, dense[1].grad = grads[0].clone(), grads[1].clone()
        ours[0].grad, ours[1].grad = _sparse(grads[0], torch.arange(40)), grads[1].clone()
        norm = torch.nn.utils.clip_grad_norm_(dense, 0.5)
        adam.step()
        lazy.step()
        assert abs(lazy._global_grad_norm - float(norm)) < 1e-9 * float(norm)
    for mine, reference in zip(ours, dense, strict=True):
        torch.testing.assert_close(mine.detach(), reference.detach())


def test_no_clipping_below_the_norm():
    param = torch.nn.Parameter(torch.ones(5, 3))
    lazy = RowSparseAdam([param], lr=1e-2, max_grad_norm=100.0)
    param.grad = _sparse(torch.full((5, 3), 0.1), torch.tensor([1, 4]))
    assert lazy._clip_scale({param: (torch.tensor([1, 4]), torch.full((2, 3), 0.1))}) is None
    lazy.step()
    assert lazy._global_grad_norm < 100
