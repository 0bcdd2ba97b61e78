"""``moedpo.train(config)``: K LLM experts and a gate by variational EM (Mix-/MoE-DPO, arXiv 2510.08256).

One loop, top to bottom: build the run -> (resume) -> for each step: ``VariationalEM.step`` (margins -> gate ->
E-step -> M-step -> expert update -> optimizer -> schedule, in that order, in one function) -> log -> evaluate
-> checkpoint. Distributed runs wrap this same loop; there is no second copy.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moedpo.assembly import Run, build_base, build_run
from moedpo.config import Config, ConfigError, load_config, save_config
from moedpo.data.batching import BatchPlan
from moedpo.data.tokenize import collate
from moedpo.distributed import DataParallel
from moedpo.eval.evaluate import evaluate
from moedpo.eval.report import report
from moedpo.eval.rewards import resolve_rewards
from moedpo.inference import VariationalEM
from moedpo.progress import Progress
from moedpo.runs import (
    DATA_FILE,
    GATE_FILE,
    GUIDE_FILE,
    REFERENCE_FILE,
    MetricsLogger,
    find_checkpoint,
    load_checkpoint,
    lr_scheduler,
    save_checkpoint,
)
from moedpo.session import RunSession


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
    if not resume:  # a resumed run keeps its header until its checkpoint is known to fit
        _write_run_header(config, run_dir, tokenizer, base, data)
    dp.barrier()
    return run_dir


def _absolute_paths(config: Config) -> None:
    for section, key in (("model", "name_or_path"), ("data", "source"), ("data", "eval_source")):
        value = getattr(getattr(config, section), key)
        if value and Path(value).expanduser().exists():
            setattr(getattr(config, section), key, str(Path(value).expanduser().resolve()))


def _write_run_header(config: Config, run_dir: Path, tokenizer, base, data) -> None:
    save_config(config, run_dir / "config.yaml", notes=(f"em.scope={config.em.scope}; {data.split}",))
    (run_dir / "users.json").write_text(json.dumps(data.user_ids))
    data.save(run_dir / DATA_FILE)  # eval, routing and generation need none of the original files
    if config.model.name_or_path == "scratch" and not (run_dir / "base").exists():
        # the cache may be cleared: keep the folder the base was loaded from with the run
        shutil.copytree(base.config.name_or_path, run_dir / "base")
    if config.model.name_or_path == "builtin" and not (run_dir / "base").exists():
        # the built-in base is not on any hub: keep it with the run. Rebuilt (deterministic from the seed), since the
        # bank's adapters are already injected into ``base``
        tokenizer, base = build_base(config)
        tokenizer.save_pretrained(run_dir / "base")
        base.save_pretrained(run_dir / "base")


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
    resolve_rewards(config)  # a misspelt report.rewards fails now, not after training
    _absolute_paths(config)  # the run directory must work from any working directory
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    own = Path(t.output_dir)  # --resume trains on the run's own data and base, whatever the config says now
    run = build_run(config, dp.device(t.device), saved=own if resume and (own / DATA_FILE).exists() else None)
    run_dir = _prepare_run_dir(config, resume, dp, run.tokenizer, run.base, run.data)
    if dp.is_main:
        d = run.data
        print(
            f"moedpo: run directory {run_dir}; {len(d.train)} training and {len(d.eval)} held-out pairs, "
            f"{d.num_truncated} truncated, {d.num_dropped} dropped (prompt >= data.max_length as TRL, or chosen "
            "equals rejected); "
            f"em.scope={config.em.scope} over {len(d.user_ids)} annotators; {d.split}",
            file=sys.stderr,
            flush=True,
        )
    _reference_once(run, run_dir, dp)
    params = run.trainable_parameters()
    optimizer = torch.optim.AdamW(params.values(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = lr_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, t.max_steps)
    loop = _em_loop(run, optimizer, scheduler, dp)
    start = load_checkpoint(find_checkpoint(run_dir), params, run.gate, optimizer, scheduler, loop) if resume else 0
    loop.num_steps = start
    if resume and dp.is_main:  # only now that the checkpoint fits: record the continued run's config
        save_config(config, run_dir / "config.yaml", notes=(f"em.scope={config.em.scope}; {run.data.split}",))

    logger = MetricsLogger(run_dir, resume_step=start if resume else None) if dp.is_main else None
    user_scope, acc, pad = config.em.scope == "user", t.gradient_accumulation_steps, run.tokenizer.pad_token_id
    plan = BatchPlan.for_examples(run.data.train, user_scope, t.users_per_batch if user_scope else t.batch_size, t.seed)
    progress = Progress(start, t.max_steps, "moedpo", enabled=dp.is_main)
    for step in range(start, t.max_steps):
        shards = [plan(step * acc + i, dp.shard) for i in range(acc)]  # this process's share; may be empty
        loss = loop.step(*[collate(examples, pad) if examples else None for examples in shards])
        if logger is not None and ((step + 1) % t.logging_every == 0 or step + 1 == t.max_steps):
            metrics = {**loop.metrics, "learning_rate": scheduler.get_last_lr()[0], "world_size": dp.world_size}
            metrics["epoch"] = (step + 1) * acc / plan.per_epoch
            if t.eval_every and (step + 1) % t.eval_every == 0 and run.data.eval:
                metrics.update(evaluate(run, run.data.train, run.data.eval)[0])
            logger.log(step + 1, metrics)
        progress.update(step + 1, loss=loss, acc=loop.metrics.get("rewards/accuracies", float("nan")))
        if dp.is_main and t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.max_steps:
            save_checkpoint(run_dir, step + 1, params, run.gate.state_dict(), optimizer, scheduler, loop.state_dict())
    progress.close()
    if dp.is_main:
        logger.close()
        save_checkpoint(run_dir, t.max_steps, params, run.gate.state_dict(), optimizer, scheduler, loop.state_dict())
        _save_artefacts(run, run_dir)
        if t.dpo_baseline and config.experts.num_experts > 1:
            _train_dpo_baseline(config, run_dir)
        print(f"moedpo: report -> {report(run_dir, RunSession(run_dir, run))}", file=sys.stderr, flush=True)
    dp.barrier()
    dp.close()
    return run_dir


def _reference_once(run: Run, run_dir: Path, dp: DataParallel) -> None:
    """Reference log-probs of every example, computed once per dataset and kept with the run (``--resume`` and
    later epochs reuse them; no training step runs the reference model)."""
    path = run_dir / REFERENCE_FILE
    if path.exists():
        run.bank.load_reference_state(load_file(path))
        return
    examples = run.data.train + run.data.eval
    bar = tqdm(total=len(examples), desc="reference log-probs", disable=not (dp.is_main and sys.stderr.isatty()))
    run.bank.precompute_reference(examples, run.tokenizer.pad_token_id, progress=bar.update)
    bar.close()
    if dp.is_main and not sys.stderr.isatty():
        print(f"moedpo: reference log-probs of {len(examples)} pairs computed", file=sys.stderr, flush=True)
    if dp.is_main:
        save_file(run.bank.reference_state(), path)
    dp.barrier()


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
    )


def _save_artefacts(run: Run, run_dir: Path) -> None:
    run.bank.save_experts(run_dir / "experts")
    if (run_dir / "base").exists():  # the built-in base: record where PEFT's auto classes find it
        for adapter in (run_dir / "experts").glob("expert_*/adapter_config.json"):
            adapter_config = json.loads(adapter.read_text())
            adapter_config["base_model_name_or_path"] = str((run_dir / "base").resolve())
            adapter.write_text(json.dumps(adapter_config, indent=2))
    gate_state = {k: v.detach().cpu().contiguous() for k, v in run.gate.state_dict().items()}
    save_file(gate_state, run_dir / GATE_FILE)
    if isinstance(run.guide, torch.nn.Module):
        save_file({k: v.detach().cpu().contiguous() for k, v in run.guide.state_dict().items()}, run_dir / GUIDE_FILE)


def _train_dpo_baseline(config: Config, run_dir: Path) -> Path:
    """``train.dpo_baseline``: one DPO policy (K=1, the same data, base, steps and beta) in ``RUN/dpo``, for the
    report's comparison. A finished baseline is kept; a killed one resumes."""
    baseline = dataclasses.replace(
        config,
        experts=dataclasses.replace(config.experts, num_experts=1, reference_adapters=None),
        gate=dataclasses.replace(config.gate, type="fixed", user_features=False, encoder=None),
        em=dataclasses.replace(config.em, schedule="em", guide=None, model=None),
        train=dataclasses.replace(config.train, output_dir=str(run_dir / "dpo"), dpo_baseline=False, overwrite=True),
        report=dataclasses.replace(config.report, num_prompts=0),
    )
    if (run_dir / "dpo" / GATE_FILE).exists():
        return run_dir / "dpo"
    print("moedpo: train.dpo_baseline: one DPO policy (K=1) on the same data -> RUN/dpo", file=sys.stderr, flush=True)
    return train(baseline, resume=find_checkpoint(run_dir / "dpo") is not None)
