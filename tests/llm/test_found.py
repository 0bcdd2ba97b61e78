"""Every report and console end with what was found, with or without a group column: per expert its annotators
(or held-out pairs), their posteriors and held-out accuracy, assignments.csv, and plain warnings (issue 19, item 2)."""

import csv
import json

import pytest
import torch

from moedpo.cli import main
from moedpo.data.builtin import make_builtin_rows
from moedpo.eval.found import Evidence, calibration, found_lines

SMALL = ["model.hidden_size=32", "data.annotators_per_type=3", "data.pairs_per_annotator=8", "train.eval_steps=0"]


def test_found_lines_by_hand():
    """Units 0, 1 on expert 0 (posteriors 0.9, 0.8: mean 0.85), unit 2 on expert 1 (0.55), none on expert 2; mean
    confidence 0.75 is above (1 + 1/3) / 2 = 0.667, so no "weak" sentence; NLL 0.8 > ln 2; 0.6 < DPO's 0.7."""
    evidence = Evidence(torch.tensor([0, 0, 1]), torch.tensor([0.9, 0.8, 0.55]), 3, "annotators", mixture_nll=0.8,
                        mixture_accuracy=0.6, dpo_accuracy=0.7)  # fmt: skip
    lines, named = found_lines(evidence, [0.75, None, None])
    assert "| 0 | 2 | 67% | 0.850 | 0.750 |" in lines and "| 1 | 1 | 33% | 0.550 | - |" in lines
    assert "| 2 | 0 | 0% | - | - |" in lines
    text = "\n".join(lines)
    assert "Expert 2 serves no annotators" in text and "above ln 2" in text and "below one DPO policy's" in text
    assert "posteriors are weak" not in text
    assert [d["name"] for d in named] == ["collapse", "overconfident_experts", "below_dpo"]
    calm = Evidence(torch.tensor([0, 1]), torch.tensor([0.99, 0.98]), 2, "annotators", 0.3, calibration=(0.985, 0.8),
                    start_agreement=1.0)  # fmt: skip
    assert "No sign of weak evidence" in "\n".join(found_lines(calm, [0.9, 0.8])[0])


def test_calibration_by_hand():
    """Annotator 7: posterior (0.9, 0.1), its two held-out pairs have margins h (1, -1) and (2, 0): mean log
    sigmoid favours expert 0 = its top (agrees). Annotator 3: (0.2, 0.8), one pair (3, -3): expert 0 predicts
    best, its top is 1 (disagrees). Annotator 5 has no held-out pair and is left out. Confidence (0.9 + 0.8) / 2."""
    q = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    h = torch.tensor([[1.0, -1.0], [3.0, -3.0], [2.0, 0.0]])
    sure, best = calibration(q, torch.tensor([7, 3, 5]), h, torch.tensor([7, 3, 7]), beta=0.5)
    assert sure == pytest.approx(0.85) and best == 0.5
    flagged = Evidence(torch.tensor([0, 1]), torch.tensor([0.9, 0.8]), 2, "annotators", calibration=(0.85, 0.5),
                       start_agreement=0.3)  # fmt: skip
    assert [d["name"] for d in found_lines(flagged, [0.9, 0.8])[1]] == ["overconfident_posteriors", "start_disagrees"]


def test_report_and_console_say_what_was_found_without_a_group_column(tmp_path, capsys):
    rows = tmp_path / "prefs.jsonl"  # the built-in world's rows, its group column removed
    ungrouped = [{k: v for k, v in r.items() if k != "group"} for r in make_builtin_rows(3, 8)]
    rows.write_text("".join(json.dumps(r) + "\n" for r in ungrouped))
    run = tmp_path / "run"
    assert main(["train", f"data.source={rows}", *SMALL, "train.max_steps=8", f"train.output_dir={run}"]) == 0
    err = capsys.readouterr().err
    report = (run / "report" / "report.md").read_text()
    assert "## What was found" in report and "| expert | annotators |" in report and "## What was found" in err
    with (run / "report" / "assignments.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and {r["annotator"] for r in table} == {f"annotator_{i:03d}" for i in range(6)}
    for r in table:
        q = [float(r[f"posterior_{k}"]) for k in range(2)]
        assert abs(sum(q) - 1) < 1e-3 and int(r["expert"]) == max(range(2), key=q.__getitem__)


def test_weak_evidence_is_said_in_plain_words(tmp_path, capsys):
    """A learning rate of 0 leaves the experts where they started: nothing tells the annotators apart."""
    run = tmp_path / "run"
    args = ["train", *SMALL, "train.max_steps=2", "train.learning_rate=0", "experts.init_std=0.001"]
    assert main([*args, f"train.output_dir={run}"]) == 0
    report = (run / "report" / "report.md").read_text()
    assert "The posteriors are weak" in report and "The posteriors are weak" in capsys.readouterr().err
    pair = tmp_path / "pair"
    assert main([*args, "em.scope=pair", f"train.output_dir={pair}"]) == 0
    assert "| expert | held-out pairs |" in (pair / "report" / "report.md").read_text()


def test_an_overconfident_learning_rate_is_named_in_eval_json(tmp_path):
    """Learning rate 0.1 without clipping, beta 2 and 9 training pairs per annotator: the experts memorise and the
    held-out mixture NLL ends above ln 2 (1.05 here), which eval.json names (with the collapse it causes)."""
    run = tmp_path / "run"
    args = ["train.learning_rate=0.1", "train.max_grad_norm=", "em.beta=2", "data.pairs_per_annotator=12"]
    assert main(["train", *args, "report.num_prompts=0", "train.eval_steps=0", f"train.output_dir={run}"]) == 0
    saved = json.loads((run / "report" / "eval.json").read_text())
    assert saved["metrics"]["eval/mixture_nll"] > 0.693
    assert "overconfident_experts" in [d["name"] for d in saved["diagnostics"]]
