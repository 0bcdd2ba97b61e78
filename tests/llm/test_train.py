"""moedpo.train and the CLI: run-directory contract, bad data, resume after SIGKILL, PEFT-loadable experts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from moedpo.cli import main
from moedpo.config import ConfigError, load_config
from moedpo.runs import find_checkpoint, read_metrics
from moedpo.threads import cores
from moedpo.training import train

SMALL = ["model.hidden_size=32", "data.annotators_per_type=3", "data.pairs_per_annotator=12"]


def config(tmp_path, *overrides, name="run"):
    return load_config(overrides=[f"train.output_dir={tmp_path / name}", *SMALL, *overrides])


def test_run_directory_contract(tmp_path):
    run = train(config(tmp_path, "train.max_steps=6", "train.eval_steps=3", "train.save_steps=2"))
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "gate.safetensors",
        "users.json",
        "report/eval.json",
        "experts/expert_0/adapter_config.json",
        "experts/expert_1/adapter_model.safetensors",
        "checkpoint/optimizer.pt",
        "checkpoint/params.safetensors",
        "checkpoint/state.json",
    ):
        assert (run / name).exists(), name
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "em/responsibility_entropy",
        "gate/usage_1",
        "expert_1/rewards/chosen",
        "expert_0/rewards/margins",
        "expert_0/rewards/accuracies",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "expert_1/logps/chosen",
        "learning_rate",
        "grad_norm",
    ):
        assert key in rows[-1], key
    assert "eval/ari" in rows[2] and "eval/expert_1/rewards/accuracies" in rows[5] and "eval/logps/chosen" in rows[2]
    assert "em/elbo" not in rows[-1] and "em/marginal_nll" not in rows[-1]  # = loss at the exact posterior
    assert load_config(run / "config.yaml").train.max_steps == 6  # the resolved config reloads
    final = json.loads((run / "report" / "eval.json").read_text())["metrics"]
    assert {"eval/expert_0/bright/rewards/accuracies", "eval/expert_1/dark/rewards/accuracies"} <= set(final)
    assert "eval/posterior_confidence" in final and (run / "report" / "training.png").stat().st_size > 10_000


def test_malformed_row_stops_with_file_row_field_and_leaves_nothing(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    good = {"prompt": "describe the garden :", "chosen": " sunny day", "rejected": " dark day"}
    data.write_text("\n".join(json.dumps(r) for r in [good, good, {**good, "rejected": ""}, good]) + "\n")
    run_dir = tmp_path / "run"
    code = main(["train", f"data.source={data}", f"train.output_dir={run_dir}", "train.max_steps=2", "em.scope=pair"])
    assert code == 2
    assert f"{data}: row 3 (counting from 1): field 'rejected': empty completion" in capsys.readouterr().err
    assert not run_dir.exists()
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("earlier work")
    assert main(["train", f"data.source={data}", f"train.output_dir={run_dir}", "train.overwrite=true"]) == 2
    assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]


def test_unknown_config_key_is_rejected_with_the_accepted_ones(capsys):
    assert main(["train", "experts.num_expert=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'experts.num_expert'" in err and "num_experts" in err
    with pytest.raises(ConfigError, match="expected int"):
        load_config(overrides=["train.max_steps=many"])


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path):
    train(config(tmp_path, "train.max_steps=1"))
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(tmp_path, "train.max_steps=1"))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = ["train.max_steps=30", "train.save_steps=3", "train.eval_steps=0"]
    reference = train(config(tmp_path, *steps, name="uninterrupted"))
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "moedpo.cli", "train", f"train.output_dir={killed}", *SMALL, *steps]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def last_step() -> int:  # the kill may land while checkpoint/ is being swapped: ask as --resume does
        found = find_checkpoint(killed)
        try:
            return json.loads((found / "state.json").read_text())["step"] if found is not None else 0
        except (FileNotFoundError, json.JSONDecodeError):  # swapped away between the lookup and the read
            return 0

    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if last_step() >= 9:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped = last_step()
    assert 9 <= stopped < 30, f"the run was not killed mid-way (checkpoint at step {stopped})"
    resumed = train(load_config(overrides=[f"train.output_dir={killed}", *SMALL, *steps]), resume=True)
    expected, got = (
        load_file(reference / "checkpoint/params.safetensors"),
        load_file(resumed / "checkpoint/params.safetensors"),
    )
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert torch.equal(
        load_file(reference / "gate.safetensors")["net.logits"], load_file(resumed / "gate.safetensors")["net.logits"]
    )
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 31))


def test_saved_experts_load_in_plain_peft_and_reproduce_logged_logps(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moedpo.assembly import build_base, prepare_data
    from moedpo.data.tokenize import collate
    from moedpo.experts import sequence_logps

    cfg = config(tmp_path, "train.max_steps=5")
    run = train(cfg)
    report = json.loads((run / "report/eval.json").read_text())["examples"][:4]
    tokenizer, _ = build_base(cfg)
    held_out = {e["index"]: e for e in prepare_data(cfg, tokenizer).eval}
    batch = collate([held_out[r["index"]] for r in report], tokenizer.pad_token_id)
    for k in range(2):
        base = AutoModelForCausalLM.from_pretrained(run / "base")  # no moedpo involved from here on
        model = PeftModel.from_pretrained(base, run / "experts" / f"expert_{k}")
        with torch.no_grad():
            chosen = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        logged = torch.tensor([r["expert_chosen_logps"][k] for r in report])
        assert torch.allclose(chosen.chunk(2)[0], logged, atol=1e-4)


def test_eval_and_generate_commands(tmp_path, capsys):
    run = train(config(tmp_path, "train.max_steps=3"))
    assert main(["eval", str(run)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["eval/rewards/accuracies"] <= 1.0 and "eval/ari" in metrics
    assert (
        main(
            [
                "generate",
                str(run),
                "--prompt",
                "describe the garden :",
                "--user",
                "annotator_000",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("[expert ")


def test_package_level_train_is_the_public_entry_point(tmp_path):
    import moedpo

    run = moedpo.train(train__output_dir=str(tmp_path / "api"), train__max_steps=2, model__hidden_size=16)
    assert (run / "experts" / "expert_1" / "adapter_config.json").exists()
    with pytest.raises(ConfigError, match="unknown key"):
        moedpo.train(experts__num_expert=2)


def test_rows_trl_trains_on_do_not_stop_the_run(tmp_path):
    """An implicit-prompt row whose rejected answer is a prefix of the chosen one, and a prompt longer than
    max_length: TRL trains on the first and drops the second. moedpo does the same and reports the count
    (before: exit on the first one, ``row 1: field 'rejected': empty completion``)."""
    from moedpo.data.builtin import make_builtin_rows

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected", "user_id")} for r in make_builtin_rows(2, 6, seed=2)]
    rows[1] = {
        "chosen": "describe the garden : sunny warm day",
        "rejected": "describe the garden : sunny",
        "user_id": "x",
    }
    rows[2] = {**rows[2], "prompt": "describe the garden " * 12}
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(config(tmp_path, f"data.source={data}", "data.max_length=24", "train.max_steps=2", "em.scope=pair"))
    metrics = json.loads((run / "report" / "eval.json").read_text())["metrics"]
    assert metrics["data/num_dropped"] == 1


def test_progress_lines_without_a_terminal(tmp_path, capsys):
    """Under nohup/slurm/CI (stderr not a TTY): the run directory first, then periodic lines with step, loss,
    accuracy, steps/s and ETA (before: nothing until the end); the first says the CPU threads it chose and how the
    experts run, and the process has its own count back afterwards."""
    before = torch.get_num_threads()
    train(config(tmp_path, "train.max_steps=40", "train.eval_steps=0", "train.num_threads=1"))
    assert torch.get_num_threads() == before
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moedpo: ")]
    assert err[0].startswith(f"moedpo: run directory {tmp_path / 'run'}")
    assert f"; 1 CPU thread of {len(cores())} cores (train.num_threads)" in err[0]
    assert err[0].endswith("; 2 experts in one grouped pass (experts.batched)")  # how a step runs the experts
    steps = [line for line in err if line.startswith("moedpo: step ")]
    assert len(steps) == 20 and steps[-1].startswith("moedpo: step 40/40 loss ")
    assert "steps/s ETA" in steps[0] and " acc " in steps[0]


def test_run_directory_is_self_contained(tmp_path, monkeypatch):
    """Delete the training file: eval and generate still work from the run directory (data.json), and each saved
    adapter records a base that PEFT's AutoPeftModelForCausalLM loads (before: base_model_name_or_path null); the
    path is relative to the adapter folder (../../base), which PEFT reads from the working directory."""
    from peft import AutoPeftModelForCausalLM

    from moedpo.data.builtin import make_builtin_rows

    rows = make_builtin_rows(2, 8, seed=5)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(config(tmp_path, f"data.source={data}", "train.max_steps=3"))
    data.unlink()
    assert main(["eval", str(run)]) == 0
    assert main(["generate", str(run), "--prompt", "describe the garden :", "--user", "annotator_000"]) == 0
    monkeypatch.chdir(run / "experts" / "expert_1")
    model = AutoPeftModelForCausalLM.from_pretrained(".")
    assert model.peft_config["default"].base_model_name_or_path == "../../base"


def test_generation_uses_the_chat_template_of_a_conversational_run(tmp_path):
    from moedpo.data.builtin import make_builtin_rows
    from moedpo.data.tokenize import prompt_input_ids
    from moedpo.session import RunSession

    def turn(role, text):
        return [{"role": role, "content": text.strip()}]

    rows = [
        {**r, "prompt": turn("user", r["prompt"]), "chosen": turn("assistant", r["chosen"]),
         "rejected": turn("assistant", r["rejected"])}
        for r in make_builtin_rows(2, 8, seed=5)
    ]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(config(tmp_path, f"data.source={data}", "train.max_steps=2"))
    session = RunSession(run)
    templated = prompt_input_ids(session.tokenizer, turn("user", "describe the garden :"))
    assert prompt_input_ids(session.tokenizer, session.as_prompt("describe the garden :")) == templated
    assert session.tokenizer.decode(templated).endswith("assistant :")


def test_routed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch, at_step):
    """Guide-routed sparse training: the guide's draws, its parameters and the score-function baselines all come
    back from the checkpoint (a crash at step 10 of 12, checkpoint at 8)."""
    steps = ["train.max_steps=12", "train.save_steps=4", "train.eval_steps=0"]
    routed = ["em.schedule=routed", "em.guide=amortized", "em.exact_every=3", "em.exact_warmup=2", *steps]
    reference = train(config(tmp_path, *routed, name="uninterrupted"))
    at_step(9)  # a crash as step 10 begins
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, *routed, name="crashed"))
    monkeypatch.undo()
    assert json.loads((tmp_path / "crashed" / "checkpoint" / "loop.json").read_text())["baseline"]["per_unit"]
    resumed = train(config(tmp_path, *routed, name="crashed"), resume=True)
    expected = load_file(reference / "checkpoint/params.safetensors")
    got = load_file(resumed / "checkpoint/params.safetensors")
    assert expected.keys() == got.keys() and any(name.startswith("guide.") for name in got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert (resumed / "guide.safetensors").exists()


def test_a_run_saved_with_old_key_names_evaluates_and_resumes(tmp_path, capsys):
    """A run directory written before TRL's names (config.yaml with train.batch_size, eval_every, ...) still
    opens for ``moedpo eval`` and continues with ``--resume``, which rewrites its config.yaml with the new names."""
    import yaml

    from moedpo.config import RENAMED

    run = train(config(tmp_path, "train.max_steps=2", "train.save_steps=1", "train.eval_steps=0"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for old, new in RENAMED.items():
        saved["train"][old.split(".")[1]] = saved["train"].pop(new.split(".")[1])
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.warns(FutureWarning, match="train.batch_size"):
        assert main(["eval", str(run)]) == 0
    assert "eval/rewards/accuracies" in json.loads(capsys.readouterr().out)
    with pytest.warns(FutureWarning, match="train.eval_every"):
        assert main(["train", "--config", str(run / "config.yaml"), "--resume", "train.max_steps=3"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    rewritten = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert rewritten["eval_steps"] == 0 and rewritten["save_steps"] == 1 and "eval_every" not in rewritten
