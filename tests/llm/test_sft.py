"""moedpo sft (a reference policy from the data) and model.name_or_path=scratch (no model at all)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moedpo.assembly import build_base
from moedpo.cli import main
from moedpo.config import load_config
from moedpo.data.sources import reference_rows
from moedpo.reference import finetune, scratch
from moedpo.reference.finetune import collate_sequences, sequences, sft_loss
from moedpo.reference.scratch import scratch_reference
from moedpo.sft import sft
from moedpo.training import train

SMALL = ["model.hidden_size=32", "data.annotators_per_type=2", "data.pairs_per_annotator=6", "sft.logging_steps=1"]


def config(tmp_path, *overrides, name="sft"):
    return load_config(overrides=[f"sft.output_dir={tmp_path / name}", *SMALL, *overrides])


def test_sft_writes_a_model_folder_that_training_accepts(tmp_path):
    folder = sft(config(tmp_path, "sft.max_steps=25", "sft.learning_rate=1e-2"))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.6 * records[0]["loss"] and {"mean_token_accuracy", "learning_rate"} <= set(
        records[0]
    )
    model = AutoModelForCausalLM.from_pretrained(folder)  # a plain Hugging Face folder
    assert AutoTokenizer.from_pretrained(folder).pad_token == "<pad>" and model.config.hidden_size == 32
    run = train(load_config(overrides=[*SMALL, f"model.name_or_path={folder}", "train.max_steps=2",
                                       f"train.output_dir={tmp_path / 'run'}", "train.eval_steps=0"]))  # fmt: skip
    assert (run / "experts" / "expert_0" / "adapter_config.json").exists()


@pytest.mark.parametrize("completion_only", [True, False])
def test_sft_loss_is_the_mean_nll_of_the_preferred_completion(tmp_path, completion_only):
    cfg = config(tmp_path, f"sft.completion_only_loss={str(completion_only).lower()}")
    tokenizer, model = build_base(cfg)
    pairs = sequences(cfg, tokenizer, reference_rows(cfg))[:3]
    loss, _ = sft_loss(model, collate_sequences(pairs, tokenizer.pad_token_id, "cpu"))
    total, count = 0.0, 0
    for ids, mask in pairs:  # one sequence at a time, float64, no padding
        logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(1, len(ids)):
            if mask[t]:
                total, count = total - logps[t - 1, ids[t]], count + 1
    assert count == sum(sum(m[1:]) for _, m in pairs)
    assert completion_only == all(m[0] == 0 for _, m in pairs)
    assert torch.allclose(loss.double(), total / count, atol=1e-5)


def test_sft_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    steps = ["sft.max_steps=10", "sft.save_steps=4"]
    reference = sft(config(tmp_path, *steps, name="whole"))
    original = finetune.Progress.update

    def crash(self, step, **values):
        if step == 7:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step, **values)

    monkeypatch.setattr(finetune.Progress, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        sft(config(tmp_path, *steps, name="crashed"))
    monkeypatch.setattr(finetune.Progress, "update", original)
    resumed = sft(config(tmp_path, *steps, name="crashed"), resume=True)
    a = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the crashed run's lines after its checkpoint (5-7) are not kept twice


def test_sft_refuses_to_overwrite_a_folder(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["sft", f"sft.output_dir={tmp_path / 'busy'}", *SMALL]) == 2
    assert "not empty" in capsys.readouterr().err


def test_scratch_reference_is_built_once_per_data_and_kept_with_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDPO_CACHE", str(tmp_path / "cache"))
    options = [
        "sft.max_steps=6",
        "sft.scratch_hidden_size=32",
        "sft.scratch_num_layers=1",
        "sft.scratch_vocab_size=400",
    ]
    cfg = load_config(overrides=[*SMALL, "model.name_or_path=scratch", *options])
    folder = scratch_reference(cfg, reference_rows(cfg))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = " describe the sunny garden : warm wind"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: any text round-trips
    assert tokenizer.convert_ids_to_tokens(tokenizer(" sunny")["input_ids"])[0].startswith("Ġ")
    monkeypatch.setattr(scratch, "fine_tune", lambda *a, **k: pytest.fail("the cached reference was rebuilt"))
    assert scratch_reference(cfg, reference_rows(cfg)) == folder
    other = load_config(overrides=[*SMALL, "model.name_or_path=scratch", *options, "train.seed=1"])
    monkeypatch.undo()
    monkeypatch.setenv("MOEDPO_CACHE", str(tmp_path / "cache"))
    # other data (another seed of the built-in world): another model
    assert scratch_reference(other, reference_rows(other)) != folder
    run = train(load_config(overrides=[*SMALL, "model.name_or_path=scratch", *options, "train.max_steps=2",
                                       f"train.output_dir={tmp_path / 'run'}", "train.eval_steps=0"]))  # fmt: skip
    assert (run / "base" / "config.json").exists()
