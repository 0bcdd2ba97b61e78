"""The run directory (SPEC §3): metrics log, atomic checkpoints for ``--resume``, final artefacts.

    config.yaml  metrics.jsonl  experts/expert_<k>/  gate.safetensors  users.json  base/ (builtin model)
    data.json (tokenized splits: eval and generate need no original file)  reference_logps.safetensors
    checkpoint/  (params.safetensors, gate.safetensors, optimizer.pt, scheduler.pt, rng.pt, rng_rank<r>.pt under
                  torchrun, loop.json, state.json; under fsdp dcp/ holds the parameters and optimizer state in
                  shards instead of optimizer.pt, and params.safetensors the whole parameters)
    best/  (``train.load_best_model_at_end``: params.safetensors, gate.safetensors, state.json of the kept step)
    personalized/<user>.json  (new annotators' posteriors, ``moedpo personalize``)  report/

Checkpoints (and ``best/``) are written to ``<name>.tmp`` and swapped in by renames, so a crash mid-save never
spoils the last good one. Tensors are loaded with ``weights_only=True`` / safetensors: no pickle of untrusted files.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from moedpo.config import ConfigError
from moedpo.sharded import SHARDED_DIR, load_sharded

CHECKPOINT = "checkpoint"
GROUPS_FILE = "param_groups.json"  # a sharded checkpoint's optimizer settings (its state is in dcp/)
BEST = "best"
DATA_FILE = "data.json"
REFERENCE_FILE = "reference_logps.safetensors"
GUIDE_FILE = "guide.safetensors"
GATE_FILE = "gate.safetensors"
RESTARTS_FILE = "restarts.json"  # em.restarts: each restart's score, the kept one, the agreement of the best two
MINMAX_FILE = "report/minmax.json"  # the report's min-max-regret serving weights (moedpo generate --policy minmax)
K_SELECTION_FILE = "k_selection.json"  # experts.num_experts=auto: each K's held-out NLL, the K chosen and why
PERSONALIZED = "personalized"


def lr_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """``transformers.get_scheduler``'s schedules (cosine, linear, constant, each after a linear warmup), one step
    ahead: step s uses the factor of step s + 1 of a schedule with ``warmup_steps + 1`` warmup steps over
    ``total_steps + 1``, i.e. (s + 1) / (warmup_steps + 1) during the warmup, so no step runs at learning rate 0
    (Trainer's first step does) and the decay reaches 0 after ``total_steps``."""
    name = "constant_with_warmup" if kind == "constant" else kind
    shape = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps + 1, num_training_steps=total_steps + 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s, f=f: f(s + 1) for f in shape.lr_lambdas])


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rng_state() -> dict:
    """This process's random state: torch (CPU, and CUDA where there is one) and Python's ``random``."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_checkpoint(
    run_dir: Path,
    step: int,
    params: dict,
    gate_state: dict,
    optimizer,
    scheduler,
    loop_state: dict | None = None,
    rng_states: list[dict] | None = None,
    info: dict | None = None,
    sharded: bool = False,
) -> None:
    """Write everything a resumed run needs, atomically (tmp folder + renames). ``loop_state``: plain JSON of the
    EM loop (the routed schedule's baselines); ``rng_states``: every process's :func:`rng_state`, by rank (default:
    this process's), in ``rng.pt`` (rank 0) and ``rng_rank<r>.pt``; ``info``: plain JSON kept in ``state.json``
    beside the step (e.g. the world size and per-device batch it was saved under); ``sharded``: the processes wrote the
    parameters and optimizer state into ``checkpoint.tmp/dcp`` already (:func:`pending_checkpoint`), and the
    optimizer's settings (learning rate ...) go in ``param_groups.json``."""

    def write(tmp: Path) -> None:
        _save_tensors(tmp, params, gate_state)
        if sharded:  # each process wrote its shards of the state into tmp/dcp (moedpo.sharded); here its settings
            (tmp / GROUPS_FILE).write_text(json.dumps(param_group_settings(optimizer)))
        else:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        states = rng_states or [rng_state()]
        torch.save(states[0], tmp / "rng.pt")
        for rank, state in enumerate(states[1:], 1):
            torch.save(state, tmp / f"rng_rank{rank}.pt")
        (tmp / "loop.json").write_text(json.dumps(loop_state or {}))
        (tmp / "state.json").write_text(json.dumps({"step": step, "complete": True, **(info or {})}))

    _write_atomically(run_dir, CHECKPOINT, write, fresh=not sharded)


def pending_checkpoint(run_dir: Path, fresh: bool) -> Path:
    """``RUN/checkpoint.tmp``, where a checkpoint is written before it replaces ``RUN/checkpoint`` (``fresh``:
    emptied and made now, by the one process that does it, before the others write their shards into it)."""
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def _save_tensors(folder: Path, params: dict, gate_state: dict) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, folder / "params.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in gate_state.items()}, folder / "gate.safetensors")


FULL_DISK_BYTES = 64 * 2**20  # a checkpoint write that fails with less free than this is taken as a full disk


def _write_atomically(run_dir: Path, name: str, write, fresh: bool = True) -> None:
    """``write(tmp)`` fills ``RUN/<name>.tmp`` (made now, or, not ``fresh``, already holding the shards), which then
    replaces ``RUN/<name>`` by renames."""
    tmp, final, old = run_dir / f"{name}.tmp", run_dir / name, run_dir / f"{name}.old"
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        write(tmp)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError of its zip writer
        shutil.rmtree(tmp, ignore_errors=True)  # the last complete one stays as it was
        if isinstance(err, OSError) or shutil.disk_usage(run_dir).free > FULL_DISK_BYTES:
            raise
        raise OSError(errno.ENOSPC, "No space left on device while writing a checkpoint", str(tmp)) from err
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path, name: str = CHECKPOINT) -> Path | None:
    """The last complete checkpoint: ``checkpoint/``, else a complete ``.tmp`` or the ``.old`` left by a crash
    (``name="best"``: the same for ``best/``)."""
    for folder in (name, f"{name}.tmp", f"{name}.old"):
        state = run_dir / folder / "state.json"
        if state.exists() and json.loads(state.read_text()).get("complete"):
            return run_dir / folder
    return None


def final_parameters(run_dir: Path, load_best: bool) -> Path | None:
    """Where a finished run's parameters are: ``best/`` under ``train.load_best_model_at_end``, else the last
    checkpoint (which also holds the last step's under load_best, for ``--resume``)."""
    best = find_checkpoint(run_dir, BEST) if load_best else None
    return best if best is not None else find_checkpoint(run_dir)


def best_metric(metric: str | None, greater_is_better: bool | None) -> tuple[str, bool]:
    """``train.metric_for_best_model`` as an ``eval/`` key (the prefix is optional, as transformers' ``eval_``;
    empty: ``eval/mixture_nll``, the held-out loss) and whether higher is better: ``greater_is_better``, else as
    transformers infers it, lower for a loss (names ending in ``loss`` or ``nll``), higher for anything else."""
    key = metric or "mixture_nll"
    key = key if key.startswith("eval/") else f"eval/{key}"
    return key, (not key.endswith(("loss", "nll"))) if greater_is_better is None else greater_is_better


class BestModel:
    """``train.load_best_model_at_end``: at each evaluation, whether the held-out metric beat the best so far
    (strictly, as transformers), and if so that step's parameters and gate in ``RUN/best/`` (atomically). A resumed
    run continues from ``best/`` (a best written after the checkpoint is what the replayed steps reproduce)."""

    def __init__(self, run_dir: Path, metric: str, greater_is_better: bool, resume: bool):
        self.run_dir, self.metric, self.greater = run_dir, metric, greater_is_better
        found = find_checkpoint(run_dir, BEST) if resume else None
        self.state = json.loads((found / "state.json").read_text()) if found is not None else None
        if self.state is not None and self.state["metric"] != metric:  # another metric: start over
            self.state = None
        self.last: tuple[int, float] | None = None

    def update(self, step: int, metrics: dict, params: dict, gate_state: dict) -> bool:
        if self.metric not in metrics:
            names = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, float)))
            raise ConfigError(
                f"train.metric_for_best_model={self.metric.removeprefix('eval/')!r}: not a held-out metric of this "
                f"run; its evaluation gives {names} (fix it, then continue with --resume)"
            )
        value = float(metrics[self.metric])
        self.last = (step, value)
        best = None if self.state is None else self.state["value"]
        if best is not None and not (value > best if self.greater else value < best):
            return False
        self.state = {"step": step, "metric": self.metric, "value": value, "greater_is_better": self.greater}

        def write(tmp: Path) -> None:
            _save_tensors(tmp, params, gate_state)
            (tmp / "state.json").write_text(json.dumps({**self.state, "complete": True}))

        _write_atomically(self.run_dir, BEST, write)
        return True

    def restore(self, params: dict, gate) -> dict:
        """Copy the kept step's parameters and gate back in place; returns its state (step, metric, value)."""
        if self.state is None:
            raise ValueError("load_best_model_at_end: no evaluation was recorded")
        found = find_checkpoint(self.run_dir, BEST)
        restore_parameters(found, params)
        gate.load_state_dict(load_file(found / "gate.safetensors"))
        return self.state


