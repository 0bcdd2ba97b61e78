"""Preference data: TRL formats, clear row/field errors for every file type, truncation, TRL collator layout."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moedpo.data.formats import PreferenceDataError, normalise_row
from moedpo.data.loading import load_preference_rows
from moedpo.data.tokenize import collate, tokenize_rows

GOOD = {"prompt": "describe the garden :", "chosen": " sunny day", "rejected": " dark day", "user_id": "a1"}


def test_explicit_implicit_and_conversational_rows():
    row = normalise_row(GOOD, "f", 0)
    assert (row.prompt, row.chosen, row.rejected, row.user_id) == (GOOD["prompt"], " sunny day", " dark day", "a1")
    implicit = normalise_row({"chosen": "tell the beach : warm sky", "rejected": "tell the beach : cold sky"}, "f", 1)
    # TRL's extract_prompt: the space before the first differing character goes with the completions
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == ("tell the beach :", " warm sky", " cold sky")
    conv = normalise_row(
        {
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "warm"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cold"}],
        },
        "f",
        2,
    )
    assert conv.prompt == [{"role": "user", "content": "hi"}] and conv.chosen[0]["content"] == "warm"


@pytest.mark.parametrize(
    "record, field, words",
    [
        ({"prompt": "p", "rejected": "r"}, "chosen", "missing"),
        ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "chosen", "empty completion"),
        ({"prompt": "p", "chosen": "c", "rejected": 3}, "rejected", "expected a string"),
        ({"prompt": 7, "chosen": "c", "rejected": "r"}, "prompt", "expected a string"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "user_features": "x"}, "user_features", "list of numbers"),
        ({"chosen": "abc", "rejected": "xyz"}, "prompt", "share no prefix"),
        (
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": " "}]},
            "chosen",
            "empty completion",
        ),
    ],
)
def test_bad_rows_name_row_and_field(record, field, words):
    with pytest.raises(PreferenceDataError, match=words) as info:
        normalise_row(record, "data.jsonl", 4)
    assert (info.value.source, info.value.row, info.value.field) == ("data.jsonl", 4, field)
    assert "data.jsonl: row 5 (counting from 1)" in str(info.value)


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        keys = ["prompt", "chosen", "rejected", "user_id"]
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r.get(k, "")) for k in keys) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_loads_and_reports_bad_rows(tmp_path, suffix):
    path = tmp_path / f"prefs{suffix}"
    _write(path, [GOOD, GOOD])
    assert len(load_preference_rows(str(path))) == 2
    _write(path, [GOOD, GOOD, {**GOOD, "chosen": ""}])
    with pytest.raises(PreferenceDataError, match=rf"prefs\{suffix}: row 3 \(counting from 1\): field 'chosen'"):
        load_preference_rows(str(path))


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(PreferenceDataError, match=r"row 2 \(counting from 1\)"):
        load_preference_rows(str(path))


def test_tokenize_matches_trl_layout_and_counts_truncation(tokenizer):
    rows = [normalise_row(GOOD, "f", 0), normalise_row({**GOOD, "chosen": " sunny day " * 20}, "f", 1)]
    out = tokenize_rows(rows, tokenizer, max_length=12)
    assert out.num_truncated == 1
    first = out.examples[0]
    # prompt = 3 words + ":" (no BOS: this tokenizer's post-processor adds none, and TRL adds only that);
    # completion = 2 words + EOS
    assert len(first["prompt_chosen_ids"]) == 4 and tokenizer.bos_token_id not in first["prompt_chosen_ids"]
    assert first["chosen_ids"][-1] == tokenizer.eos_token_id and len(first["chosen_ids"]) == 3
    assert len(out.examples[1]["prompt_chosen_ids"]) + len(out.examples[1]["chosen_ids"]) == 12
    batch = collate(out.examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (4, 12)  # [chosen_0, chosen_1, rejected_0, rejected_1]
    assert batch["completion_mask"][0].tolist() == [0] * 4 + [1] * 3 + [0] * 5
    assert batch["attention_mask"][2].tolist() == [1] * 7 + [0] * 5
    assert out.user_ids == ["a1"] and batch["user"].tolist() == [0, 0]


def test_prompt_longer_than_max_length_is_dropped_and_counted(tokenizer):
    """TRL's keep_start drops a row whose prompt fills max_length; only a dataset with no row left is an error."""
    rows = [normalise_row({**GOOD, "prompt": "describe the garden : " * 10}, "f", 0), normalise_row(GOOD, "f", 1)]
    out = tokenize_rows(rows, tokenizer, max_length=8, source="f")
    assert out.num_dropped == 1 and out.dropped[0][0] == 0 and [e["index"] for e in out.examples] == [1]
    with pytest.raises(PreferenceDataError, match=r"row 1 \(counting from 1\): field 'prompt': no usable rows remain"):
        tokenize_rows(rows[:1], tokenizer, max_length=8, source="f")


def test_conversational_rows_use_the_chat_template(tokenizer):
    conv = {
        "prompt": [{"role": "user", "content": "describe the garden"}],
        "chosen": [{"role": "assistant", "content": "sunny day"}],
        "rejected": [{"role": "assistant", "content": "dark day"}],
    }
    example = tokenize_rows([normalise_row(conv, "f", 0)], tokenizer).examples[0]
    assert tokenizer.decode(example["prompt_chosen_ids"]) == "user : describe the garden </s> assistant :"
    assert tokenizer.decode(example["chosen_ids"]) == "sunny day </s>"


def test_datasets_folder_loads_through_load_dataset(tmp_path):
    folder = tmp_path / "prefs"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(GOOD) + "\n" for _ in range(3)))
    rows = load_preference_rows(str(folder), split="train")
    assert len(rows) == 3 and rows[0].user_id == "a1"


def test_pad_right_pads_ragged_rows_with_the_value():
    """By hand: rows of 3, 1 and 0 tokens pad to width 3 with the value; long ids, also when every row is empty."""
    from moedpo.data.tokenize import pad

    padded = pad([[5, 6, 7], [8], []], -3)
    assert padded.dtype == torch.long and padded.tolist() == [[5, 6, 7], [8, -3, -3], [-3, -3, -3]]
    assert pad([[], []], 0).shape == (2, 0) and pad([[], []], 0).dtype == torch.long
