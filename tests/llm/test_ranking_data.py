"""Ranking rows (issue 20 item 1): read, validated and tokenized with the pairs' TRL rules, collated per completion.

The pair path's ids are TRL's (tests/llm/test_tokenization.py); here every completion of a ranking must be the
same sequence that path gives it, with tokenizers users bring (GPT-2 and Llama-3 style byte-level BPE, a chat
template) and HH-style rows whose prompt is implicit."""

import json

import pytest

from moedpo.data.formats import PreferenceDataError
from moedpo.data.loading import load_preference_rows
from moedpo.data.ranking_rows import normalise_ranking_row, normalise_record
from moedpo.data.sources import check_consistent
from moedpo.data.tokenize import TIED_BEST, collate_rankings, tokenize_rows

RANKINGS = [
    {"prompt": "describe the garden :", "completions": [" sunny warm day", " dark cold day", " a day"],
     "ranking": [1, 0, 2], "user_id": "a"},
    {"prompt": "Answer: ", "completions": ["Yes it is.", "No it is not.", "Maybe.", "Sure thing"],
     "scores": [7, 9, 2.5, 4], "user_id": "b"},  # 'Ġ' + 'Yes' merges across the boundary
    {"completions": ["\n\nHuman: how is the sea?\n\nAssistant: blue and calm",
                     "\n\nHuman: how is the sea?\n\nAssistant: grey",
                     "\n\nHuman: how is the sea?\n\nAssistant: wild water"],
     "ranking": [2, 0, 1], "user_id": "a"},  # HH style: the prompt is implicit
]  # fmt: skip
CHAT = {
    "prompt": [{"role": "user", "content": "how is the sky?"}],
    "completions": [[{"role": "assistant", "content": c}] for c in ("blue", "green sky", "red")],
    "ranking": [0, 2, 1],
}


def as_pair(row, better, worse):
    return {"prompt": row.prompt, "chosen": row.completions[better], "rejected": row.completions[worse]}


@pytest.mark.parametrize("name", ["gpt2_tokenizer", "llama3_tokenizer", "chat_tokenizer"])
def test_each_completion_is_the_sequence_the_pair_path_gives_it(name, request):
    """Every completion of a ranking tokenizes, joined to its prompt, to the pair path's (TRL's) sequence; the
    ranking's prompt ends where the shortest of its pairs' prompts ends (a merge at the boundary goes to the
    completions)."""
    tokenizer = request.getfixturevalue(name)
    records = RANKINGS + ([CHAT] if tokenizer.chat_template else [])
    rows = [normalise_ranking_row(r, "mem", i) for i, r in enumerate(records)]
    examples = tokenize_rows(rows, tokenizer).examples
    assert len(examples) == len(rows)
    for row, example in zip(rows, examples):
        others = range(1, len(row.completions))
        pairs = tokenize_rows([normalise_record(as_pair(row, 0, j), "mem", 0) for j in others], tokenizer).examples
        assert example["prompt_text"] == pairs[0]["prompt_text"]
        shortest = min(len(p["prompt_chosen_ids"]) for p in pairs)
        assert all(len(prompt) == shortest for prompt in example["prompt_ids"])
        for j, pair in zip(others, pairs):
            assert (
                example["prompt_ids"][0] + example["completion_ids"][0]
                == pair["prompt_chosen_ids"] + pair["chosen_ids"]
            )
            assert example["prompt_ids"][j] + example["completion_ids"][j] == (
                pair["prompt_rejected_ids"] + pair["rejected_ids"]
            )
    assert rows[2].prompt == "\n\nHuman: how is the sea?\n\nAssistant:" and rows[2].completions[1] == " grey"


