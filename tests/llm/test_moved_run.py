"""A run directory is portable: its adapters record the run's own base as ``../../base`` (relative to the adapter
folder), so a copy elsewhere, with the original deleted, still evaluates, generates and loads in plain PEFT."""

import json
import shutil

import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from moedpo.cli import main
from moedpo.config import load_config
from moedpo.data.prepared import PreparedData
from moedpo.data.tokenize import collate
from moedpo.experts import sequence_logps
from moedpo.experts.loading import adapter_base
from moedpo.runs import DATA_FILE
from moedpo.training import train

SMALL = ["model.hidden_size=32", "data.annotators_per_type=3", "data.pairs_per_annotator=12", "train.max_steps=3"]


def _peft_logps(run, batch, k: int) -> torch.Tensor:
    """Expert k's log-probs through PEFT alone: the user's one-liner of the README."""
    base = AutoModelForCausalLM.from_pretrained(run / "base")
    model = PeftModel.from_pretrained(base, run / "experts" / f"expert_{k}")
    with torch.no_grad():
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])


def test_a_moved_run_directory_still_evaluates_generates_and_loads_in_peft(tmp_path, capsys, monkeypatch):
    run = train(load_config(overrides=[f"train.output_dir={tmp_path / 'run'}", *SMALL]))
    for k in range(2):  # before: the absolute path of RUN/base, which breaks when the directory moves
        recorded = json.loads((run / "experts" / f"expert_{k}" / "adapter_config.json").read_text())
        assert recorded["base_model_name_or_path"] == "../../base"
    examples = PreparedData.load(run / DATA_FILE).eval[:4]
    batch = collate(examples, json.loads((run / "base" / "config.json").read_text())["pad_token_id"])
    before = [_peft_logps(run, batch, k) for k in range(2)]
    evaluated = main(["eval", str(run)]) == 0 and json.loads(capsys.readouterr().out)

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    assert main(["eval", str(moved)]) == 0
    assert json.loads(capsys.readouterr().out) == evaluated
    assert main(["generate", str(moved), "--prompt", "describe the garden :", "--user", "annotator_000"]) == 0
    assert capsys.readouterr().out.startswith("[expert ")
    for k in range(2):
        assert torch.equal(_peft_logps(moved, batch, k), before[k])
        assert adapter_base(moved / "experts" / f"expert_{k}") == str((moved / "base").resolve())
    # PEFT's auto class reads the recorded path from the working directory: it works from the adapter folder
    monkeypatch.chdir(moved / "experts" / "expert_1")
    auto = AutoPeftModelForCausalLM.from_pretrained(".")
    with torch.no_grad():
        logps = sequence_logps(auto, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert torch.equal(logps, before[1])
