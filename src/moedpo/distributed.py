"""Data parallelism for the one training loop: the same ``VariationalEM`` on every process.

Launch with ``torchrun --nproc_per_node N -m moedpo.cli train ...`` (or ``accelerate launch``, which sets the
same environment). Each global batch is split across processes by latent unit (a pair, or a whole annotator,
so user-scope E-steps stay exact); gradients and the closed-form gate statistics are summed across processes
before each update; each process divides its loss by the global number of pairs of the step, so N processes
take the same steps as one process with the whole batch, also when shards are unequal or empty. Rank 0 writes
the run directory.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moedpo.experts.loading import resolve_device


class DataParallel:
    """World size, rank and the collectives the loop needs; a no-op in a single process."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """``train.device``, with ``auto`` on CUDA meaning this process's own GPU."""
        if name == "auto" and torch.cuda.is_available():
            return torch.device(f"cuda:{self.local_rank}")
        return resolve_device(name)

    def shard(self, units: list) -> list:
        """This process's share of one global batch's units."""
        return units[self.rank :: self.world_size]

    def sum_gradients(self, params) -> None:
        """Sum of each gradient over processes (a missing gradient counts as zero). The loop divides every
        process's loss by the global number of pairs, so the sum is the gradient of the global mean."""
        if not self.enabled:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
