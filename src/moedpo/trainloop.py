"""What one training loop steps over a built run: the reference pass, parameters, optimizer, schedule, the
core's :class:`~moedpo.inference.VariationalEM` and the batch plan, and the function that runs one step.

``moedpo train`` builds these once; ``experts.num_experts=auto`` (:mod:`moedpo.kselection`) once per K tried.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moedpo.assembly import Run
from moedpo.assembly.components import build_start
from moedpo.data.batching import BatchPlan
from moedpo.data.tokenize import collate_examples
from moedpo.distributed import DataParallel
from moedpo.inference import VariationalEM
from moedpo.progress import Progress
from moedpo.runs import REFERENCE_FILE, lr_scheduler


@dataclass
class LoopParts:
    run: Run
    params: dict  # name -> parameter the optimizer steps (and a checkpoint holds)
    optimizer: torch.optim.Optimizer
    scheduler: object
    loop: VariationalEM
    plan: BatchPlan
    dp: DataParallel

    def step(self, step: int, bar: Progress, shown: int) -> dict:
        """Training step ``step`` (0-based; its batches follow from it), the bar moved to ``shown``; its metrics."""
        t, pad = self.run.config.train, self.run.tokenizer.pad_token_id
        acc = t.gradient_accumulation_steps
        shards = [self.plan(step * acc + i, self.dp.shard) for i in range(acc)]  # this process's share; may be empty
        loss = self.loop.step(*[collate_examples(examples, pad) if examples else None for examples in shards])
        metrics = {**self.loop.metrics, "learning_rate": self.scheduler.get_last_lr()[0]}
        metrics["world_size"] = self.dp.world_size
        metrics["epoch"] = (step + 1) * acc / self.plan.per_epoch
        bar.update(shown, loss=loss, acc=self.loop.metrics.get("rewards/accuracies", float("nan")))
        return metrics


def loop_parts(run: Run, dp: DataParallel) -> LoopParts:
    """Fresh optimizer, schedule and EM loop over the run's trainable parameters, and its batch plan."""
    t = run.config.train
    dp.shard_experts(run.bank)  # fsdp: the decoder layers sharded, now that every adapter and head exists
    params = run.trainable_parameters()
    optimizer = torch.optim.AdamW(params.values(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = lr_scheduler(optimizer, t.lr_scheduler_type, t.warmup_steps, t.max_steps)
    user_scope = run.config.em.scope == "user"
    per_batch = t.users_per_batch if user_scope else t.per_device_train_batch_size * dp.world_size  # global batch
    plan = BatchPlan.for_examples(run.data.train, user_scope, per_batch, t.seed)
    return LoopParts(run, params, optimizer, scheduler, _em_loop(run, optimizer, scheduler, dp), plan, dp)


def reference_once(run: Run, run_dir: Path, dp: DataParallel) -> None:
    """Reference log-probs of every example, computed once per dataset and kept with the run (``--resume``, later
    epochs and every K of ``num_experts=auto`` reuse them; no training step runs the reference model). Under
    torchrun each process computes every N-th example and reads the others' share from the run directory."""
    path = run_dir / REFERENCE_FILE
    if path.exists():
        run.bank.load_reference_state(load_file(path))
        return
    examples = run.data.train + run.data.eval
    mine = examples[dp.rank :: dp.world_size]
    bar = tqdm(total=len(mine), desc="reference log-probs", disable=not (dp.is_main and sys.stderr.isatty()))
    run.bank.precompute_reference(mine, run.tokenizer.pad_token_id, progress=bar.update)
    bar.close()
    if dp.world_size > 1:
        _share_reference(run, run_dir, dp)
    if dp.is_main and not sys.stderr.isatty():
        unit = "rankings" if run.data.rankings else "pairs"
        shared = f" ({dp.world_size} processes, each a share)" if dp.world_size > 1 else ""
        print(f"moedpo: reference log-probs of {len(examples)} {unit} computed{shared}", file=sys.stderr, flush=True)
    if dp.is_main:
        save_file(run.bank.reference_state(), path)
    dp.barrier()


def _share_reference(run: Run, run_dir: Path, dp: DataParallel) -> None:
    """Each process's reference share through the run directory (``reference_logps.safetensors.rank<r>``): every
    process ends with the whole cache."""
    parts = [run_dir / f"{REFERENCE_FILE}.rank{r}" for r in range(dp.world_size)]
    own = run.bank.reference_state()
    if own:
        save_file(own, parts[dp.rank])
    dp.barrier()
    for rank, part in enumerate(parts):
        if rank != dp.rank and part.exists():
            run.bank.load_reference_state(load_file(part))
    dp.barrier()
    if dp.is_main:
        for part in parts:
            part.unlink(missing_ok=True)


def _em_loop(run: Run, optimizer, scheduler, dp: DataParallel) -> VariationalEM:
    """The core's VariationalEM over the run's expert bank, gate and latent model."""
    config, em = run.config, run.config.em
    closed_form = config.gate.type == "fixed" and config.gate.closed_form
    return VariationalEM(
        run.bank,
        run.gate,
        optimizer,
        beta=em.beta,
        model=run.model,
        schedule=em.schedule,
        guide=run.guide,
        m_steps=em.m_steps,
        loss_type=config.train.loss_type,
        label_smoothing=em.label_smoothing,
        closed_form_gate=run.gate.net if closed_form else None,
        gate_momentum=config.gate.momentum,
        load_balance=em.load_balance,
        usage_entropy=em.usage_entropy,
        clip_grad_norm=config.train.max_grad_norm,
        lr_scheduler=scheduler,
        sync=dp if dp.enabled else None,
        exact_every=em.exact_every,
        exact_warmup=em.exact_warmup,
        start=build_start(run.config, run.data),
        seed=config.train.seed,
    )
