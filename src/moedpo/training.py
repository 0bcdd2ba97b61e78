"""``moedpo.train(config)``: K LLM experts and a gate by variational EM (Mix-/MoE-DPO, arXiv 2510.08256).

One loop, top to bottom: build -> (resume) -> for each step: E-step + M-step on a batch via the core's
``VariationalEM`` (the bank pushes d loss / d h into one expert at a time) -> log -> evaluate -> checkpoint.
Distributed runs wrap this same loop; there is no second copy.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moedpo.builders import (
    build_bank,
    build_base,
    build_gate,
    gate_feature_dim,
    gate_logits,
    prepare_data,
)
from moedpo.config import Config, ConfigError, load_config, save_config
from moedpo.data.tokenize import collate
from moedpo.distributed import DataParallel
from moedpo.eval.evaluate import evaluate
from moedpo.inference import VariationalEM
from moedpo.models import mixture_bt_model, user_bt_model
from moedpo.runs import MetricsLogger, find_checkpoint, load_checkpoint, save_checkpoint


class BatchPlan:
    """Deterministic batches by step (so a resumed run sees the same data): pairs, or whole annotators."""

    def __init__(self, examples: list[dict], by_user: bool, per_batch: int, seed: int):
        if by_user:
            groups: dict[int, list[dict]] = {}
            for e in examples:
                groups.setdefault(e["user"], []).append(e)
            self.units = list(groups.values())
        else:
            self.units = [[e] for e in examples]
        self.per_batch, self.seed = max(1, min(per_batch, len(self.units))), seed
        self.per_epoch = math.ceil(len(self.units) / self.per_batch)

    def __call__(self, index: int, shard=lambda units: units) -> list[dict]:
        """The examples of global batch ``index`` (``shard`` keeps this process's units of it)."""
        epoch, position = divmod(index, self.per_epoch)
        order = list(range(len(self.units)))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        chosen = shard(order[position * self.per_batch : (position + 1) * self.per_batch])
        return [e for i in chosen for e in self.units[i]]


def _lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def _prepare_run_dir(config: Config, resume: bool, dp: DataParallel, tokenizer, base, data) -> Path:
    """Rank 0 creates (or checks, for --resume) the run directory and writes its header; the others wait."""
    if dp.enabled and "{time}" in config.train.output_dir:
        raise ConfigError("with several processes, set train.output_dir explicitly (every rank must agree)")
    if not dp.is_main:
        dp.barrier()
        return Path(config.train.output_dir)
    if "{time}" in config.train.output_dir:
        if resume:
            raise FileNotFoundError("--resume needs the run's own train.output_dir (see its config.yaml)")
        config.train.output_dir = config.train.output_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(config.train.output_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not config.train.overwrite:
            raise FileExistsError(
                f"{run_dir} exists and is not empty: pass --resume to continue it, "
                "train.overwrite=true to replace it, or another train.output_dir"
            )
        shutil.rmtree(run_dir)
    if resume and find_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_run_header(config, run_dir, tokenizer, base, data)
    dp.barrier()
    return run_dir


def _step_metrics(stash: list[dict], beta: float, loop_metrics: dict, gate_w: torch.Tensor) -> dict:
    """TRL-style per-expert reward metrics and the mixture's predictive accuracy for the last batch."""
    out = {k: v for k, v in loop_metrics.items()}
    chosen = torch.cat([(s["chosen_logps"] - _ref(s["ref_chosen_logps"])).cpu() for s in stash])  # (B, K)
    rejected = torch.cat([(s["rejected_logps"] - _ref(s["ref_rejected_logps"])).cpu() for s in stash])
    h = chosen - rejected
    for k in range(h.shape[1]):
        out[f"expert_{k}/rewards/chosen"] = float(beta * chosen[:, k].mean())
        out[f"expert_{k}/rewards/rejected"] = float(beta * rejected[:, k].mean())
        out[f"expert_{k}/rewards/margins"] = float(beta * h[:, k].mean())
        out[f"expert_{k}/rewards/accuracies"] = float((h[:, k] > 0).float().mean())
    prob = (gate_w * torch.sigmoid(beta * h)).sum(-1)
    out["rewards/accuracies"] = float((prob > 0.5).float().mean())
    return out


def _ref(ref):
    return ref if ref.dim() == 2 else ref.unsqueeze(-1)


def _write_run_header(config: Config, run_dir: Path, tokenizer, base, data) -> None:
    save_config(config, run_dir / "config.yaml")
    (run_dir / "users.json").write_text(json.dumps(data.user_ids))
    if config.model.name_or_path == "builtin" and not (run_dir / "base").exists():
        tokenizer.save_pretrained(run_dir / "base")  # the built-in base is not on any hub: keep it with the run
        base.save_pretrained(run_dir / "base")


def _em_loop(config: Config, bank, gate, optimizer, scheduler, stash: list, dp: DataParallel) -> VariationalEM:
    """The core's VariationalEM over the bank: forward gives margins without a graph and a push-backward."""
    em, user_scope = config.em, config.em.scope == "user"

    def forward(batch):
        out = bank.margins(batch)
        stash.append(out)
        logits, local = gate_logits(config, gate, batch, out["features"])
        result = {"h": out["h"], "gate_logits": logits, "backward": lambda grad_h: bank.push(batch, grad_h)}
        if user_scope:
            result["user_index"] = local
        return result

    return VariationalEM(
        forward,
        optimizer,
        beta=em.beta,
        model=user_bt_model if user_scope else mixture_bt_model,
        schedule=em.schedule,
        m_steps=em.m_steps,
        label_smoothing=em.label_smoothing,
        closed_form_gate=gate if config.gate.type == "fixed" and config.gate.closed_form else None,
        gate_momentum=config.gate.momentum,
        straight_through=em.straight_through,
        temperature=(em.temperature_start, em.temperature_end, em.temperature_steps),
        load_balance=em.load_balance,
        usage_entropy=em.usage_entropy,
        clip_grad_norm=config.train.max_grad_norm,
        lr_scheduler=scheduler,
        sync=dp if dp.enabled else None,
    )


def train(config: Config | str | Path | None = None, resume: bool = False, **overrides) -> Path:
    """Train and return the run directory. Bad data fails before the run directory is touched.

    ``config``: a :class:`~moedpo.config.Config`, a YAML path, or None for the built-in default; keyword
    ``overrides`` use ``section__key=value`` (``moedpo.train(experts__num_experts=3)``).
    """
    if not isinstance(config, Config):
        config = load_config(config, [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()])
    elif overrides:
        raise ValueError("pass overrides with a config path or None, or edit the Config object")
    t, dp = config.train, DataParallel()
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    tokenizer, base = build_base(config)
    data = prepare_data(config, tokenizer)  # validates every row first: errors leave nothing behind
    run_dir = _prepare_run_dir(config, resume, dp, tokenizer, base, data)
    bank = build_bank(config, base, dp.device(t.device))
    gate = build_gate(config, gate_feature_dim(config, base, data), len(data.user_ids), data.user_feature_dim)
    gate = gate.to(bank.device)
    params = dict(bank.trainable_parameters())
    params.update({f"gate.{n}": p for n, p in gate.named_parameters() if p.requires_grad})
    optimizer = torch.optim.AdamW(params.values(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.lr_scheduler, t.warmup_steps, t.max_steps))
    stash: list[dict] = []  # the bank's outputs for this step's micro-batches, for metrics
    loop = _em_loop(config, bank, gate, optimizer, scheduler, stash, dp)
    start = load_checkpoint(find_checkpoint(run_dir), params, gate, optimizer, scheduler) if resume else 0
    loop.num_steps = start

    logger = MetricsLogger(run_dir, resume_step=start if resume else None) if dp.is_main else None
    user_scope, acc, pad = config.em.scope == "user", t.gradient_accumulation_steps, tokenizer.pad_token_id
    plan = BatchPlan(data.train, user_scope, t.users_per_batch if user_scope else t.batch_size, t.seed)
    if plan.per_batch < dp.world_size:
        raise ConfigError(f"{dp.world_size} processes need at least that many pairs/annotators per batch")
    steps = range(start, t.max_steps)
    progress = tqdm(steps, initial=start, total=t.max_steps, desc="moedpo", disable=None if dp.is_main else True)
    for step in progress:
        stash.clear()
        micro = [collate(plan(step * acc + i, dp.shard), pad) for i in range(acc)]
        loss = loop.step(*micro)
        if logger is not None and ((step + 1) % t.logging_every == 0 or step + 1 == t.max_steps):
            metrics = _log_step(config, loop, gate, scheduler, micro, stash, (step + 1) * acc / plan.per_epoch)
            metrics["world_size"] = dp.world_size
            if t.eval_every and (step + 1) % t.eval_every == 0 and data.eval:
                metrics.update(evaluate(config, bank, gate, data.train, data.eval, pad)[0])
            logger.log(step + 1, metrics)
            progress.set_postfix(loss=f"{loss:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
        if dp.is_main and t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.max_steps:
            save_checkpoint(run_dir, step + 1, params, gate.state_dict(), optimizer, scheduler)
    if dp.is_main:
        logger.close()
        save_checkpoint(run_dir, t.max_steps, params, gate.state_dict(), optimizer, scheduler)
        _save_artefacts(config, run_dir, bank, gate, data, pad)
    dp.barrier()
    dp.close()
    return run_dir


def _log_step(config, loop, gate, scheduler, micro, stash, epoch) -> dict:
    """This step's metrics: the loop's, per-expert rewards, the gate's predictive accuracy, learning rate."""
    with torch.no_grad():
        w = torch.cat([_pair_weights(config, gate, b, s["features"]) for b, s in zip(micro, stash)])
    metrics = _step_metrics(stash, config.em.beta, loop.metrics, w.cpu())
    metrics.update({"learning_rate": scheduler.get_last_lr()[0], "epoch": epoch})
    return metrics


def _pair_weights(config, gate, batch, features):
    logits, local = gate_logits(config, gate, batch, features)
    w = torch.softmax(logits, -1)
    return w if local is None else w[local]


def _save_artefacts(config, run_dir: Path, bank, gate, data, pad) -> None:
    from moedpo.eval.report import write_report

    bank.save_experts(run_dir / "experts")
    save_file({k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()}, run_dir / "gate.safetensors")
    if data.eval:
        metrics, details = evaluate(config, bank, gate, data.train, data.eval, pad)
        write_report(run_dir / "report", metrics, details, data.eval, run_dir / "metrics.jsonl")
