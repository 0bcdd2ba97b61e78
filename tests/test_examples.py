"""Every example runs (with --shrink) and checks itself; a new example without a test here fails."""

import pathlib
import runpy
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
# hierarchical_model.py: tests/test_custom_model.py
EXERCISED = {
    "planted_experts.py",
    "ranking_world.py",
    "llm_ranking_world.py",
    "minmax_serving.py",
    "users_world.py",
    "hierarchical_model.py",
}


def test_every_example_is_exercised():
    assert {p.name for p in EXAMPLES.glob("*.py")} == EXERCISED


def run_example(name, *args):
    sys.argv = [name, *args]
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return exit_info.value.code


def passes(capsys, name, *args) -> str:
    """Run an example; it must exit 0 with no [FAIL] line. Returns what it printed."""
    assert run_example(name, *args) == 0
    out = capsys.readouterr().out
    assert "[FAIL]" not in out
    return out


def test_planted_experts_shrink(capsys):
    assert "annotator-type ARI" in passes(capsys, "planted_experts.py", "--shrink")


@pytest.mark.slow
def test_planted_experts_full(capsys):
    passes(capsys, "planted_experts.py")


def test_ranking_world_shrink(capsys):
    """Issue 20's ranking world, one seed: the Plackett–Luce mixture finds the types from one ranking each."""
    assert "Plackett-Luce mixture     1.00" in passes(capsys, "ranking_world.py", "--shrink")


@pytest.mark.slow
def test_ranking_world_full(capsys):
    """Seeds 0-2: ARI >= 0.9 wherever the oracle reaches 0.95, binarized pairs below 0.5 on average, top-1 at least
    0.1 above one DPO policy."""
    passes(capsys, "ranking_world.py")


def test_llm_ranking_world_shrink(tmp_path, capsys, monkeypatch):
    """The LLM ranking world's pipeline, one seed of a tiny world: every row of the table is printed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = passes(capsys, "llm_ranking_world.py", "--shrink", "--out", str(tmp_path / "w"))
    for name in ("Plackett-Luce mixture", "binarized pairs", "one DPO policy", "Bayes oracle"):
        assert f"   0  {name}" in out


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 20: LoRA experts reach ARI 0.87 on seed 1 (the oracle 1.00)")
def test_llm_ranking_world_full(tmp_path, capsys, monkeypatch):
    """Seeds 0-2, 30 annotators per type: ARI >= 0.9 wherever the oracle reaches 0.95, binarized pairs below 0.5 on
    average, top-1 at least 0.1 above one DPO policy. Known miss (strict: passing flags the fix)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    passes(capsys, "llm_ranking_world.py", "--out", str(tmp_path / "w"))


def test_minmax_serving_shrink(capsys):
    """Issue 20's majority/minority world, three seeds: min-max regret serving lifts the minority."""
    assert "min-max regret" in passes(capsys, "minmax_serving.py", "--shrink")


@pytest.mark.slow
def test_minmax_serving_full(capsys):
    """Six seeds: the minority's gain over the gate's average above 2 SE, the majority's drop below it."""
    passes(capsys, "minmax_serving.py")


def run_users_world(tmp_path, *args):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.argv = ["users_world.py", "--out", str(tmp_path / "uw"), *args]
    namespace = runpy.run_path(str(EXAMPLES / "users_world.py"), run_name="users_world")
    return namespace["main"]([*sys.argv[1:]])


def test_users_world_shrink_writes_its_report(tmp_path):
    results = run_users_world(tmp_path, "--shrink")
    report = tmp_path / "uw" / "report"
    for name in ("users.md", "users.json", "user_map.png", "new_users.png"):
        assert (report / name).stat().st_size > 200, name
    assert set(results["new_users"]) == {"exact", "amortized", "prior"}
    assert set(results["new_users"]["exact"]) == {1, 2, 4, 8, 16}
    win = results["win_rates"]["win_rate_vs_dpo"]
    assert win["low"] <= win["rate"] <= win["high"] and win["n"] == 24
    assert "Smoke run" in (report / "users.md").read_text()
    assert not (tmp_path / "uw" / "dpo" / "guide.safetensors").exists()  # K=1: no guide to train


@pytest.mark.slow
def test_users_world_full(tmp_path):
    """Issue 8's users world: the mixture beats DPO by the users' own true rewards; new users from 8 pairs."""
    results = run_users_world(tmp_path)
    assert results["ari"] >= 0.9
    assert results["win_rates"]["win_rate_vs_dpo"]["low"] >= 0.55
    assert results["new_users"]["exact"][8] >= results["seen_accuracy"] - 0.03
