"""The sparse kernels against dense references: values, gradients, gradcheck in float64."""

import pytest
import torch

from trainers.kernels import bag_decode, jumprelu, sparse_decode, step, topk_blockwise, topk_encode


def dense_topk(x, W, b, k):
    pre = x @ W.T + b
    values, indices = torch.relu(pre).topk(k, dim=1)
    return values, indices, pre


@pytest.mark.parametrize("n,c,k", [(5, 4096, 7), (3, 40, 5), (4, 1000, 3), (2, 8, 8)])
def test_topk_blockwise_matches_topk(n, c, k):
    torch.manual_seed(0)
    values = torch.randn(n, c)
    got_v, got_i = topk_blockwise(values, k)
    ref_v, _ = values.topk(k, dim=1)
    assert torch.equal(got_v.sort(dim=1).values, ref_v.sort(dim=1).values)
    assert torch.equal(values.gather(1, got_i), got_v)


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_topk_encode_forward_matches_dense(chunk):
    torch.manual_seed(1)
    x, W, b = torch.randn(9, 6), torch.randn(50, 6), torch.randn(50)
    acts, idx, aux_acts, aux_idx = topk_encode(x, W, b, 4, chunk=chunk)
    ref_v, ref_i, _ = dense_topk(x, W, b, 4)
    order = acts.argsort(dim=1, descending=True)
    assert torch.allclose(acts.gather(1, order), ref_v, atol=1e-6)
    assert torch.equal(idx.gather(1, order), ref_i)
    assert aux_acts.shape == (9, 0) and aux_idx.shape == (9, 0)


def test_topk_encode_aux_picks_top_dead_latents():
    torch.manual_seed(2)
    x, W, b = torch.randn(9, 6), torch.randn(50, 6), torch.randn(50)
    dead = torch.zeros(50, dtype=torch.bool)
    dead[torch.tensor([1, 5, 6, 17, 30, 31, 49])] = True
    _, _, aux_acts, aux_idx = topk_encode(x, W, b, 4, chunk=16, dead_mask=dead, k_aux=3)
    pre = x @ W.T + b
    ref = torch.relu(pre.masked_fill(~dead, -torch.inf)).topk(3, dim=1).values
    assert torch.allclose(aux_acts.sort(dim=1, descending=True).values, ref, atol=1e-6)
    assert bool(dead[aux_idx].all())


