"""The benchmark scripts still run (one tiny step each) and print their ratio tables."""

import pathlib
import subprocess
import sys

import pytest

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


@pytest.mark.slow
def test_vs_trl_runs():
    out = run("vs_trl.py", "--steps", "1", "--hidden", "32", "--layers", "2")
    assert "TRL DPOTrainer" in out and "moedpo lora K=4" in out
