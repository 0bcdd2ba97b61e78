"""``moedpo sft --config FILE [key=value]``: a reference policy from the data. Fine-tunes ``model.name_or_path``
(builtin, a local folder or a hub name) on ``data.source``'s prompts and preferred completions
(:mod:`moedpo.reference.finetune`) and writes a model folder that ``model.name_or_path`` accepts.

Under ``torchrun`` the fine-tune runs once, on rank 0, which writes the folder; the other ranks return None at once
(two processes used to train the same model side by side and write the same files at the same time)."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

from moedpo.assembly import build_base
from moedpo.config import Config, load_config, save_config
from moedpo.data.sources import reference_rows
from moedpo.distributed import launcher_rank
from moedpo.reference.finetune import fine_tune


def sft(config: Config | str | Path | None = None, resume: bool = False) -> Path | None:
    """Fine-tune ``model.name_or_path`` on the data's preferred completions; returns the model folder (None on a
    ``torchrun`` rank other than 0)."""
    if not isinstance(config, Config):
        config = load_config(config)
    rank = launcher_rank()
    if rank != 0:
        print(f"moedpo sft: rank {rank} leaves the fine-tune to rank 0, which writes the model folder", file=sys.stderr)
        return None
    out = config.sft.output_dir
    if "{time}" in out:
        if resume:
            raise FileNotFoundError("--resume needs the run's own sft.output_dir")
        out = out.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    output_dir = Path(out)
    if output_dir.exists() and any(output_dir.iterdir()) and not resume:
        raise FileExistsError(f"{output_dir} exists and is not empty: pass --resume, or another sft.output_dir")
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    rows = reference_rows(config)  # validated before anything is written
    tokenizer, model = build_base(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "sft_config.yaml")
    print(f"moedpo sft: {config.model.name_or_path} on {config.data.source} -> {output_dir}", file=sys.stderr)
    return fine_tune(config, tokenizer, model, rows, output_dir, resume=resume)