@pytest.mark.parametrize("sparse_grads", [False, True])
def test_topk_encode_gradients_match_dense(sparse_grads):
    torch.manual_seed(3)
    x = torch.randn(8, 5, requires_grad=True)
    W = torch.randn(40, 5, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    dead = torch.rand(40) < 0.5
    acts, idx, aux_acts, aux_idx = topk_encode(x, W, b, 3, chunk=16, dead_mask=dead, k_aux=4,
                                               sparse_grads=sparse_grads)
    g1, g2 = torch.randn_like(acts), torch.randn_like(aux_acts)
    ((acts * g1).sum() + (aux_acts * g2).sum()).backward()
    got = [x.grad.clone(), W.grad.to_dense().clone(), b.grad.clone()]
    x.grad = W.grad = b.grad = None
    pre = x @ W.T + b
    ref = (torch.relu(pre).gather(1, idx) * g1).sum() + (torch.relu(pre).gather(1, aux_idx) * g2).sum()
    ref.backward()
    for g, r in zip(got, [x.grad, W.grad, b.grad], strict=True):
        assert torch.allclose(g, r, atol=1e-5)
    if sparse_grads:
        assert W.grad is not None


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_signed_topk_encode_selects_by_magnitude_and_keeps_the_sign(chunk):
    """AbsTopK: the top k of |pre| (and of |pre| among dead latents), signed values; gradients as dense."""
    torch.manual_seed(6)
    x = torch.randn(9, 6, requires_grad=True)
    W = torch.randn(50, 6, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    dead = torch.rand(50) < 0.4
    acts, idx, aux_acts, aux_idx = topk_encode(x, W, b, 4, chunk=chunk, dead_mask=dead, k_aux=3, signed=True)
    pre = x @ W.T + b
    ref_i = pre.abs().topk(4, dim=1).indices
    assert torch.equal(idx.sort(dim=1).values, ref_i.sort(dim=1).values)
    torch.testing.assert_close(acts, pre.gather(1, idx))
    assert bool((acts < 0).any())
    ref_aux = pre.abs().masked_fill(~dead, -1.0).topk(3, dim=1).indices
    assert torch.equal(aux_idx.sort(dim=1).values, ref_aux.sort(dim=1).values)
    torch.testing.assert_close(aux_acts, pre.gather(1, aux_idx))
    g1, g2 = torch.randn_like(acts), torch.randn_like(aux_acts)
    ((acts * g1).sum() + (aux_acts * g2).sum()).backward()
    got = [x.grad.clone(), W.grad.clone(), b.grad.clone()]
    x.grad = W.grad = b.grad = None
    pre = x @ W.T + b
    ((pre.gather(1, idx) * g1).sum() + (pre.gather(1, aux_idx) * g2).sum()).backward()
    for g, r in zip(got, [x.grad, W.grad, b.grad], strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_topk_encode_gradcheck_float64():
    torch.manual_seed(4)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    dead = torch.arange(12) % 3 == 0

    def f(x, W, b):
        acts, _, aux, _ = topk_encode(x, W, b, 2, chunk=5, dead_mask=dead, k_aux=2)
        return acts, aux

    assert torch.autograd.gradcheck(f, (x, W, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("sparse_grads", [False, True])
def test_bag_decode_matches_dense(sparse_grads):
    """Bags of varying size (some empty), entries sorted by bag: values and gradients as dense products."""
    torch.manual_seed(7)
    W = (torch.randn(30, 6) * 3).requires_grad_(True)
    bag = torch.sort(torch.randint(0, 9, (25,))).values  # 9 bags, some empty
    idx = torch.randint(0, 30, (25,))
    acts = torch.randn(25, requires_grad=True)
    out = bag_decode(acts, idx, bag, 10, W, sparse_grads=sparse_grads)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    got_a, got_W = acts.grad.clone(), (W.grad.to_dense() if W.grad.is_sparse else W.grad).clone()
    assert W.grad.is_sparse == sparse_grads
    acts.grad = W.grad = None
    dense = torch.zeros(10, 30).index_put_((bag, idx), acts, accumulate=True)
    ref = dense @ (W / W.norm(dim=1, keepdim=True))
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_a, acts.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_W, W.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_sparse_decode_matches_dense(normalize):
    torch.manual_seed(5)
    W = (torch.randn(30, 6) * 3).requires_grad_(True)
    idx = torch.randint(0, 30, (7, 4))
    acts = torch.rand(7, 4, requires_grad=True)
    out = sparse_decode(acts, idx, W, normalize=normalize)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    got_a, got_W = acts.grad.clone(), W.grad.clone()
    acts.grad = W.grad = None
    directions = W / W.norm(dim=1, keepdim=True) if normalize else W
    dense = torch.zeros(7, 30).scatter_add(1, idx, acts)
    ref = dense @ directions
    (ref * g).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(got_a, acts.grad, atol=1e-5)
    assert torch.allclose(got_W, W.grad, atol=1e-5)


def test_sparse_decode_gradient_is_orthogonal_to_rows_and_sparse_mode_agrees():
    torch.manual_seed(6)
    W = torch.randn(30, 6, requires_grad=True)
    idx, acts = torch.randint(0, 30, (7, 4)), torch.rand(7, 4)
    sparse_decode(acts, idx, W).pow(2).sum().backward()
    dense_grad = W.grad.clone()
    assert torch.allclose((dense_grad * W.detach()).sum(1), torch.zeros(30), atol=1e-5)
    W.grad = None
    sparse_decode(acts, idx, W, sparse_grads=True).pow(2).sum().backward()
    assert W.grad.is_sparse
    assert torch.allclose(W.grad.to_dense(), dense_grad, atol=1e-6)
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[idx.reshape(-1)] = False
    assert bool((dense_grad[untouched] == 0).all())


def test_zero_codes_are_not_rows_of_the_sparse_gradients():
    """A candidate whose code is zero (masked by the global selection, BatchTopK's threshold or the ReLU) is
    not touched: the row-sparse gradients of W_enc and W_dec leave it out, and the values equal the dense ones."""
    torch.manual_seed(9)
    x, W_enc, W_dec = torch.randn(6, 5), torch.randn(40, 5, requires_grad=True), torch.randn(40, 5, requires_grad=True)
    b = torch.zeros(40, requires_grad=True)
    grads = {}
    for sparse_grads in (False, True):
        W_enc.grad = W_dec.grad = None
        acts, idx, _, _ = topk_encode(x, W_enc, b, 4, sparse_grads=sparse_grads)
        keep = torch.zeros_like(acts, dtype=torch.bool)
        keep[:, :2] = True  # half the candidates masked, as the selection across shards does
        acts = acts * keep
        sparse_decode(acts, idx, W_dec, sparse_grads=sparse_grads).pow(2).sum().backward()
        grads[sparse_grads] = (W_enc.grad, W_dec.grad)
    nonzero = torch.zeros(40, dtype=torch.bool)
    nonzero[idx[acts.detach() != 0]] = True
    for sparse, dense in zip(grads[True], grads[False], strict=True):
        assert sparse.is_sparse
        rows = torch.zeros(40, dtype=torch.bool)
        rows[sparse.coalesce().indices()[0]] = True
        assert torch.equal(rows, nonzero)
        torch.testing.assert_close(sparse.to_dense(), dense)


def test_sparse_decode_gradcheck_float64():
    torch.manual_seed(7)
    W = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    acts = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 10, (5, 3))
    assert torch.autograd.gradcheck(lambda a, w: sparse_decode(a, idx, w), (acts, W), eps=1e-6, atol=1e-5)


def test_jumprelu_and_step_straight_through():
    z = torch.tensor([[0.50, 1.00, 1.0004, 2.0]], requires_grad=True)
    theta = torch.full((4,), 1.0, requires_grad=True)
    eps = 0.001
    out = jumprelu(z, theta, eps)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 0.0, 1.0004, 2.0]]))
    out.sum().backward()
    assert torch.equal(z.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    # Only the pre-activations within ε/2 of θ move θ: −θ/ε there.
    assert torch.allclose(theta.grad, torch.tensor([0.0, -1000.0, -1000.0, 0.0]))
    z.grad = theta.grad = None
    step(z, theta, eps).sum().backward()
    assert z.grad is None or bool((z.grad == 0).all())
    assert torch.allclose(theta.grad, torch.tensor([0.0, -1000.0, -1000.0, 0.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_cuda_match_cpu():
    torch.manual_seed(8)
    x, W, b = torch.randn(64, 32), torch.randn(3000, 32), torch.randn(3000)
    dead = torch.rand(3000) < 0.2
    results = {}
    for device in ("cpu", "cuda"):
        xs, Ws, bs = (t.to(device).requires_grad_(True) for t in (x, W, b))
        acts, idx, aux, aux_idx = topk_encode(xs, Ws, bs, 8, chunk=1024, dead_mask=dead.to(device), k_aux=16)
        y = sparse_decode(acts, idx, Ws) + sparse_decode(aux, aux_idx, Ws)
        y.pow(2).sum().backward()
        results[device] = [t.detach().cpu() for t in (y, xs.grad, Ws.grad, bs.grad)]
    for got, ref in zip(results["cuda"], results["cpu"], strict=True):
        assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
