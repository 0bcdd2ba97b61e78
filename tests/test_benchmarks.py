"""The benchmark scripts still run (one tiny step each) and print their ratio tables."""

import json
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


def test_parallel_check_asserts_ddp_and_fsdp_equal_no_parallelism():
    """DDP and FSDP2 in a group of one (gloo) against no parallelism, lora and heads, em and gumbel: asserted
    inside."""
    out = run("parallel_check.py", "--steps", "1", "--warmup", "1", "--experts", "2")
    assert out.count("loss gap 0.0e+00") == 8 and out.count(" fsdp (x") == 4 and "heads gumbel" in out


@pytest.mark.slow
def test_memory_model_holds_on_a_check_shape():
    """docs/scaling.md's memory model against the profiler's peak on a shape it was not fitted on (asserted inside,
    within 15%; about 2 minutes on 2 busy cores)."""
    out = run("memory_model.py", "--shapes", "2")
    assert "(check): measured" in out


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


def _gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # gpu_check imports step_cost, as when run from benchmarks/
    import gpu_check

    return gpu_check


def test_gpu_check_fused_head_asserts_on_cpu(monkeypatch):
    """gpu_check's fused-head check, small and on CPU under bfloat16 autocast (no memory assert on CPU): it passes,
    and a fused head 10% off (values and gradients) fails it."""
    from moedpo.experts import logprobs

    gpu_check = _gpu_check(monkeypatch)
    small = dict(device="cpu", vocab_size=512, hidden_size=64, rows=300)
    result = gpu_check.fused_head_check(**small)
    assert result["chunks"] == 3 and result["peak_bytes"] is None
    assert result["logps"] <= gpu_check.LOGP_TOL and max(result["grads"].values()) <= gpu_check.GRAD_TOL
    assert {"hidden", "base_layer.weight"} <= result["grads"].keys() and any("lora_B" in n for n in result["grads"])
    fused = logprobs.fused_head_log_softmax
    monkeypatch.setattr(logprobs, "fused_head_log_softmax", lambda *args: 1.1 * fused(*args))
    with pytest.raises(AssertionError, match="fused head log-probs"):
        gpu_check.fused_head_check(**small)


def test_gpu_check_margins_assert_on_cpu(monkeypatch):
    gpu_check = _gpu_check(monkeypatch)
    agreement = gpu_check.margins_check(device="cpu", vocab_size=256, hidden_size=64, num_layers=2, batch=8, seq=32)
    assert gpu_check.SIGN_AGREEMENT <= agreement <= 1.0


def test_gpu_check_grouped_pass_asserts_on_cpu(monkeypatch):
    """gpu_check's grouped-pass check, small and on CPU under bfloat16 autocast: it passes, and a grouped pass whose
    LoRA deltas are 10% off fails it."""
    from moedpo.experts import grouped_lora

    gpu_check = _gpu_check(monkeypatch)
    small = dict(device="cpu", vocab_size=256, hidden_size=64, num_layers=2, batch=4, seq=32)
    errors = gpu_check.grouped_check(**small)
    assert errors["grouped"]["logps"] <= 2 * errors["in_turn"]["logps"] + gpu_check.U_BF16
    assert len(errors["grouped"]) > 10  # log-probs and every adapter's gradient
    delta = grouped_lora.grouped_delta
    monkeypatch.setattr(grouped_lora, "grouped_delta", lambda *args: 1.1 * delta(*args))
    with pytest.raises(AssertionError, match="grouped pass"):
        gpu_check.grouped_check(**small)
