"""Two processes (torchrun, gloo) take the same steps as one process with the whole global batch."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from moedpo.config import load_config
from moedpo.runs import read_metrics
from moedpo.training import train

SETTINGS = [
    "model.hidden_size=32",
    "data.annotators_per_type=3",
    "data.pairs_per_annotator=12",
    "train.users_per_batch=2",
    "train.max_steps=8",
    "train.eval_every=0",
    "train.checkpoint_every=0",
]


def test_two_processes_match_one(tmp_path):
    single = train(load_config(overrides=[f"train.output_dir={tmp_path / 'one'}", *SETTINGS]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "moedpo.cli",
        "train",
        f"train.output_dir={tmp_path / 'two'}",
        *SETTINGS,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(tmp_path / "two")[-1]["world_size"] == 2 and read_metrics(single)[-1]["world_size"] == 1
    # each rank saw one annotator per step: rank 0 logs its own half of the global batch
    assert read_metrics(tmp_path / "two")[0]["loss"] != read_metrics(single)[0]["loss"]
    expected = load_file(single / "checkpoint" / "params.safetensors")
    got = load_file(tmp_path / "two" / "checkpoint" / "params.safetensors")
    assert expected.keys() == got.keys()
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst < 1e-5, f"max parameter difference {worst:.3g}"
    gate_one, gate_two = load_file(single / "gate.safetensors"), load_file(tmp_path / "two" / "gate.safetensors")
    assert torch.allclose(gate_one["logits"], gate_two["logits"], atol=1e-6)
    assert (tmp_path / "two" / "experts" / "expert_1" / "adapter_model.safetensors").exists()
