"""Lazy Adam over row-sparse gradients, in bounded memory: the touched-row optimizer of TopK-style dictionaries.

With `SAEConfig.sparse_grads` the kernels give W_enc and W_dec gradients as sparse COO tensors holding only the
rows a batch touched (≤ N·k, plus the AuxK rows). The update of those is lazy Adam (torch's SparseAdam's
semantics): the moments and the weights of touched rows move; an untouched row keeps its weights and moments
(its moments do not decay on the steps it sits out); the bias correction counts every optimizer step, touched
or not. A row touched on every step therefore follows dense Adam exactly. It is applied in chunks of rows:
torch.optim.SparseAdam materialises about eight [touched rows × d] temporaries at once (2.2 GiB at 4,096
tokens × k = 32 × d = 576, measured), this keeps one chunk's worth.

Dense gradients (the biases b_enc [M] and b_dec [d]) get plain Adam, so one optimizer steps the whole
dictionary and DeepSpeed can own it as its client optimizer (trainers/engine.py). The state has torch Adam's
layout (`step` as a float tensor, `exp_avg`, `exp_avg_sq`), so checkpoints (trainers/checkpoint.py) read and
write it like torch's.
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
                state = self.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = float(state["step"])
                step_size = group["lr"] / (1 - beta1 ** step)
                root_correction = (1 - beta2 ** step) ** 0.5
                grad = param.grad
                if not grad.is_sparse:
                    _dense_update(param, grad, state, beta1, beta2, step_size, root_correction, group["eps"])
                    continue
                # DeepSpeed's data-parallel exchange concatenates every replica's rows: coalesce sums duplicates.
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


def _dense_update(param, grad, state, beta1: float, beta2: float, step_size: float, root_correction: float,
                  eps: float) -> None:
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denominator = state["exp_avg_sq"].sqrt().div_(root_correction).add_(eps)
    param.addcdiv_(state["exp_avg"], denominator, value=-step_size)
