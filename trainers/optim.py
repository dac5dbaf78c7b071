"""Lazy Adam over row-sparse gradients, in bounded memory.

With `SAEConfig.sparse_grads` the kernels give W_enc and W_dec gradients as coalesced sparse COO tensors
holding only the rows a batch touched (≤ N·k). The update is torch's SparseAdam's (the moments and the weights
of touched rows move; untouched rows keep their moments; bias correction counts every step), but applied in
chunks of rows: torch.optim.SparseAdam materialises about eight [touched rows × d] temporaries at once
(2.2 GiB at 4,096 tokens × k = 32 × d = 576, measured), this keeps one chunk's worth.
"""

from __future__ import annotations

import torch


class RowSparseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 chunk_rows: int = 16384):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "chunk_rows": chunk_rows})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if not grad.is_sparse:
                    raise ValueError("RowSparseAdam takes row-sparse gradients (SAEConfig.sparse_grads); use "
                                     "torch.optim.Adam for dense ones")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step_size = group["lr"] / (1 - beta1 ** state["step"])
                root_correction = (1 - beta2 ** state["step"]) ** 0.5
                grad = grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                for start in range(0, rows.numel(), group["chunk_rows"]):
                    index = rows[start:start + group["chunk_rows"]]
                    g = values[start:start + group["chunk_rows"]]
                    m = state["exp_avg"].index_select(0, index).lerp_(g, 1 - beta1)
                    v = state["exp_avg_sq"].index_select(0, index).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    state["exp_avg"].index_copy_(0, index, m)
                    state["exp_avg_sq"].index_copy_(0, index, v)
                    update = m.div_(v.sqrt_().div_(root_correction).add_(group["eps"])).mul_(-step_size)
                    param.index_add_(0, index, update)
        return loss
