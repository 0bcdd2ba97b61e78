"""Under ``torchrun``: train each run of a JSON file in turn, in one process group that this script starts and
ends (so the trains leave it open), e.g.

    torchrun --nproc_per_node 2 tests/llm/two_process_runs.py runs.json

Each run is a list of overrides, or {"overrides": [...], "resume": true, "kill": [rank, step]}: process ``rank``
kills itself (SIGKILL, as ``kill -9``) when it is about to start training step ``step`` (0-based).
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from moedpo import trainloop
from moedpo.config import load_config
from moedpo.training import train


def kill_before(rank: int, step: int) -> None:
    run_step = trainloop.LoopParts.step

    def step_or_die(self, index, *args):
        if index == step and dist.get_rank() == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return run_step(self, index, *args)

    trainloop.LoopParts.step = step_or_die


def main(path: str) -> None:
    dist.init_process_group("gloo")
    for run in json.loads(Path(path).read_text()):
        run = {"overrides": run} if isinstance(run, list) else run
        if "kill" in run:
            kill_before(*run["kill"])
        train(load_config(overrides=run["overrides"]), resume=run.get("resume", False))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
