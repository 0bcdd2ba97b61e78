"""The run directory (SPEC §3): metrics log, atomic checkpoints for ``--resume``, final artefacts.

    config.yaml  metrics.jsonl  experts/expert_<k>/  gate.safetensors  users.json  base/ (builtin model)
    data.json (tokenized splits: eval and generate need no original file)  reference_logps.safetensors
    checkpoint/  (params.safetensors, gate.safetensors, optimizer.pt, scheduler.pt, rng.pt, loop.json, state.json)
    personalized/<user>.json  (new annotators' posteriors, ``moedpo personalize``)  report/

Checkpoints are written to ``checkpoint.tmp`` and swapped in by renames, so a crash mid-save never spoils
the last good one. Tensors are loaded with ``weights_only=True`` / safetensors: no pickle of untrusted files.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import torch
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from moedpo.config import ConfigError

CHECKPOINT = "checkpoint"
DATA_FILE = "data.json"
REFERENCE_FILE = "reference_logps.safetensors"
GUIDE_FILE = "guide.safetensors"
GATE_FILE = "gate.safetensors"
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


def save_checkpoint(
    run_dir: Path, step: int, params: dict, gate_state: dict, optimizer, scheduler, loop_state: dict | None = None
) -> None:
    """Write everything a resumed run needs, atomically (tmp folder + renames). ``loop_state``: plain JSON of the
    EM loop (the routed schedule's baselines)."""
    tmp, final, old = run_dir / f"{CHECKPOINT}.tmp", run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp / "params.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in gate_state.items()}, tmp / "gate.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "loop.json").write_text(json.dumps(loop_state or {}))
    (tmp / "state.json").write_text(json.dumps({"step": step, "complete": True}))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The last complete checkpoint: ``checkpoint/``, else a complete ``.tmp`` or the ``.old`` left by a crash."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.tmp", f"{CHECKPOINT}.old"):
        state = run_dir / name / "state.json"
        if state.exists() and json.loads(state.read_text()).get("complete"):
            return run_dir / name
    return None


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


def load_checkpoint(path: Path, params: dict, gate, optimizer, scheduler, loop=None) -> int:
    """Restore parameters, gate, optimizer, scheduler, RNG and the EM loop's state in place; returns the step."""
    restore_parameters(path, params)
    gate.load_state_dict(load_file(path / "gate.safetensors"))
    try:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    except ValueError as err:  # parameter groups of other sizes: another optimizer layout
        problem = f"the optimizer state does not fit this run ({err}); resume with its own config.yaml"
        raise ConfigError(f"{path}: {problem}") from None
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_python_state(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if loop is not None and (path / "loop.json").exists():
        loop.load_state_dict(json.loads((path / "loop.json").read_text()))
    return json.loads((path / "state.json").read_text())["step"]


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
