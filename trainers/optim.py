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

Gradient clipping (`max_grad_norm`, the job's training.grad_clip_norm) happens here rather than in DeepSpeed:
its clip takes the norm of a sparse gradient through a dense copy and scales every gradient in a pass of its
own (0.39 s of a 5.8 s step at 131,072 latents, measured). Here the norm is a sum over the touched rows'
values, and the scale reaches the gradients inside the fused kernel (its `grad_scale`), so clipping adds no
pass. The norm is global: the squared norms of per-latent parameters (marked `model_parallel`) add up over
the latent shards of `norm_group`, and a parameter every shard holds alike (b_dec) counts once.

Dense gradients (the biases b_enc [M] and b_dec [d]) get plain Adam, so one optimizer steps the whole
dictionary and DeepSpeed can own it as its client optimizer (trainers/engine.py). The state has torch Adam's
layout (`step` as a float tensor, `exp_avg`, `exp_avg_sq`), so checkpoints (trainers/checkpoint.py) read and
write it like torch's.
"""

from __future__ import annotations

import torch


class RowSparseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 chunk_rows: int | None = None, max_grad_norm: float = 0.0, norm_group=None,
                 counts_shared: bool = True):
        """`max_grad_norm` > 0: scale the step's gradients down to that global norm (DeepSpeed's clip rule:
        coefficient min(1, max / (norm + 1e-6))). `norm_group`: the process group of the latent shards whose
        norms add up (None: one shard); `counts_shared`: whether this rank adds the parameters every shard
        holds alike (shard 0 does). `chunk_rows`: rows updated per gathered chunk (default: 512 on CPU, to
        stay in cache; 65,536 on a GPU, where each chunk costs seven kernel launches)."""
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "chunk_rows": chunk_rows})
        self.max_grad_norm = max_grad_norm
        self.norm_group = norm_group
        self.counts_shared = counts_shared
        self._global_grad_norm: float | None = None  # DeepSpeed's engine reads it after the step
        # Gathered rows of one chunk (weights, moments), reused every step: fresh [rows, d] tensors per step
        # would page-fault in, which on CPU cost more than the update itself (measured). 512 rows (3 × 1.2 MB at
        # d = 576) stay in cache between the gather, the update and the scatter: 90 ms per 81,000-row matrix on
        # 2 threads against 110 ms at 4,096 rows (2 threads; one thread: 200 ms). Not optimizer state.
        self._scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = {param: _unique_rows(param.grad) if param.grad.is_sparse else None
                 for group in self.param_groups for param in group["params"] if param.grad is not None}
        grad_scale = self._clip_scale(grads)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            adam = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "weight_decay": 0.0, "eps": group["eps"],
                    "amsgrad": False, "maximize": False, "grad_scale": grad_scale}
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
                if grads[param] is None:
                    torch._fused_adam_([param], [param.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step],
                                       **adam)
                    continue
                rows, values = grads[param]
                chunk = group["chunk_rows"] or (512 if param.device.type == "cpu" else 65536)
                p_rows, m_rows, v_rows = self._buffers(param, chunk)
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

    def _clip_scale(self, grads: dict) -> torch.Tensor | None:
        """The divisor of this step's gradients (the fused kernel's grad_scale): ‖g‖ / max_grad_norm when the
        global norm ‖g‖ is above max_grad_norm, else None (no clipping)."""
        if self.max_grad_norm <= 0 or not grads:
            return None
        device = next(iter(grads)).device
        squares = torch.zeros((), dtype=torch.float64, device=device)
        for param, sparse in grads.items():
            if not (getattr(param, "model_parallel", False) or self.counts_shared):
                continue
            values = param.grad if sparse is None else sparse[1]
            wide = torch.promote_types(values.dtype, torch.float32)  # bf16 summed in fp32, without a copy
            squares += torch.linalg.vector_norm(values.detach(), dtype=wide).square().to(squares.dtype)
        if self.norm_group is not None:
            torch.distributed.all_reduce(squares, group=self.norm_group)
        norm = squares.sqrt()
        self._global_grad_norm = float(norm)
        coefficient = self.max_grad_norm / (norm + 1e-6)
        if coefficient >= 1:
            return None
        return (1 / coefficient).to(device, torch.float32)  # the fused kernel takes a float32 scale

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
