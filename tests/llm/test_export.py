"""``moedpo export RUN --merged``: each expert as a plain Hugging Face model folder whose log-probs are the run's
expert's (lora, heads, independent, and a base whose output head is tied to its embeddings); ``--push-to-hub``
up to the upload call (HfApi replaced by a recorder: offline)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import moedpo.export
from moedpo.assembly import open_run
from moedpo.cli import main
from moedpo.config import load_config
from moedpo.data.builtin import train_tokenizer
from moedpo.data.tokenize import collate
from moedpo.eval.evaluate import bank_margins
from moedpo.experts import sequence_logps
from moedpo.training import train

SMALL = ["model.hidden_size=32", "data.annotators_per_type=3", "data.pairs_per_annotator=12", "train.eval_steps=0"]
FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


def _tied_base(folder: Path) -> str:
    """A local base folder whose output head shares the input embeddings (as Qwen2.5-0.5B's does)."""
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# training on a tied base: PEFT warns that merging a LoRA on a tied head needs care (export unties it first: the case)
TIED = pytest.param("tied", marks=pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"))


@pytest.mark.parametrize("mode", ["lora", "heads", "independent", TIED])
def test_each_merged_expert_gives_the_runs_log_probs(mode, tmp_path, capsys):
    options = [f"experts.mode={'lora' if mode == 'tied' else mode}", "train.max_steps=3"]
    options += [f"model.name_or_path={_tied_base(tmp_path / 'tied')}"] if mode == "tied" else []
    run = train(load_config(overrides=[f"train.output_dir={tmp_path / 'run'}", *SMALL, *options]))
    out = tmp_path / "exported"
    assert main(["export", str(run), "--merged", "--output-dir", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"expert {k}: {out / f'expert_{k}'}" for k in range(2)]

    trained = open_run(run)
    pad = trained.tokenizer.pad_token_id
    examples = trained.data.train[:3] + trained.data.eval[:3]
    expected = bank_margins(trained.bank, examples, pad)  # the run's own experts: (N, K)
    assert not torch.allclose(expected["chosen_logps"][:, 0], expected["chosen_logps"][:, 1])  # experts differ
    batch = collate(examples, pad)
    for k in range(2):
        folder = out / f"expert_{k}"
        assert FILES <= {p.name for p in folder.iterdir()} and not (folder / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(folder)  # no PEFT, no moedpo
        assert not any("lora" in name for name, _ in model.named_parameters())
        assert AutoTokenizer.from_pretrained(folder).pad_token_id == pad
        with torch.no_grad():
            chosen, rejected = sequence_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            ).chunk(2)
        assert (chosen - expected["chosen_logps"][:, k]).abs().max() <= 1e-5
        assert (rejected - expected["rejected_logps"][:, k]).abs().max() <= 1e-5
    if mode == "tied":  # untied on export: the merged head LoRA moved the head, not the embeddings
        config = json.loads((out / "expert_0" / "config.json").read_text())
        assert config["tie_word_embeddings"] is False


class RecordingHfApi:
    calls: list = []

    def create_repo(self, repo_id, repo_type, exist_ok):
        self.calls.append(("create_repo", repo_id, repo_type, exist_ok))

    def upload_folder(self, repo_id, folder_path, repo_type, commit_message):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, Path(folder_path).name, repo_type, files))


def test_push_to_hub_makes_one_repository_per_expert(tmp_path, monkeypatch, capsys):
    run = train(load_config(overrides=[f"train.output_dir={tmp_path / 'run'}", *SMALL, "train.max_steps=1"]))
    RecordingHfApi.calls = []
    monkeypatch.setattr(moedpo.export, "HfApi", RecordingHfApi)
    assert main(["export", str(run), "--merged", "--push-to-hub", "me/prefs"]) == 0
    files = sorted(p.name for p in (run / "merged" / "expert_0").iterdir())
    assert FILES <= set(files)
    assert RecordingHfApi.calls == [
        ("create_repo", "me/prefs-expert_0", "model", True),
        ("upload_folder", "me/prefs-expert_0", "expert_0", "model", files),
        ("create_repo", "me/prefs-expert_1", "model", True),
        ("upload_folder", "me/prefs-expert_1", "expert_1", "model", files),
    ]
    pushed = f"expert 1: {run / 'merged' / 'expert_1'} -> https://huggingface.co/me/prefs-expert_1"
    assert pushed in capsys.readouterr().out


def test_export_mistakes_are_named_and_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(moedpo.export, "HfApi", RecordingHfApi)
    run = train(load_config(overrides=[f"train.output_dir={tmp_path / 'run'}", *SMALL, "train.max_steps=1"]))
    cases = [
        (["export", str(run)], "pass --merged (standalone models); the PEFT adapters are already in"),
        (["export", str(run), "--merged", "--push-to-hub", "bad name!"], "--push-to-hub bad name!: not a repository"),
        (["export", str(tmp_path), "--merged"], "not a moedpo run directory (no config.yaml)"),
        (["export", str(run), "--merged", "--output-dir", str(run)], "exists and is not an empty folder"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv
    assert not (run / "merged").exists()


class ConnectError(Exception):
    """What the hub client's HTTP library raises without a network (its name is what the message reads)."""


@pytest.mark.parametrize(
    "offline, error, advice",
    [
        ("", ConnectError("[Errno -2] Name or service not known"), "the hub could not be reached"),
        ("1", ConnectError("offline mode is enabled"), "HF_HUB_OFFLINE is set: unset it"),
        ("", RuntimeError("401 Unauthorized"), "log in with `hf auth login` or set HF_TOKEN"),
    ],
)
def test_a_failed_upload_is_named_and_keeps_the_folders(tmp_path, monkeypatch, capsys, offline, error, advice):
    """The trial's M32c: no network (offline flag unset) ended in an 81-line traceback and exit 1."""

    class FailingHfApi(RecordingHfApi):
        def create_repo(self, repo_id, repo_type, exist_ok):
            raise error

    run = train(load_config(overrides=[f"train.output_dir={tmp_path / 'run'}", *SMALL, "train.max_steps=1"]))
    monkeypatch.setattr(moedpo.export, "HfApi", FailingHfApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    assert main(["export", str(run), "--merged", "--push-to-hub", "me/prefs"]) == 2
    err = capsys.readouterr().err
    assert advice in err and f"the merged folders are in {run / 'merged'}" in err and "Traceback" not in err
    assert FILES <= {p.name for p in (run / "merged" / "expert_0").iterdir()}
