"""Per-type figures in every report (issue 20 item 4) and min-max-regret serving from a trained run (item 3)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moedpo.cli import main
from moedpo.eval.evaluate import per_type_accuracy
from moedpo.eval.regret import minmax_regret_weights, regrets

SMALL = ["model.hidden_size=32", "data.annotators_per_type=3", "data.pairs_per_annotator=8", "train.max_steps=10",
         "train.num_threads=1"]  # fmt: skip


def test_per_type_accuracy_by_hand():
    """Types a, a, b, None: the mixture right on 1 of a's 2 and on b's 1; routing right on both a's, not on b's."""
    out = per_type_accuracy(["a", "a", "b", None], torch.tensor([1.0, 0, 1, 1]), torch.tensor([1.0, 1, 0, 0]))
    assert out == {
        "eval/a/rewards/accuracies": 0.5, "eval/top1/a/rewards/accuracies": 1.0,
        "eval/b/rewards/accuracies": 1.0, "eval/top1/b/rewards/accuracies": 0.0,
        "eval/worst_type/rewards/accuracies": 0.5, "eval/top1/worst_type/rewards/accuracies": 0.0,
    }  # fmt: skip
    assert per_type_accuracy([None, None], torch.ones(2), torch.ones(2)) == {}


def test_the_report_names_the_worst_type_and_generate_serves_min_max(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, f"train.output_dir={out}"]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "## Per annotator type" in report and "Worst type: mixture (posterior): **" in report
    metrics = json.loads((out / "report" / "eval.json").read_text())["metrics"]
    assert {"eval/bright/rewards/accuracies", "eval/worst_type/rewards/accuracies"} <= metrics.keys()
    saved = json.loads((out / "report" / "minmax.json").read_text())
    assert saved["types"] == ["bright", "dark"]
    utility = torch.tensor(saved["utilities"], dtype=torch.float64)
    assert utility[0, 0] == pytest.approx(metrics["eval/expert_0/bright/rewards/accuracies"])
    weights = torch.tensor(saved["weights"], dtype=torch.float64)
    torch.testing.assert_close(weights, minmax_regret_weights(utility))
    gate = torch.tensor(saved["gate_weights"], dtype=torch.float64)  # a fixed gate: its proportions, every prompt
    proportions = torch.softmax(load_file(out / "gate.safetensors")["net.logits"].double().reshape(-1), -1)
    torch.testing.assert_close(gate, proportions, atol=1e-6, rtol=0)
    assert float(regrets(utility, weights).max()) <= float(regrets(utility, gate).max()) + 1e-9
    capsys.readouterr()
    for seed in range(6):
        assert main(["generate", str(out), "--prompt", "describe the garden :", "--policy", "minmax",
                     "--seed", str(seed), "--max-new-tokens", "2"]) == 0  # fmt: skip
        line = capsys.readouterr().out
        k = int(torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(seed)))
        assert line.startswith(f"[expert {k}]")
    assert main(["generate", str(out), "--prompt", "x", "--policy", "minmax", "--expert", "0"]) == 2
    assert "leave out --user and --expert" in capsys.readouterr().err
    (out / "report" / "minmax.json").unlink()
    assert main(["generate", str(out), "--prompt", "describe the garden :", "--policy", "minmax"]) == 2
    assert "no min-max serving weights" in capsys.readouterr().err
