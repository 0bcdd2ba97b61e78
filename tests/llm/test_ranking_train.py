"""``moedpo train`` on rankings (issue 20): the built-in ranking world and a user's JSONL of scored completions
train a Plackett–Luce mixture end to end, evaluate on held-out rankings, report, resume and personalize; what
rankings do not take is refused by name."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moedpo.cli import main
from moedpo.config import Config
from moedpo.data.builtin_rankings import make_builtin_ranking_rows, ranking_reward
from moedpo.data.sources import normalised
from moedpo.reference.finetune import sequences

SMALL = ["data.source=builtin:rankings", "data.annotators_per_type=4", "data.rankings_per_annotator=3",
         "experts.num_experts=3", "model.hidden_size=32", "train.num_threads=1"]  # fmt: skip


def run(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_the_builtin_ranking_world_trains_evaluates_and_reports(tmp_path, capsys):
    out = tmp_path / "rk"
    code, err = run(capsys, "train", *SMALL, "train.max_steps=12", f"train.output_dir={out}")
    assert code == 0, err
    assert "24 training and 12 held-out rankings" in err and "or the best scores tie" in err
    metrics = json.loads((out / "report" / "eval.json").read_text())["metrics"]
    assert {"eval/rankings/top1", "eval/rankings/kendall_tau", "eval/mixture_nll", "eval/ari"} <= metrics.keys()
    assert metrics["eval/chance_nll"] == pytest.approx(sum(map(torch.log, torch.arange(2.0, 5.0))).item())
    assert 0 <= metrics["eval/rewards/accuracies"] <= 1 and -1 <= metrics["eval/rankings/kendall_tau"] <= 1
    report = (out / "report" / "report.md").read_text()
    assert "## Held-out rankings" in report and "## Recovered vs true types" in report
    example = json.loads((out / "report" / "eval.json").read_text())["examples"][0]
    assert len(example["expert_completion_logps"]) == 4 and len(example["expert_completion_logps"][0]) == 3
    reference = load_file(out / "reference_logps.safetensors")
    assert reference["completion_counts"].tolist() == [4] * 36  # every ranking, held-out ones included
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rewards/accuracies", "expert_2/rewards/margins", "em/expert_usage_1"} <= lines[-1].keys()
    code, err = run(capsys, "eval", str(out))
    assert code == 0, err


def test_a_ranking_run_resumes_to_the_same_parameters(tmp_path, capsys, at_step, monkeypatch):
    steps = [*SMALL, "train.max_steps=6", "train.save_steps=3"]
    assert run(capsys, "train", *steps, f"train.output_dir={tmp_path / 'whole'}")[0] == 0
    at_step(4)  # a crash as step 5 begins
    assert run(capsys, "train", *steps, f"train.output_dir={tmp_path / 'cut'}")[0] == 130
    monkeypatch.undo()
    assert run(capsys, "train", "--config", str(tmp_path / "cut" / "config.yaml"), "--resume")[0] == 0
    expected, got = (load_file(tmp_path / r / "checkpoint/params.safetensors") for r in ("whole", "cut"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_users_file_of_scores_trains_and_personalizes(tmp_path, capsys):
    """UltraFeedback-style rows: four completions with scores (ties included) and an annotator id; a new
    annotator is personalized from two rankings, and pairs for a ranking run are refused by name."""
    rows = make_builtin_ranking_rows(4, 3, seed=5)
    for row in rows:  # rankings -> per-completion scores: the type's reward, rounded (ties appear)
        row["scores"] = [round(ranking_reward(c, row["group"])) for c in row["completions"]]
        del row["ranking"]
    path = tmp_path / "scored.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    code, err = run(capsys, "train", f"data.source={path}", "experts.num_experts=3", "model.hidden_size=32",
                    "train.max_steps=8", "train.num_threads=1", f"train.output_dir={out}")  # fmt: skip
    assert code == 0, err
    dropped = sum(sorted(r["scores"])[-1] == sorted(r["scores"])[-2] for r in rows)  # the best two tie
    assert f"{dropped} dropped" in err
    new = tmp_path / "new.jsonl"
    new.write_text("\n".join(json.dumps({**r, "user_id": "newcomer"}) for r in rows[:2]))
    code, err = run(capsys, "personalize", str(out), "--pairs", str(new), "--user", "newcomer")
    assert code == 0, err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "describe the garden :", "chosen": " calm day", "rejected": " wild day"}))
    code, err = run(capsys, "personalize", str(out), "--pairs", str(pairs), "--user", "n")
    assert code == 2 and f"{pairs}: holds pairs, and this run was trained on rankings" in err


def test_held_out_data_of_the_other_kind_is_refused_before_anything_is_written(tmp_path, capsys):
    """The trial's worst bug: rankings trained with held-out pairs (or the reverse) crashed with a KeyError."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "describe the garden :", "chosen": " calm day", "rejected": " wild day",
                                 "user_id": "annotator_000"}))  # fmt: skip
    code, err = run(capsys, "train", *SMALL, f"data.eval_source={pairs}", f"train.output_dir={tmp_path / 'x'}")
    assert code == 2 and f"{pairs}: row 1 (counting from 1): field 'chosen': holds pairs" in err
    assert "while data.source=builtin:rankings holds rankings" in err and not (tmp_path / "x" / "data.json").exists()


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("em.schedule=routed", "em.schedule=routed routes pairs"),
        ("train.loss_type=ipo", "train.loss_type=ipo is a pairwise loss"),
        ("em.label_smoothing=0.1", "has no Plackett–Luce link"),
    ],
)
def test_what_rankings_do_not_take_is_refused_by_name(tmp_path, capsys, override, words):
    extra = ["em.guide=amortized"] if override == "em.schedule=routed" else []
    code, err = run(capsys, "train", *SMALL, override, *extra, f"train.output_dir={tmp_path / 'x'}")
    assert code == 2 and words in err and "holds rankings" in err
    assert not (tmp_path / "x" / "checkpoint").exists()


def test_a_reference_fine_tunes_on_each_rankings_best_completion(tokenizer):
    """moedpo sft (and scratch) on rankings: prompt + the first-ranked completion, the loss on the completion."""
    config = Config()
    config.data.source = "rankings"
    record = {"prompt": "describe the garden :", "completions": [" calm day", " wild day", " grey sky"],
              "ranking": [2, 0, 1]}  # fmt: skip
    ((ids, mask),) = sequences(config, tokenizer, normalised([record], "rankings"))
    prompt = tokenizer("describe the garden :")["input_ids"]
    assert tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True).split() == ["grey", "sky"]
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))  # sft.completion_only_loss, the default
