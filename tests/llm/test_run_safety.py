"""A newcomer's mistakes with the run directory and the command line end in one named error (exit 2) with nothing
half-written, Ctrl-C stops after a checkpoint with the command that resumes it, and text the tokenizer cannot read
is refused (issue 19, items 1, 3 and 4)."""

import errno
import json
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from moedpo import runs
from moedpo.cli import main
from moedpo.data.reviews import make_review_rows
from moedpo.reference import scratch
from moedpo.rundir import RunLock

SMALL = ["model.hidden_size=32", "data.annotators_per_type=2", "data.pairs_per_annotator=6", "train.eval_steps=0"]


def run(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_a_missing_file_with_an_extension_is_never_looked_up_on_the_hub(tmp_path, capsys, monkeypatch):
    """`prefs.jsonlx` (a typo) used to go to datasets.load_dataset: 31 s of hub retries, then a traceback."""
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("asked the hub for a file name"))
    start = time.perf_counter()
    code, err = run(capsys, "train", f"data.source={tmp_path / 'prefs.jsonlx'}", f"train.output_dir={tmp_path / 'r'}")
    assert code == 2 and "no such file" in err and "prefs.jsonlx" in err and time.perf_counter() - start < 10
    assert not (tmp_path / "r").exists()


def test_output_dir_that_is_a_file_or_lies_under_one(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("mine")
    for target, words in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "lies under")):
        code, err = run(capsys, "train", *SMALL, f"train.output_dir={target}")
        assert code == 2 and words in err and (tmp_path / "file").read_text() == "mine"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: simulate a read-only disk
    code, err = run(capsys, "train", *SMALL, f"train.output_dir={tmp_path / 'ro'}")
    assert code == 2 and "not writable" in err and not (tmp_path / "ro").exists()