def test_scores_rank_by_value_and_a_tie_ends_the_observed_order(tokenizer):
    """[7, 9, 2.5, 4] -> ranking [1, 0, 3, 2], all three choices observed; [9, 7, 7, 2] -> [0, 1, 2, 3] with only
    the first choice observed (1 and 2 tie); [5, 5, 1] says nothing and is dropped, counted."""
    base = {"prompt": "the sea :", "completions": [" a", " b", " c", " d"]}
    strict = normalise_ranking_row({**base, "scores": [7, 9, 2.5, 4]}, "mem", 0)
    assert (strict.ranking, strict.ranked) == ([1, 0, 3, 2], 3)
    tied = normalise_ranking_row({**base, "scores": [9, 7, 7, 2]}, "mem", 1)
    assert (tied.ranking, tied.ranked) == ([0, 1, 2, 3], 1)
    best = normalise_ranking_row({"prompt": "x :", "completions": [" a", " b", " c"], "scores": [5, 5, 1]}, "m", 2)
    assert best.no_preference
    out = tokenize_rows([strict, tied, best], tokenizer)
    assert [e["index"] for e in out.examples] == [0, 1] and out.dropped == [(2, TIED_BEST)]
    assert out.num_dropped == 1


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        ({"prompt": "p", "completions": [" a", " b", " c"], "ranking": [0, 0, 1]}, "ranking", "permutation of 0..2"),
        ({"prompt": "p", "completions": [" a", " b", " c"], "ranking": [0, 1]}, "ranking", "permutation"),
        ({"prompt": "p", "completions": [" a", " b"], "ranking": [True, False]}, "ranking", "permutation"),
        ({"prompt": "p", "completions": [" a", " b"]}, "ranking", "neither"),
        ({"prompt": "p", "completions": [" a", " b"], "ranking": [0, 1], "scores": [1, 2]}, "ranking", "both"),
        ({"prompt": "p", "completions": [" a", " b"], "scores": [1]}, "scores", "2 finite numbers"),
        ({"prompt": "p", "completions": [" a", " b"], "scores": [1, float("nan")]}, "scores", "finite"),
        ({"prompt": "p", "completions": [" a", " b"], "scores": ["1", "2"]}, "scores", "finite numbers"),
        ({"prompt": "p", "completions": [" a"], "ranking": [0]}, "completions", "two or more"),
        ({"prompt": "p", "completions": " a b", "ranking": [0]}, "completions", "expected a JSON list"),
        ({"prompt": "p", "completions": [" a", "  "], "ranking": [0, 1]}, "completions[1]", "empty completion"),
        ({"prompt": "p", "completions": [" a", 3], "ranking": [0, 1]}, "completions[1]", "expected a string"),
        ({"completions": ["sun", "rain"], "ranking": [0, 1]}, "prompt", "share no prefix"),
        ({"prompt": 5, "completions": [" a", " b"], "ranking": [0, 1]}, "prompt", "expected a string"),
        ({"prompt": "p", "completions": [" a", " b"], "ranking": [0, 1], "user_id": [1]}, "user_id", "string"),
    ],
)
def test_bad_ranking_rows_name_the_row_and_field(record, field, words):
    with pytest.raises(PreferenceDataError, match=words) as info:
        normalise_ranking_row(record, "prefs.jsonl", 6)
    assert info.value.field == field and "prefs.jsonl: row 7" in str(info.value)


def test_a_file_of_rankings_reads_and_a_mixed_file_is_refused(tmp_path):
    path = tmp_path / "ranked.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RANKINGS))
    rows = load_preference_rows(str(path))
    assert [r.ranking for r in rows] == [[1, 0, 2], [1, 0, 3, 2], [2, 0, 1]]
    check_consistent(rows, str(path))
    csv = tmp_path / "ranked.csv"  # CSV cells carry the lists as JSON text
    csv.write_text('prompt,completions,scores,user_id\nthe sea :,"["" a"", "" b"", "" c""]","[1, 3, 2]",u1\n')
    (row,) = load_preference_rows(str(csv))
    assert row.completions == [" a", " b", " c"] and (row.ranking, row.ranked) == ([1, 2, 0], 2)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(RANKINGS[0]) + "\n" + json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}))
    with pytest.raises(PreferenceDataError, match="a pair .* while row 1 is a ranking") as info:
        check_consistent(load_preference_rows(str(mixed)), str(mixed))
    assert info.value.row == 1 and info.value.field == "chosen"


def test_collate_lays_completions_out_in_blocks_by_hand():
    """Two rankings, of 3 and 2 completions: rows m * 2 + i hold completion m of ranking i; ranking 1's missing
    third completion is one attended pad token outside the completion, its ranking padded with index 2 and
    masked."""
    examples = [
        {"index": 4, "prompt_ids": [[1, 2]] * 3, "completion_ids": [[5], [6, 7], [8]], "ranking": [2, 0, 1],
         "ranked": 2, "user": 0, "group": "x", "user_features": None},
        {"index": 9, "prompt_ids": [[3], [3]], "completion_ids": [[9, 9], [10]], "ranking": [1, 0], "ranked": 1,
         "user": 1, "group": None, "user_features": None},
    ]  # fmt: skip
    batch = collate_rankings(examples, pad_token_id=0)
    assert collate_rankings(examples, pad_token_id=7)["input_ids"][5].tolist() == [7, 7, 7, 7]
    ids = [[1, 2, 5, 0], [3, 9, 9, 0], [1, 2, 6, 7], [3, 10, 0, 0], [1, 2, 8, 0], [0, 0, 0, 0]]  # pad id 0
    assert batch["input_ids"].tolist() == ids
    mask = [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == mask
    assert batch["attention_mask"].tolist()[3] == [1, 1, 0, 0] and batch["attention_mask"].tolist()[5] == [1, 0, 0, 0]
    assert batch["ranking"].tolist() == [[2, 0, 1], [1, 0, 2]]
    assert batch["ranking_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["ranked"].tolist() == [2, 1] and batch["index"].tolist() == [4, 9]
