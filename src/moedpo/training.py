"""``moedpo.train(config)``: K LLM experts and a gate by variational EM (Mix-/MoE-DPO, arXiv 2510.08256).

One loop, top to bottom: build the run -> (resume) -> for each step: ``VariationalEM.step`` (margins -> gate ->
E-step -> M-step -> expert update -> optimizer -> schedule, in that order, in one function) -> log -> evaluate
-> checkpoint. Distributed runs wrap this same loop; there is no second copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from moedpo import kselection, rundir
from moedpo.assembly import Run, build_run
from moedpo.config import Config, ConfigError, load_config, save_config
from moedpo.distributed import DataParallel
from moedpo.eval.evaluate import evaluate
from moedpo.eval.report import report
from moedpo.eval.rewards import resolve_rewards
from moedpo.progress import Progress
from moedpo.restarts import run_restarts
from moedpo.runs import (
    DATA_FILE,
    GATE_FILE,
    GUIDE_FILE,
    K_SELECTION_FILE,
    BestModel,
    best_metric,
    find_checkpoint,
    load_checkpoint,
    pending_checkpoint,
    rng_state,
    save_checkpoint,
)
from moedpo.session import RunSession
from moedpo.sharded import SHARDED_DIR, save_sharded
from moedpo.threads import cores, cpu_threads
from moedpo.tracking import MetricsLogger, resolve_report_to
from moedpo.trainloop import LoopParts, loop_parts, reference_once


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a step whose checkpoint was written; the message says how to resume."""

    def __init__(self, run_dir: Path, step: int, max_steps: int):
        super().__init__(
            f"interrupted after step {step} of {max_steps}; checkpoint saved in {run_dir / 'checkpoint'}. "
            f"Resume with: moedpo train --config {run_dir / 'config.yaml'} --resume"
        )


class StopRequest:
    """Ctrl-C while training: the step in flight finishes, a checkpoint is written, then training stops
    (:class:`TrainingInterrupted`). In one process a second Ctrl-C stops at once. Under torchrun (``several``) the
    launcher forwards Ctrl-C and then sends SIGTERM, so every rank gets several signals: each only marks the
    request, the ranks agree on it after each step (:meth:`agreed`, an all-reduce) and stop at the same one, within
    torchrun's grace period before SIGKILL (30 s). From the main thread only (where Python delivers signals)."""

    def __init__(self, several: bool = False):
        self.enabled = threading.current_thread() is threading.main_thread()
        self.several = several
        self.signals = (signal.SIGINT, signal.SIGTERM) if several else (signal.SIGINT,)
        self.requested, self.previous = False, {}

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self.previous = {sig: signal.signal(sig, self._request) for sig in self.signals}
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True
        if not self.several:  # a second Ctrl-C: the previous handler (KeyboardInterrupt)
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])

    def agreed(self, dp: DataParallel) -> bool:
        """Whether any process was asked to stop (every process calls this after each step)."""
        if not self.several:
            return self.requested
        return bool(dp.sum(torch.tensor([float(self.requested)])).item() > 0)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _absolute_paths(config: Config) -> None:
    for section, key in (("model", "name_or_path"), ("data", "source"), ("data", "eval_source")):
        value = getattr(getattr(config, section), key)
        if value and Path(value).expanduser().exists():
            setattr(getattr(config, section), key, str(Path(value).expanduser().resolve()))


