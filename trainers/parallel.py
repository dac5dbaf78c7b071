"""Latent sharding × data parallelism for dictionaries: the process groups and the three collectives.

Ranks form `replicas` data-parallel replicas of `shards` latent shards: rank = replica · shards + shard.
Each rank owns latents [shard · M/S, (shard + 1) · M/S) of every dictionary (its rows of W_enc, b_enc,
W_dec) and computes only their pre-activations. Ranks of one replica (a *shard group*) see the same batch;
replicas see different batches and average their gradients (the *data-parallel group* of a rank holds the
ranks that own the same shard).

The collectives:
- `select_global`: each rank offers its local top candidates per token (values only, N × c floats); the
  global top-k is picked from the gathered candidates and each rank keeps its own survivors. No gradient
  flows through the selection, only through the surviving values.
- `sum_across_shards`: the reconstruction is the all-reduce of the ranks' partial decodes. Every rank then
  computes the same loss from the same sum, so the gradient reaching each partial is the loss gradient
  itself (identity backward).
- `all_reduce_shared_grad`: parameters every shard holds (b_dec) collect their gradient from every shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class ShardMesh:
    world: int
    rank: int
    shards: int
    shard_group: object | None = None  # ranks of this replica (one per shard)
    data_parallel_group: object | None = None  # ranks holding this shard (one per replica)

    @classmethod
    def build(cls, world: int, rank: int, shards: int) -> ShardMesh:
        """Create the groups; every rank must call this with the same arguments (new_group is collective)."""
        if world % shards:
            raise ValueError(f"cluster.trainer_ranks ({world}) must be a multiple of cluster.latent_shards "
                             f"({shards}); change one of them")
        mesh = cls(world, rank, shards)
        if world == 1:
            return mesh
        replicas = world // shards
        for replica in range(replicas):
            members = list(range(replica * shards, (replica + 1) * shards))
            group = dist.new_group(members)
            if rank in members:
                mesh.shard_group = group
        for shard in range(shards):
            members = list(range(shard, world, shards))
            group = dist.new_group(members)
            if rank in members:
                mesh.data_parallel_group = group
        return mesh

    @property
    def shard(self) -> int:
        return self.rank % self.shards

    @property
    def replica(self) -> int:
        return self.rank // self.shards

    @property
    def replicas(self) -> int:
        return self.world // self.shards

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    def latent_range(self, latents: int) -> tuple[int, int]:
        if latents % self.shards:
            raise ValueError(f"latents ({latents}) must be divisible by the latent shards ({self.shards})")
        size = latents // self.shards
        return self.shard * size, (self.shard + 1) * size

    # DeepSpeed's `mpu` interface: DeepSpeed reduces gradients over the data-parallel group only, since the
    # ranks of a shard group hold different parameters.
    def get_data_parallel_group(self):
        return self.data_parallel_group if self.data_parallel_group is not None else dist.group.WORLD

    def get_data_parallel_rank(self) -> int:
        return self.replica

    def get_data_parallel_world_size(self) -> int:
        return self.replicas

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(range(self.shard, self.world, self.shards))

    def get_model_parallel_group(self):
        return self.shard_group if self.shard_group is not None else dist.group.WORLD

    def get_model_parallel_rank(self) -> int:
        return self.shard

    def get_model_parallel_world_size(self) -> int:
        return self.shards

    # ------------------------------------------------------------------------------------------------------
    def gather_candidates(self, values: Tensor) -> Tensor:
        """[N, c] local candidate values → [N, S·c], shard s's candidates at columns [s·c, (s+1)·c)."""
        return self.gather_latents(values, dim=1)

    def own_columns(self, mask: Tensor, width: int) -> Tensor:
        """This shard's columns of a mask over gathered candidates."""
        return mask[:, self.shard * width:(self.shard + 1) * width] if self.sharded else mask

    @torch.no_grad()
    def select_global(self, values: Tensor, per_row: int) -> Tensor:
        """Mask [N, c] of this rank's candidates among the global top-`per_row` of each row."""
        gathered = self.gather_candidates(values.detach())
        if gathered.shape[1] <= per_row:
            return torch.ones_like(values, dtype=torch.bool)
        kept = gathered.topk(per_row, dim=1, sorted=False).indices
        mask = torch.zeros_like(gathered, dtype=torch.bool).scatter_(1, kept, True)
        return self.own_columns(mask, values.shape[1])

    def gather_latents(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """Every shard's slice of a per-latent tensor, concatenated along `dim` in latent order (all ranks)."""
        if not self.sharded:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.shards)]
        dist.all_gather(parts, tensor.contiguous(), group=self.shard_group)
        return torch.cat(parts, dim=dim)

    def sum_over(self, tensor: Tensor, group: str) -> Tensor:
        """In-place SUM all-reduce over the "shards" of this replica or the data-parallel "replicas"."""
        size, handle = ((self.shards, self.shard_group) if group == "shards"
                        else (self.replicas, self.data_parallel_group))
        if size > 1:
            dist.all_reduce(tensor, group=handle)
        return tensor

    def sum_across_shards(self, partial: Tensor) -> Tensor:
        return _SumAcrossShards.apply(partial, self.shard_group) if self.sharded else partial

    def all_reduce_shared_grad(self, parameter: torch.nn.Parameter) -> None:
        """Sum a replicated parameter's gradient over the shards, during backward (before DeepSpeed sees it)."""
        if self.sharded:
            parameter.register_hook(lambda grad: _all_reduced(grad, self.shard_group))


def _all_reduced(tensor: Tensor, group) -> Tensor:
    out = tensor.clone()
    dist.all_reduce(out, group=group)
    return out


class _SumAcrossShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        return _all_reduced(partial, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None
