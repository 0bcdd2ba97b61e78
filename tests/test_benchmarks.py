"""The benchmark scripts still run (one tiny step each) and print their ratio tables."""

import json
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def run(script, *args):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=300, cwd=BENCHMARKS
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_step_cost_runs():
    out = run("step_cost.py", "--steps", "1", "--warmup", "0", "--experts", "1", "2")
    assert "lora-sparse" in out and "x K=1" in out


def test_vs_trl_runs(tmp_path):
    rows = ["heads top_layers=2, K=1", "heads top_layers=2, K=4, guide"]
    out = run("vs_trl.py", "--shape", "small", "--steps", "2", "--warmup", "0", "--rounds", "1", "--out",
              str(tmp_path / "r.json"), "--only", *rows)  # fmt: skip
    assert "TRL DPOTrainer, LoRA all linear" in out and "moedpo heads top_layers=2, K=1" in out
    assert "moedpo heads top_layers=2, K=4, guide-routed" in out
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    heads = rows["moedpo heads top_layers=2, K=1"]
    assert heads["x_trl_full_ft"] > 0 and len(heads["steps_s"]) == 2 and heads["best_s_per_step"] <= heads["s_per_step"]
    # one expert on 2 of 4 layers, frozen trunk, head on completion positions only: well under TRL's FLOPs
    assert rows["TRL DPOTrainer, full fine-tune"]["flops_x_trl_full_ft"] == 1.0
    assert 0.2 < heads["flops_x_trl_full_ft"] < 0.5
