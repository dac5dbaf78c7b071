"""Lazy Adam over row-sparse gradients, in bounded memory: the touched-row optimizer of TopK-style dictionaries.

With `SAEConfig.sparse_grads` the kernels give W_enc and W_dec gradients as sparse COO tensors holding only the
rows a batch touched (≤ N·k, plus the AuxK rows). The update of those is lazy Adam (torch's SparseAdam's
semantics): the moments and the weights of touched rows move; an untouched row keeps its weights and moments
(its moments do not decay on the steps it sits out); the bias correction counts every optimizer step, touched
or not. A row touched on every step therefore follows dense Adam exactly. It is applied in chunks of rows
through torch's fused Adam kernel on gathered rows (scratch buffers reused every step): torch.optim.SparseAdam
materialises about eight [touched rows × d] temporaries at once (2.2 GiB at 4,096 tokens × k = 32 × d = 576,
measured), this keeps one chunk's worth. The cost is O(touched rows × d), with a larger constant per row than
dense fused Adam (the gathers and scatters): it wins where a step touches a small share of the rows — at a
million latents, ≤ N·k of them — and not where nearly every row is touched.

Dense gradients (the biases b_enc [M] and b_dec [d]) get plain Adam, so one optimizer steps the whole
dictionary and DeepSpeed can own it as its client optimizer (trainers/engine.py). The state has torch Adam's
layout (`step` as a float tensor, `exp_avg`, `exp_avg_sq`), so checkpoints (trainers/checkpoint.py) read and
write it like torch's.
"""

from __future__ import annotations

import torch

from trainers.kernels import _sort_threads


class RowSparseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 chunk_rows: int = 4096):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "chunk_rows": chunk_rows})
        # Gathered rows of one chunk (weights, moments), reused every step: fresh [rows, d] tensors per step
        # would page-fault in, which on CPU cost more than the update itself (measured). Not optimizer state.
        self._scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            adam = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "weight_decay": 0.0, "eps": group["eps"],
                    "amsgrad": False, "maximize": False}
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                # torch's fused Adam kernel (bias correction from `step`); it wants the step on the param's device
                step = state["step"].to(param.device)
                grad = param.grad
                if not grad.is_sparse:
                    torch._fused_adam_([param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step],
                                       **adam)
                    continue
                rows, values = _unique_rows(grad)
                chunk = group["chunk_rows"]
                p_rows, m_rows, v_rows = self._buffers(param, chunk)
                with _sort_threads(param):
                    for start in range(0, rows.numel(), chunk):
                        index, g = rows[start:start + chunk], values[start:start + chunk]
                        p, m, v = p_rows[:len(index)], m_rows[:len(index)], v_rows[:len(index)]
                        torch.index_select(param, 0, index, out=p)
                        torch.index_select(state["exp_avg"], 0, index, out=m)
                        torch.index_select(state["exp_avg_sq"], 0, index, out=v)
                        torch._fused_adam_([p], [g.contiguous()], [m], [v], [], [step], **adam)
                        param.index_copy_(0, index, p)
                        state["exp_avg"].index_copy_(0, index, m)
                        state["exp_avg_sq"].index_copy_(0, index, v)
        return loss

    def _buffers(self, param: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (tuple(param.shape[1:]), param.dtype, param.device, chunk)
        if key not in self._scratch:
            shape = (chunk, *param.shape[1:])
            self._scratch[key] = tuple(param.new_empty(shape) for _ in range(3))
        return self._scratch[key]


def _unique_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, values) of a row-sparse gradient with each row once. The kernels emit sorted unique rows, but
    autograd's accumulation drops the coalesced flag, and coalescing sorts again (a quarter of the step,
    measured); DeepSpeed's exchange between replicas concatenates every replica's rows: those are summed."""
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            return rows, grad._values()
        grad = grad.coalesce()
    return grad.indices()[0], grad.values()