def restore_parameters(path: Path, params: dict) -> None:
    """Copy the checkpoint's trainable parameters into ``params`` (name -> tensor) in place. The two sets of names
    must agree: a checkpoint written with other experts.*, em.guide or gate settings is refused, by name."""
    saved = load_file(path / "params.safetensors")
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        found = [f"lacks {len(missing)} parameters this config trains (e.g. {missing[0]})"] if missing else []
        found += [f"has {len(extra)} this config does not (e.g. {extra[0]})"] if extra else []
        raise ConfigError(
            f"{path}: the checkpoint {' and '.join(found)}; it was written with other experts.*, gate.* or em.guide "
            f"settings: resume with the run's own config.yaml ({path.parent / 'config.yaml'})"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name].to(param.device, param.dtype))


def load_checkpoint(path: Path, params: dict, gate, optimizer, scheduler, loop=None, rank: int = 0) -> int:
    """Restore parameters, gate, optimizer, scheduler, RNG and the EM loop's state in place; returns the step.
    ``rank`` takes that process's random state where the checkpoint has one (a run saved with as many processes or
    more), else rank 0's."""
    if (path / SHARDED_DIR).exists():  # written under fsdp: DCP reshards it to this run, sharded or whole
        _load_sharded(path, params, optimizer)
    else:
        _load_whole(path, params, optimizer)
    gate.load_state_dict(load_file(path / "gate.safetensors"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    own = path / f"rng_rank{rank}.pt"
    rng = torch.load(own if rank and own.exists() else path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_python_state(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if loop is not None and (path / "loop.json").exists():
        loop.load_state_dict(json.loads((path / "loop.json").read_text()))
    return json.loads((path / "state.json").read_text())["step"]


def _load_whole(path: Path, params: dict, optimizer) -> None:
    if any(isinstance(p, DTensor) for p in params.values()):
        raise ConfigError(
            f"{path}: this checkpoint was written without train.parallel=fsdp (whole optimizer state, no dcp/); "
            "resume it with train.parallel=auto or ddp"
        )
    restore_parameters(path, params)
    try:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    except ValueError as err:  # parameter groups of other sizes: another optimizer layout
        problem = f"the optimizer state does not fit this run ({err}); resume with its own config.yaml"
        raise ConfigError(f"{path}: {problem}") from None


def _load_sharded(path: Path, params: dict, optimizer) -> None:
    try:
        load_sharded(path / SHARDED_DIR, params, optimizer)
    except ValueError as err:
        raise ConfigError(f"{err}: resume with the run's own config.yaml ({path.parent / 'config.yaml'})") from None
    groups = json.loads((path / GROUPS_FILE).read_text())
    if len(groups) != len(optimizer.param_groups):
        found = f"{len(groups)} optimizer parameter groups, this run has {len(optimizer.param_groups)}"
        raise ConfigError(f"{path}: {found}: resume with the run's own config.yaml")
    for group, saved in zip(optimizer.param_groups, groups):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def param_group_settings(optimizer) -> list[dict]:
    """Each parameter group's settings (learning rate, betas, weight decay ...) as plain JSON, without its
    parameters: what ``optimizer.state_dict()`` keeps besides the state."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _as_python_state(state):
    version, internal, gauss = state
    return version, tuple(internal), gauss


@dataclass
class Personalization:
    """A new annotator's distributions over a run's experts (lists of K floats), from ``moedpo personalize``."""

    user: str
    num_pairs: int
    prior: list[float]
    exact: list[float]
    amortized: list[float] | None = None

    @property
    def expert(self) -> int:
        """The expert that generation routes this annotator to: the exact posterior's top one."""
        return max(range(len(self.exact)), key=self.exact.__getitem__)

    def save(self, run_dir: Path) -> Path:
        path = personalization_path(run_dir, self.user)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path


def personalization_path(run_dir: Path, user: str) -> Path:
    """``RUN/personalized/<user>.json``, the name percent-encoded: distinct names never share a file."""
    return Path(run_dir) / PERSONALIZED / f"{quote(user, safe='')}.json"


def load_personalization(run_dir: Path, user: str) -> Personalization | None:
    path = personalization_path(run_dir, user)
    if not path.exists():
        return None
    return Personalization(**json.loads(path.read_text()))
