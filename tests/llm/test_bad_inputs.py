"""Bad input fails with a named error (file, row, field, what to do), exit code 2, and nothing left behind."""

import json

import pytest
import torch

from moedpo.cli import main
from moedpo.data.builtin import make_builtin_rows

SMALL = ["model.hidden_size=32", "train.max_steps=2", "train.eval_steps=0"]


def rows(n=8, user=True):
    out = make_builtin_rows(2, n // 4, seed=1)
    return [{k: v for k, v in r.items() if user or k != "user_id"} for r in out]


def run(tmp_path, capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "name, content, words",
    [
        (
            "latin1.jsonl",
            b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
            "row 1 (counting from 1): field '<file>': not UTF-8",
        ),
        ("prefs.txt", b"prompt chosen rejected\n", "unsupported file type '.txt'"),
        (
            "bad.jsonl",
            b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops\n',
            "row 2 (counting from 1): field '<row>': invalid JSON",
        ),
    ],
)
def test_bad_files_exit_2_with_the_file_row_and_field(tmp_path, capsys, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    code, err = run(tmp_path, capsys, "train", f"data.source={path}", f"train.output_dir={tmp_path / 'run'}", *SMALL)
    assert code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_no_user_id_under_user_scope_says_which_keys_to_set(tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(user=False)))
    args = ["train", f"data.source={path}", f"train.output_dir={tmp_path / 'run'}", *SMALL]
    code, err = run(tmp_path, capsys, *args)
    assert code == 2 and "no user_id column" in err and "em.scope=pair" in err and not (tmp_path / "run").exists()
    assert main([*args, "em.scope=pair"]) == 0  # pair scope holds out a share of all pairs
    report = json.loads((tmp_path / "run" / "report" / "eval.json").read_text())
    assert len(report["examples"]) == 2  # 8 pairs, eval_fraction 0.25
    header = (tmp_path / "run" / "config.yaml").read_text().splitlines()[1]
    assert header == "# em.scope=pair; held-out pairs: 25% of all pairs (no user_id column), seed 0"


def test_config_that_is_a_directory_and_bad_generate_arguments(tmp_path, capsys):
    code, err = run(tmp_path, capsys, "train", "--config", str(tmp_path))
    assert code == 2 and "a directory; expected a YAML file" in err
    assert main(["train", f"train.output_dir={tmp_path / 'run'}", "data.annotators_per_type=2", *SMALL]) == 0
    for expert in ("5", "foo"):
        code, err = run(
            tmp_path, capsys, "generate", str(tmp_path / "run"), "--prompt", "describe :", "--expert", expert
        )
        assert code == 2 and "expected auto or an expert index 0..1" in err
    code, err = run(tmp_path, capsys, "generate", str(tmp_path / "run"), "--prompt", "describe :", "--user", "nobody")
    assert code == 2 and "not an annotator of this run" in err


def test_model_paths_and_flags_that_would_fail_later(tmp_path, capsys):
    """A missing local folder names the folder (before: four tracebacks ending in a hub-name message); a hub name
    that cannot be loaded says what to do; train.bf16=yes is refused instead of stored as 'True'."""
    code, err = run(
        tmp_path, capsys, "train", f"model.name_or_path={tmp_path / 'nope'}", f"train.output_dir={tmp_path / 'r'}"
    )
    assert code == 2 and "no such folder" in err and not (tmp_path / "r").exists()
    code, err = run(
        tmp_path, capsys, "train", "model.name_or_path=no-such-org/no-such-model", f"train.output_dir={tmp_path / 'r'}"
    )
    assert code == 2 and "could not load it" in err and "HF_HUB_OFFLINE=1" in err and "Traceback" not in err
    code, err = run(tmp_path, capsys, "config", "train.bf16=maybe")
    assert code == 2 and "train.bf16='maybe': expected one of" in err


def test_newcomer_findings(tmp_path, capsys, monkeypatch):
    """What a newcomer's trial found: a failed --resume must not rewrite the run; eval of a run with no held-out
    pairs; relative paths; values torch would reject late; mixed formats and blank annotator ids in one file."""
    out = tmp_path / "run"
    assert main(["train", f"train.output_dir={out}", "data.annotators_per_type=2", *SMALL]) == 0
    before = (out / "config.yaml").read_text()
    code, err = run(
        tmp_path, capsys, "train", "--config", str(out / "config.yaml"), "--resume", "experts.num_experts=3"
    )
    assert code == 2 and "resume with the run's own config.yaml" in err and (out / "config.yaml").read_text() == before

    noeval = tmp_path / "noeval"
    assert main(["train", f"train.output_dir={noeval}", "data.eval_fraction=0", *SMALL]) == 0
    code, err = run(tmp_path, capsys, "eval", str(noeval))
    assert code == 2 and "held out no pairs" in err and "--data FILE" in err

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "data.source=prefs.jsonl", f"train.output_dir={tmp_path / 'rel'}", *SMALL]) == 0
    assert f"source: {data}" in (tmp_path / "rel" / "config.yaml").read_text()

    for bad, words in (("train.learning_rate=-1", "train.learning_rate=-1.0: expected a number >= 0"),
                       ("train.device=cuda", "sees no CUDA device")):  # fmt: skip
        if bad == "train.device=cuda":  # the error of a torch build without CUDA, also on a machine that has one
            monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        code, err = run(tmp_path, capsys, "train", bad, f"train.output_dir={tmp_path / 'bad'}", *SMALL)
        assert code == 2 and words in err and not (tmp_path / "bad").exists()

    mixed = rows()
    turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    mixed[3] = {**mixed[3], "prompt": turn("user", "hi"), "chosen": turn("assistant", "a")}
    mixed[3]["rejected"] = turn("assistant", "b")
    blank = rows()
    blank[5] = {k: v for k, v in blank[5].items() if k != "user_id"}
    cases = (
        ("mixed.jsonl", mixed, "row 4 (counting from 1): field 'chosen': chat messages"),
        ("blank.jsonl", blank, "row 6 (counting from 1): field 'user_id': missing"),
    )
    for name, records, words in cases:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        code, err = run(
            tmp_path, capsys, "train", f"data.source={tmp_path / name}", f"train.output_dir={tmp_path / 'x'}"
        )
        assert code == 2 and words in err and not (tmp_path / "x").exists()


def test_uncached_hub_name_with_no_network_fails_at_once(tmp_path, capsys, monkeypatch):
    """Without HF_HUB_OFFLINE, an uncached hub name used to spend the hub client's retries (~50 s here) before a
    traceback; when the hub is unreachable it now fails at once with what to do."""
    import time

    from huggingface_hub import constants

    import moedpo.experts.loading as loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    code, err = run(
        tmp_path, capsys, "train", "model.name_or_path=no-org/no-model", f"train.output_dir={tmp_path / 'r'}"
    )
    assert code == 2 and "not in the local cache and the hub is unreachable" in err
    assert time.perf_counter() - start < 10 and not (tmp_path / "r").exists()
