"""A training run's directory, from its name to its header: checked before any model is built, locked while a
training writes it, and written only once the data is known to be good.

- :func:`output_dir` turns ``train.output_dir`` (``{time}`` filled in) into the run directory;
- :func:`check` refuses, with what to do, a path that is a file or lies under one, a folder that cannot be
  written, a non-empty folder without ``--resume`` or ``train.overwrite``, and a ``--resume`` with no complete
  checkpoint; it writes nothing, so it runs before the (possibly slow) scratch reference and the data;
- :class:`RunLock` holds ``RUN/.lock`` (an advisory ``flock``) while a training writes the directory: a second
  training on the same directory, overwrite or not, is refused instead of interleaving with the first;
- :func:`prepare` (under the lock) clears an overwritten run and writes the header: config.yaml, users.json,
  data.json and the base model of a builtin or scratch run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from moedpo.assembly import build_base
from moedpo.config import Config, ConfigError, save_config
from moedpo.runs import DATA_FILE, find_checkpoint

LOCK = ".lock"


def output_dir(config: Config, resume: bool, several_processes: bool) -> Path:
    """``train.output_dir`` with ``{time}`` filled in (stored back in the config, so config.yaml names it)."""
    name = config.train.output_dir
    if "{time}" in name:
        if several_processes:
            raise ConfigError(
                f"train.output_dir={name}: under torchrun each process would fill {{time}} with its own start time; "
                "name the folder without {time} (e.g. train.output_dir=runs/my-run)"
            )
        if resume:
            raise ConfigError("--resume needs the run's own train.output_dir (see its config.yaml)")
        config.train.output_dir = name = name.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    return Path(name)


def _contents(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []


def check(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that training could not use, before anything is built or written."""
    key = f"train.output_dir={run_dir}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{key} is a file: name a folder (it is created if it does not exist)")
    parent = next((p for p in run_dir.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{key} lies under {parent}, which is a file, not a folder")
    writable = run_dir if run_dir.exists() else parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {writable} is not writable; choose another train.output_dir")
    if resume:
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: {run_dir} does not exist; drop --resume to start this run")
        if find_checkpoint(run_dir) is None:
            raise ConfigError(
                f"--resume: no complete checkpoint in {run_dir} (training stopped before its first one was "
                "written). Start it over: the same command without --resume and with train.overwrite=true"
            )
    elif _contents(run_dir) and not overwrite:
        raise FileExistsError(
            f"{run_dir} exists and is not empty: pass --resume to continue it, train.overwrite=true to replace it, "
            "or another train.output_dir"
        )


class RunLock:
    """An exclusive advisory lock on ``RUN/.lock`` for as long as a training writes the run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.file = run_dir, None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / LOCK, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ConfigError(
                f"{self.run_dir} is being written by another moedpo training ({holder}): wait for it, or choose "
                "another train.output_dir"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def prepare(config: Config, run_dir: Path, resume: bool, tokenizer, base, data) -> None:
    """Under the lock: clear an overwritten run (checked again: another training may have finished meanwhile) and
    write the header. A resumed run keeps its header until its checkpoint is known to fit."""
    check(run_dir, resume, config.train.overwrite)
    if resume:
        return
    for path in _contents(run_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    save_config(config, run_dir / "config.yaml", notes=(f"em.scope={config.em.scope}; {data.split}",))
    (run_dir / "users.json").write_text(json.dumps(data.user_ids))
    data.save(run_dir / DATA_FILE)  # eval, routing and generation need none of the original files
    if config.model.name_or_path == "scratch":
        # the cache may be cleared: keep the folder the base was loaded from with the run
        shutil.copytree(base.config.name_or_path, run_dir / "base")
    if config.model.name_or_path == "builtin":
        # the built-in base is not on any hub: keep it with the run. Rebuilt (deterministic from the seed), since the
        # bank's adapters are already injected into ``base``
        tokenizer, base = build_base(config)
        tokenizer.save_pretrained(run_dir / "base")
        base.save_pretrained(run_dir / "base")
