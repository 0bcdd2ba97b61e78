"""A pair whose chosen equals its rejected carries no preference: dropped and counted, like TRL's dropped rows.

Anthropic HH's test split has two such rows in 4,043; TRL trains on them, a run must not stop over them.
"""

import json

import pytest

from moedpo.data.formats import PreferenceDataError
from moedpo.data.loading import load_preference_rows
from moedpo.data.tokenize import tokenize_rows

REASON = "chosen equals rejected (no preference)"
HH = "\n\nHuman: {}\n\nAssistant: {}"


def _tokenize_file(tmp_path, records, tokenizer):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tokenize_rows(load_preference_rows(str(path)), tokenizer, source=str(path))


@pytest.mark.parametrize("explicit", [True, False])
def test_identical_text_pair_is_dropped_and_counted(tmp_path, tokenizer, explicit):
    """3 rows, the middle one identical: 2 examples (rows 0 and 2), one dropped row, named with its reason."""
    if explicit:
        records = [
            {"prompt": "describe the garden :", "chosen": " sunny day", "rejected": " dark day"},
            {"prompt": "describe the garden :", "chosen": " sunny day", "rejected": " sunny day"},
            {"prompt": "tell the beach :", "chosen": " warm sky", "rejected": " cold sky"},
        ]
    else:  # HH style: whole texts, the prompt split off
        records = [
            {"chosen": HH.format("hi", "yes"), "rejected": HH.format("hi", "no")},
            {"chosen": HH.format("hi", "yes"), "rejected": HH.format("hi", "yes")},
            {"chosen": HH.format("why", "sure"), "rejected": HH.format("why", "no")},
        ]
    out = _tokenize_file(tmp_path, records, tokenizer)
    assert len(out.examples) == 2 and [e["index"] for e in out.examples] == [0, 2]
    assert out.num_dropped == 1 and out.dropped == [(1, REASON)]
    assert len(out.groups) == 3  # one per input row, the dropped one included


def test_identical_conversations_are_dropped(tmp_path, chat_tokenizer):
    """Conversational rows whose message lists are equal, with a prompt column and without one."""
    user = [{"role": "user", "content": "describe the garden"}]
    warm, dark = [{"role": "assistant", "content": "sunny day"}], [{"role": "assistant", "content": "dark day"}]
    records = [
        {"prompt": user, "chosen": warm, "rejected": dark},
        {"prompt": user, "chosen": warm, "rejected": warm},
        {"chosen": user + dark, "rejected": user + dark},
        {"chosen": user + warm, "rejected": user + dark},
        {"chosen": warm, "rejected": warm},  # one message each: nothing to split off, still only dropped
    ]
    out = _tokenize_file(tmp_path, records, chat_tokenizer)
    assert [e["index"] for e in out.examples] == [0, 3]
    assert out.num_dropped == 3 and out.dropped == [(1, REASON), (2, REASON), (4, REASON)]


def test_only_identical_pairs_is_the_no_rows_left_error(tmp_path, tokenizer):
    same = {"prompt": "describe the garden :", "chosen": " sunny day", "rejected": " sunny day"}
    with pytest.raises(PreferenceDataError, match=r"row 1 \(counting from 1\).*no usable rows remain: all 2 rows"):
        _tokenize_file(tmp_path, [same, same], tokenizer)