def train(config: Config | str | Path | None = None, resume: bool = False, **overrides) -> Path:
    """Train and return the run directory. Bad data fails before the run directory is touched.

    ``config``: a :class:`~moedpo.config.Config`, a YAML path, or None for the built-in default; keyword
    ``overrides`` use ``section__key=value`` (``moedpo.train(experts__num_experts=3)``).
    """
    if not isinstance(config, Config):
        config = load_config(config, [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()])
    elif overrides:
        raise ValueError("pass overrides with a config path or None, or edit the Config object")
    t, dp = config.train, DataParallel(config.train.parallel, config.train.ddp_timeout)
    resolve_rewards(config)  # a misspelt report.rewards fails now, not after training
    resolve_report_to(t.report_to)  # and a tracker that is not installed
    _absolute_paths(config)  # the run directory must work from any working directory
    run_dir = rundir.output_dir(config, resume, dp.world_size > 1)
    rundir.check(run_dir, resume, t.overwrite)  # before the scratch reference and the data, which can take minutes;
    if resume:
        _keep_global_batch(config, find_checkpoint(run_dir), dp)
    dp.barrier()  # on every process (it only reads), so all of them stop with the same message, before any writes
    with cpu_threads(t.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) as threads:
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        own = run_dir if resume and (run_dir / DATA_FILE).exists() else None  # --resume: the run's own data and base
        config, auto = _resolve_auto(config, run_dir, resume)
        run = build_run(kselection.with_k(config, 1) if auto else config, dp.device(t.device), saved=own)
        if t.load_best_model_at_end and not run.data.eval:
            raise ConfigError("train.load_best_model_at_end=true: the data gave no held-out pairs to compare steps on")
        with rundir.RunLock(run_dir) if dp.is_main else contextlib.nullcontext():
            if dp.is_main:
                rundir.prepare(config, run_dir, resume, run.tokenizer, run.base, run.data)
                _announce(run, run_dir, threads, dp.fsdp)
            dp.barrier()
            try:
                return _train(run, run_dir, resume, dp, kselection.candidates(config, run.data) if auto else None)
            finally:  # also when it fails: a group this call started must not outlive it (a caller trains on)
                dp.close()


def _keep_global_batch(config: Config, checkpoint: Path, dp: DataParallel) -> None:
    """Pair scope: a ``--resume`` on another number of processes keeps the checkpoint's global batch (processes x
    ``per_device_train_batch_size``), with the per-device batch that makes it, and says so; else every step after
    the resume would see other batches than the run it continues. (User scope's ``users_per_batch`` is global.)"""
    state = json.loads((checkpoint / "state.json").read_text())
    if config.em.scope != "pair" or "world_size" not in state:
        return
    t, saved = config.train, state["world_size"] * state["per_device_train_batch_size"]
    if saved == dp.world_size * t.per_device_train_batch_size:
        return
    if saved % dp.world_size:
        raise ConfigError(
            f"--resume: the run took {saved} pairs a step ({state['world_size']} processes x "
            f"{state['per_device_train_batch_size']}), which {dp.world_size} processes cannot share evenly; resume "
            "with a number of processes that divides it"
        )
    t.per_device_train_batch_size = saved // dp.world_size
    if dp.is_main:
        print(
            f"moedpo: --resume on {dp.world_size} process(es): train.per_device_train_batch_size="
            f"{t.per_device_train_batch_size}, keeping the run's {saved} pairs a step",
            file=sys.stderr,
            flush=True,
        )


def _resolve_auto(config: Config, run_dir: Path, resume: bool) -> tuple[Config, bool]:
    """(the config, whether K is still to be chosen): a ``--resume`` of an ``auto`` run keeps the K it chose."""
    if config.experts.num_experts != "auto":
        return config, False
    chosen = run_dir / K_SELECTION_FILE
    if resume and chosen.exists():
        return kselection.with_k(config, json.loads(chosen.read_text())["chosen"]), False
    return config, True


def _announce(run: Run, run_dir: Path, threads: int, sharded: bool) -> None:
    d, config, experts = run.data, run.config, run.bank.pass_note(sharded)
    cpu = f"; {threads} CPU thread{'s' * (threads > 1)} of {len(cores())} cores (train.num_threads)"
    unit, tie = ("rankings", "the best scores tie") if d.rankings else ("pairs", "chosen equals rejected")
    print(
        f"moedpo: run directory {run_dir}; {len(d.train)} training and {len(d.eval)} held-out {unit}, "
        f"{d.num_truncated} truncated, {d.num_dropped} dropped (prompt >= data.max_length as TRL, or {tie}); "
        f"em.scope={config.em.scope} over {len(d.user_ids)} annotators; {d.split}"
        f"{cpu if run.bank.device.type == 'cpu' else ''}{'; ' * bool(experts)}{experts}",
        file=sys.stderr,
        flush=True,
    )