def test_the_output_dir_is_checked_before_a_scratch_reference_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scratch, "_build", lambda *a: pytest.fail("built the scratch reference first"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    code, err = run(capsys, "train", "model.name_or_path=scratch", *SMALL, f"train.output_dir={tmp_path / 'busy'}")
    assert code == 2 and "not empty" in err


def test_too_many_experts_and_a_run_directory_as_the_model(tmp_path, capsys):
    code, err = run(capsys, "train", *SMALL, "experts.num_experts=1000", f"train.output_dir={tmp_path / 'k'}")
    assert code == 2 and "4 training annotators" in err and not (tmp_path / "k").exists()
    assert run(capsys, "train", *SMALL, "train.max_steps=2", f"train.output_dir={tmp_path / 'r'}")[0] == 0
    as_model = [f"model.name_or_path={tmp_path / 'r'}", f"train.output_dir={tmp_path / 'x'}"]
    code, err = run(capsys, "train", *SMALL, *as_model)
    assert code == 2 and "a moedpo run directory" in err and str(tmp_path / "r" / "base") in err
    expert = tmp_path / "r" / "experts" / "expert_0"  # the trial's M18b: a tokenizer traceback naming sentencepiece
    code, err = run(capsys, "train", *SMALL, f"model.name_or_path={expert}", f"train.output_dir={tmp_path / 'y'}")
    assert code == 2 and "a PEFT adapter folder" in err and str((tmp_path / "r" / "base").resolve()) in err
    assert "moedpo export RUN --merged" in err and not (tmp_path / "y").exists()
    code, err = run(capsys, "generate", str(tmp_path / "r"), "--prompt", "  ")
    assert code == 2 and "--prompt is empty" in err


def test_a_second_training_on_a_locked_run_directory_is_refused(tmp_path, capsys):
    """Two trainings with train.overwrite=true on one directory used to both "succeed", interleaving their files."""
    busy = tmp_path / "busy"
    with RunLock(busy):  # what a running training holds
        (busy / "theirs.txt").write_text("the other run's")
        code, err = run(capsys, "train", *SMALL, f"train.output_dir={busy}", "train.overwrite=true")
        assert code == 2 and "being written by another moedpo training" in err and f"pid {os.getpid()}" in err
        assert (busy / "theirs.txt").exists()  # nothing of theirs was cleared
    assert run(capsys, "train", *SMALL, "train.max_steps=1", f"train.output_dir={busy}", "train.overwrite=true")[0] == 0
    assert not (busy / "theirs.txt").exists()  # once free, overwrite replaces it


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, capsys, monkeypatch, at_step):
    steps = ["train.max_steps=6", "train.save_steps=0", "em.schedule=gumbel", "experts.init_std=0.3"]
    assert run(capsys, "train", *SMALL, *steps, f"train.output_dir={tmp_path / 'whole'}")[0] == 0
    at_step(2, lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C as step 3 begins: the step finishes first
    code, err = run(capsys, "train", *SMALL, *steps, f"train.output_dir={tmp_path / 'cut'}")
    monkeypatch.undo()
    config = tmp_path / "cut" / "config.yaml"
    assert code == 130 and "after step 3 of 6" in err and f"moedpo train --config {config} --resume" in err
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    assert run(capsys, "train", "--config", str(config), "--resume")[0] == 0
    expected, got = (load_file(tmp_path / r / "checkpoint/params.safetensors") for r in ("whole", "cut"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_full_disk_says_what_to_do_and_resume_says_how_to_start_over(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "params.safetensors")

    monkeypatch.setattr(runs, "save_file", full)
    args = ["train", *SMALL, "train.max_steps=2", f"train.output_dir={tmp_path / 'r'}"]
    code, err = run(capsys, *args)
    assert code == 2 and "No space left on device" in err and "free some space" in err
    monkeypatch.undo()
    code, err = run(capsys, "train", "--config", str(tmp_path / "r" / "config.yaml"), "--resume")
    assert code == 2 and "no complete checkpoint" in err and "train.overwrite=true" in err
    assert run(capsys, *args, "train.overwrite=true")[0] == 0  # the command it names starts the run over


def test_a_full_disk_under_torch_save_is_named_and_the_last_checkpoint_kept(tmp_path, capsys, monkeypatch):
    """The trial's M39b: torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected pos"),
    which ended in a traceback and left checkpoint.tmp/ behind."""
    args = ["train", *SMALL, "train.max_steps=4", "train.save_steps=2", f"train.output_dir={tmp_path / 'r'}"]
    saves, real_save = [], torch.save

    def fills_up(obj, path, *a, **k):
        saves.append(path)
        if len(saves) > 3:  # the first checkpoint's three torch.save files fit
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 41024 vs 40916")
        real_save(obj, path, *a, **k)

    monkeypatch.setattr(runs.torch, "save", fills_up)
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))  # 1 kB left
    code, err = run(capsys, *args)
    assert code == 2 and "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoint.tmp").exists()
    assert json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.undo()
    assert run(capsys, "train", "--config", str(tmp_path / "r" / "config.yaml"), "--resume")[0] == 0


def test_own_text_on_the_builtin_model_is_refused_with_the_share_of_unknown_tokens(tmp_path, capsys):
    """The built-in world's 60-word tokenizer maps a user's natural text to <unk>: it used to train on lengths alone
    and report ARI 1.0."""
    rows = make_review_rows(annotators_per_type=2, pairs_per_annotator=3)
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", f"data.source={path}", *SMALL, "train.max_steps=1"]
    code, err = run(capsys, *args, f"train.output_dir={tmp_path / 'r'}")
    share = int(err.split("% of the tokens")[0].rsplit(" ", 1)[-1]) if "% of the tokens" in err else 0
    assert code == 2 and share > 50 and "model.name_or_path=scratch" in err and not (tmp_path / "r").exists()
    assert run(capsys, *args, "data.allow_unknown_tokens=true", f"train.output_dir={tmp_path / 'ok'}")[0] == 0
