"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): the trainable parameters and the optimizer's
state, by parameter name, each process writing its own shards (``train.parallel=fsdp``).

DCP reshards on load: a checkpoint written by N processes loads into M processes, sharded or whole (a run saved
under fsdp on 2 processes resumes on 1, with or without fsdp). Only tensors, and no pickle: ``.metadata`` and
``__<rank>_0.distcp`` files.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

SHARDED_DIR = "dcp"  # inside RUN/checkpoint/


def _state(params: dict, optimizer: torch.optim.Optimizer, names: set[str] | None = None) -> dict:
    """{"params": name -> parameter, "optimizer": name -> its optimizer state}: the parameters themselves, so a
    load fills them in place; optimizer state only for parameters that have one (``names``: those the checkpoint
    has)."""
    with_state = [n for n, p in params.items() if optimizer.state.get(p)] if names is None else sorted(names)
    return {"params": dict(params), "optimizer": {n: optimizer.state[params[n]] for n in with_state}}


def save_sharded(folder: Path, params: dict, optimizer: torch.optim.Optimizer) -> None:
    """Every process calls this with its own (sharded) parameters; DCP writes each shard once."""
    with _one_process():
        dcp.save(_state(params, optimizer), checkpoint_id=str(folder), no_dist=not dist.is_initialized())


def load_sharded(folder: Path, params: dict, optimizer: torch.optim.Optimizer) -> None:
    """Fill ``params`` and the optimizer's state in place from :func:`save_sharded`'s folder, resharded to this
    run's layout. A parameter that had no optimizer state when saved (never reached by a gradient) gets none."""
    keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    differ = sorted({k.removeprefix("params.") for k in keys if k.startswith("params.")} ^ set(params))
    if differ:
        raise ValueError(f"{folder}: the sharded checkpoint and this run differ in parameters, e.g. {differ[0]}")
    # optimizer.<parameter name>.<state key (exp_avg, step ...: no dot)>
    names = {k.removeprefix("optimizer.").rsplit(".", 1)[0] for k in keys if k.startswith("optimizer.")}
    _initial_state(optimizer, [params[n] for n in names])
    with _one_process():
        dcp.load(_state(params, optimizer, names), checkpoint_id=str(folder), no_dist=not dist.is_initialized())


@contextlib.contextmanager
def _one_process():
    """DCP warns whenever it runs without a process group, even when told to (``no_dist``); one process resuming a
    sharded run means it, so that one warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _initial_state(optimizer: torch.optim.Optimizer, params: list) -> None:
    """The optimizer's state tensors for ``params``, to load into: one step with zero gradients at learning rate 0
    (parameters unchanged), for these parameters only."""
    saved = [group["lr"] for group in optimizer.param_groups]
    grads = {id(p): p.grad for group in optimizer.param_groups for p in group["params"]}
    wanted = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p) if id(p) in wanted else None
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr
        for p in group["params"]:
            p.grad = grads[id(p)]