def _train(run: Run, run_dir: Path, resume: bool, dp: DataParallel, ks: list[int] | None = None) -> Path:
    """The loop: reference pass, (K chosen: ``ks``), optimizer, (resume), steps with logging, evaluation and
    checkpoints, artefacts."""
    reference_once(run, run_dir, dp)
    chosen = kselection.select_k(run.config, run_dir, dp, ks) if ks else None
    parts = chosen.parts if chosen is not None else loop_parts(run, dp)
    run, params, loop = parts.run, parts.params, parts.loop
    config, t = run.config, run.config.train
    optimizer, scheduler, start = parts.optimizer, parts.scheduler, 0
    if resume:
        path = find_checkpoint(run_dir)
        start = loop.num_steps = load_checkpoint(path, params, run.gate, optimizer, scheduler, loop, rank=dp.rank)
        if dp.is_main:
            print(f"moedpo: --resume: step {start} of {t.max_steps} from {path}", file=sys.stderr, flush=True)
    if (resume or chosen is not None) and dp.is_main:  # only now that the checkpoint fits, or K is known
        notes = (f"em.scope={config.em.scope}; {run.data.split}",)
        notes += (chosen.selection.line().removeprefix("moedpo: "),) if chosen is not None else ()
        save_config(config, run_dir / "config.yaml", notes=notes)

    logger, best = _loggers(run, run_dir, start if resume else None) if dp.is_main else (None, None)

    def checkpoint(step: int) -> dict:  # on every process at the same steps: each one's random state goes in
        """Writes step ``step``'s checkpoint; returns the whole parameters it saved."""
        rngs = dp.gather(rng_state())
        whole = dp.full_tensors(params) if dp.fsdp else params  # params.safetensors: whole, for eval and report
        if dp.fsdp:  # each process writes its shards of the parameters and optimizer state (DCP)
            folder = pending_checkpoint(run_dir, fresh=dp.is_main)
            dp.barrier()
            save_sharded(folder / SHARDED_DIR, params, optimizer)
        if dp.is_main:
            info = {"world_size": dp.world_size, "per_device_train_batch_size": t.per_device_train_batch_size}
            state = (run.gate.state_dict(), optimizer, scheduler, loop.state_dict(), rngs, info)
            save_checkpoint(run_dir, step, whole, *state, sharded=dp.fsdp)
        return whole

    with StopRequest(several=dp.world_size > 1) as stop:
        if chosen is not None:
            start = _chosen(chosen, run_dir, logger, dp)
        elif config.em.restarts > 1 and start == 0:
            start = _restarts(parts, run_dir, logger, dp)
        if start and not resume:
            checkpoint(start)
        progress = Progress(start, t.max_steps, "moedpo", enabled=dp.is_main)
        for step in range(start, t.max_steps):
            metrics = parts.step(step, progress, step + 1)
            _log_step(run, logger, best, step + 1, metrics, params)  # every process evaluates: fsdp needs them all
            periodic = t.save_steps and (step + 1) % t.save_steps == 0
            stopping = stop.agreed(dp)
            if step + 1 < t.max_steps and (periodic or stopping):
                checkpoint(step + 1)
            if stopping and step + 1 < t.max_steps:
                progress.close()
                if logger is not None:
                    logger.close()
                dp.close()
                raise TrainingInterrupted(run_dir, step + 1, t.max_steps)
    progress.close()
    whole = checkpoint(t.max_steps)  # the last step's state, for a --resume that trains on
    experts = {n: whole[n] for n in run.bank.trainable_parameters()} if dp.fsdp else None  # gathered there
    if dp.is_main:
        logger.close()
        if best is not None:
            _keep_best(best, params, run.gate, t.max_steps)
        _save_artefacts(run, run_dir, experts)
    dp.barrier()
    if t.dpo_baseline and config.experts.num_experts > 1:  # on every process: it trains distributed too
        _train_dpo_baseline(config, run_dir)
    if dp.is_main:  # fsdp: from the saved run (the sharded layers would need every process)
        session = RunSession(run_dir) if dp.fsdp else RunSession(run_dir, run)
        print(f"moedpo: report -> {report(run_dir, session)}", file=sys.stderr, flush=True)
    dp.barrier()
    dp.close()
    return run_dir


