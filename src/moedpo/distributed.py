"""Data parallelism for the one training loop: the same ``VariationalEM`` on every process.

Launch with ``torchrun --nproc_per_node N -m moedpo.cli train ...`` (or ``accelerate launch``, which sets the
same environment). Each global batch is split across processes by latent unit (a pair, or a whole annotator,
so user-scope E-steps stay exact); each process divides its loss by the global number of pairs of the step, and
PyTorch's ``DistributedDataParallel`` sums the gradients (bucketed, a comm hook that sums instead of averaging), so
N processes take the same steps as one process with the whole batch, also when shards are unequal or empty. A
parameter that no process's pairs reached keeps no gradient, as in one process: AdamW leaves it alone. The draws
of ``gumbel`` and ``routed`` are per unit (:mod:`moedpo.inference.draws`). Rank 0 writes the run directory.

``parallel="fsdp"`` shards each decoder layer of the experts' base with FSDP2 (``fully_shard``), after every
adapter and head exists: a layer's weights, its LoRA experts and their optimizer state live 1/N on each process,
gathered for each forward and backward; its gradients are reduce-scattered as sums. The rest (embeddings, final
norm, the output head and its LoRA, gate, guide) stays whole on every process, its gradients summed by DDP as
above: the fused head reads the head's weight outside the head's forward, where FSDP2 cannot gather it. A sharded
layer's collectives need every process to run the same forwards and backwards, so the bank runs in lockstep
(``ExpertBank.lockstep``): an expert that any process runs, every process runs (on a placeholder pair with zero
gradient where it has none), and a process with no pairs in a micro-batch mirrors the others' passes
(``ExpertBank.idle``). Evaluation runs on every process, the same batches. Checkpoints go through
``torch.distributed.checkpoint`` (:mod:`moedpo.sharded`).
"""

from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moedpo.experts.loading import resolve_device


def launcher_rank() -> int:
    """This process's rank as torchrun (or accelerate launch) set it; 0 without a launcher."""
    return int(os.environ.get("RANK", "0"))


PARALLEL = ("auto", "ddp", "fsdp")


class DataParallel:
    """World size, rank and the collectives the loop needs; a no-op in a single process unless ``parallel`` is
    ``"ddp"`` or ``"fsdp"`` (``train.parallel``), which run the same route in a process group of one (to check a
    setup, or measure what it costs). The process group is started here unless the caller started it (then the
    caller closes it: a nested ``train``, the DPO baseline, leaves it open)."""

    def __init__(self, parallel: str = "auto", timeout: float = 1800):
        if parallel not in PARALLEL:
            raise ValueError(f"parallel={parallel!r}: expected one of {PARALLEL}")
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = launcher_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1 or parallel != "auto"
        self.fsdp = parallel == "fsdp"
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

    def shard_experts(self, bank) -> None:
        """``fsdp``: ``fully_shard`` each decoder layer of the bank's base (all adapters exist by now), its
        gradients reduce-scattered as sums; the bank's parameters re-read (FSDP2 replaces them by sharded ones) and
        its passes put in lockstep. A no-op otherwise."""
        if not self.fsdp:
            return
        if not hasattr(bank, "decoder_layers"):
            raise ValueError(
                f"train.parallel=fsdp shards the decoder layers of one base; {type(bank).__name__} has none "
                "(use experts.mode=lora or heads)"
            )
        device = bank.device.type
        mesh = init_device_mesh(device, (self.world_size,))
        for layer in bank.decoder_layers():
            # each layer is its own root: FSDP2 would keep a root gathered after its forward, and a restart's
            # restored parameters would then not reach the next forward (em.restarts: 0.04 off)
            fully_shard(layer, mesh=mesh, mp_policy=_precision(layer), reshard_after_forward=True)
            layer.set_gradient_divide_factor(1.0)  # the loop already divides by the global number of pairs
            layer.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)
        bank.refresh_parameters()
        bank.lockstep = self

    def full_tensors(self, params: dict) -> dict[str, torch.Tensor]:
        """Name -> the whole tensor of each parameter, gathered where it is sharded (every process calls this)."""
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in params.items()}

    def shard(self, units: list) -> list:
        """This process's share of one global batch's units."""
        return units[self.rank :: self.world_size]

    def watch(self, params) -> None:
        """Before an update's first backward (every process at the same point): DDP's hooks on ``params`` (the
        optimizer's), built once (:class:`GradientSync`), note which of them this process's backwards reach."""
        params = list(params)
        params = [p for p in params if not isinstance(p, DTensor)]  # FSDP reduces the sharded ones
        if self.enabled and params and (self._gradients is None or not self._gradients.covers(params)):
            self._gradients = GradientSync(params)

    def sum_gradients(self, params) -> None:
        """Sum each gradient over processes by ``DistributedDataParallel``; a gradient that no process has stays
        None. The loop divides every process's loss by the global number of pairs, so the sum is the gradient of
        the global mean."""
        if not self.enabled:
            return
        params = [p for p in params if not isinstance(p, DTensor)]
        if not params:
            return
        if self._gradients is None or not self._gradients.covers(params):
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


def _precision(layer: torch.nn.Module) -> MixedPrecisionPolicy:
    """FSDP2 gathers a layer in one dtype: a bf16 base with float32 LoRA experts computes in bf16 and reduces the
    gradients in float32 (the optimizer's float32 LoRA weights stay float32)."""
    dtypes = {p.dtype for p in layer.parameters()}
    if len(dtypes) == 1:
        return MixedPrecisionPolicy()
    low = min(dtypes, key=lambda d: torch.finfo(d).bits)
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)


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
