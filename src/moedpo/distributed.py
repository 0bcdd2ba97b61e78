"""Data parallelism for the one training loop: the same ``VariationalEM`` on every process.

Launch with ``torchrun --nproc_per_node N -m moedpo.cli train ...`` (or ``accelerate launch``, which sets the
same environment). Each global batch is split across processes by latent unit (a pair, or a whole annotator,
so user-scope E-steps stay exact); each process divides its loss by the global number of pairs of the step, and
PyTorch's ``DistributedDataParallel`` sums the gradients (bucketed, a comm hook that sums instead of averaging), so
N processes take the same steps as one process with the whole batch, also when shards are unequal or empty. A
parameter that no process's pairs reached keeps no gradient, as in one process: AdamW leaves it alone. The draws
of ``gumbel`` and ``routed`` are per unit (:mod:`moedpo.inference.draws`). Rank 0 writes the run directory.
"""

from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist

from moedpo.experts.loading import resolve_device


def launcher_rank() -> int:
    """This process's rank as torchrun (or accelerate launch) set it; 0 without a launcher."""
    return int(os.environ.get("RANK", "0"))


class DataParallel:
    """World size, rank and the collectives the loop needs; a no-op in a single process unless ``parallel="ddp"``
    (``train.parallel``), which runs the same DDP route in a process group of one (to check a setup, or measure what
    it costs). The process group is started here unless the caller started it (then the caller closes it: a nested
    ``train``, the DPO baseline, leaves it open)."""

    def __init__(self, parallel: str = "auto", timeout: float = 1800):
        if parallel not in ("auto", "ddp"):
            raise ValueError(f"parallel={parallel!r}: expected auto or ddp")
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = launcher_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1 or parallel == "ddp"
        self.owns_group = self.enabled and not dist.is_initialized()
        self._gradients: GradientSync | None = None
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        wait = datetime.timedelta(seconds=timeout)  # rank 0 evaluates and reports while the others wait
        if self.owns_group and self.world_size > 1:
            dist.init_process_group(backend, timeout=wait)
        elif self.owns_group:  # one process, no launcher: an in-memory store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=wait)

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

    def watch(self, params) -> None:
        """Before an update's first backward (every process at the same point): DDP's hooks on ``params`` (the
        optimizer's), built once (:class:`GradientSync`), note which of them this process's backwards reach."""
        params = list(params)
        if self.enabled and (self._gradients is None or not self._gradients.covers(params)):
            self._gradients = GradientSync(params)

    def sum_gradients(self, params) -> None:
        """Sum each gradient over processes by ``DistributedDataParallel``; a gradient that no process has stays
        None. The loop divides every process's loss by the global number of pairs, so the sum is the gradient of
        the global mean."""
        if not self.enabled:
            return
        if self._gradients is None or not self._gradients.covers(list(params)):
            raise RuntimeError("call watch(params) before the backwards whose gradients sum_gradients sums")
        self._gradients.sum_gradients()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, value) -> list:
        """Every process's ``value`` (picklable, small), in rank order."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Release DDP's reducer, then the process group if this object started it (a reducer that outlives its
        group aborts the process at exit: 'terminate called without an active exception')."""
        if self._gradients is not None:
            self._gradients = None
            gc.collect()  # DDP's Python side holds reference cycles
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class _Trainables(torch.nn.Module):
    """The trainable parameters (the same objects) under one module for ``DistributedDataParallel``, and an anchor
    that no optimizer sees: a forward through the anchor alone is the step's one synchronised backward."""

    def __init__(self, params: list[torch.nn.Parameter]):
        super().__init__()
        self.params = torch.nn.ParameterList(params)
        self.anchor = torch.nn.Parameter(torch.zeros(1, device=params[0].device))

    def forward(self) -> torch.Tensor:
        return self.anchor.sum() * 0


def _sum_hook(_, bucket):  # no return annotation: DDP checks it against the unevaluated string
    """DDP comm hook: the sum over processes (DDP's own hook averages; the loop already divides by the global
    number of pairs)."""
    future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


class GradientSync:
    """``DistributedDataParallel``'s reducer over the trainable parameters, once per update.

    The experts backpropagate outside DDP's forward (each expert's own forward and backward, micro-batch after
    micro-batch): DDP's hooks keep that as local accumulation (``no_sync``) and note which parameters each
    process's backwards reached, from the moment the hooks exist (so it is built before the first backward). The
    update's one synchronised backward runs through the anchor only, so every parameter counts as unused in it
    (``find_unused_parameters``): DDP then all-reduces what each process accumulated, in buckets, and a parameter
    that no process reached keeps its gradient None on every process."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        for param in params:  # DDP hooks only what requires grad now; PEFT's set_adapter may have frozen some
            param.requires_grad_(True)
        self.holder = _Trainables(params)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.holder, find_unused_parameters=True)
        self.ddp.register_comm_hook(None, _sum_hook)

    def covers(self, params: list) -> bool:
        return [id(p) for p in params] == [id(p) for p in self.params]

    def sum_gradients(self) -> None:
        self.ddp().backward()
        self.holder.anchor.grad = None