def _chosen(chosen: kselection.Chosen, run_dir: Path, logger, dp: DataParallel) -> int:
    """``num_experts=auto``: the selection said and kept, the chosen K's short-run lines logged; returns its step."""
    if dp.is_main:
        print(chosen.selection.line(), file=sys.stderr, flush=True)
        chosen.selection.save(run_dir)
        if len(chosen.restarts.scores) > 1:
            chosen.restarts.save(run_dir)
        _log_short_run(logger, chosen.lines, chosen.parts.run.config, chosen.restarts.kept)
    return chosen.selection.steps


def _log_short_run(logger, lines: list[dict], config: Config, kept: int) -> None:
    for done, metrics in enumerate(lines, 1):
        if done % config.train.logging_steps == 0:
            logger.log(done, {**metrics, "em/restart": kept, "em/num_experts": config.experts.num_experts})


def _restarts(parts: LoopParts, run_dir: Path, logger, dp: DataParallel) -> int:
    """``em.restarts`` (:mod:`moedpo.restarts`): the best restart's state and metrics lines; returns its step."""
    summary, lines = run_restarts(parts)
    if dp.is_main:
        print(summary.line(), file=sys.stderr, flush=True)
        summary.save(run_dir)
        _log_short_run(logger, lines, parts.run.config, summary.kept)
    return summary.steps


def _loggers(run: Run, run_dir: Path, resume_step: int | None) -> tuple[MetricsLogger, BestModel | None]:
    """The metrics log with the ``train.report_to`` trackers, and the best-step keeper of
    ``train.load_best_model_at_end`` (else None)."""
    t = run.config.train
    logger = MetricsLogger(run_dir, resume_step, resolve_report_to(t.report_to), run.config.to_dict())
    if not t.load_best_model_at_end:
        return logger, None
    metric, greater = best_metric(t.metric_for_best_model, t.greater_is_better)
    return logger, BestModel(run_dir, metric, greater, resume=resume_step is not None)


def _log_step(run: Run, logger: MetricsLogger, best: BestModel | None, done: int, metrics: dict, params) -> None:
    """Step ``done``'s line at logging and evaluation steps and the last one, with the held-out metrics at evaluation
    steps; under ``load_best_model_at_end`` the last step is evaluated too (the final parameters compete), and each
    evaluation that beats the best so far keeps its parameters in ``RUN/best/``."""
    t = run.config.train
    periodic = bool(t.eval_steps) and done % t.eval_steps == 0
    evaluating = bool(run.data.eval) and (periodic or (t.load_best_model_at_end and done == t.max_steps))
    if not (evaluating or done % t.logging_steps == 0 or done == t.max_steps):
        return
    if evaluating:  # on every process (``logger`` and ``best`` are rank 0's, else None)
        held_out = evaluate(run, run.data.train, run.data.eval)[0]
        metrics.update(held_out)
        if best is not None:
            best.update(done, held_out, params, run.gate.state_dict())
    if logger is not None:
        logger.log(done, metrics)


def _keep_best(best: BestModel, params: dict, gate, max_steps: int) -> None:
    """Back to the best evaluation's parameters and gate, before the artefacts and the report; says which."""
    kept = best.restore(params, gate)
    last = f"; at step {best.last[0]}: {best.last[1]:.4g}" if best.last is not None else ""
    print(
        f"moedpo: load_best_model_at_end: kept step {kept['step']} of {max_steps} ({kept['metric']} "
        f"{kept['value']:.4g}, {'higher' if kept['greater_is_better'] else 'lower'} is better{last}); its parameters "
        "are in RUN/best/, the last step's in RUN/checkpoint/",
        file=sys.stderr,
        flush=True,
    )


def _save_artefacts(run: Run, run_dir: Path, experts: dict | None = None) -> None:
    """The experts' folders (from ``experts``, their gathered tensors, under fsdp), the gate and the guide."""
    run.bank.save_experts(run_dir / "experts", **({"state_dict": experts} if experts is not None else {}))
    if (run_dir / "base").exists():  # a builtin or scratch base, kept with the run: "../../base", so a moved run
        for adapter in (run_dir / "experts").glob("expert_*/adapter_config.json"):  # directory still finds it
            adapter_config = json.loads(adapter.read_text())
            adapter_config["base_model_name_or_path"] = os.path.relpath(run_dir / "base", adapter.parent)
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
