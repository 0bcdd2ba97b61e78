"""moedpo tokenizes raw preference rows to the very ids TRL 1.16's DPOTrainer trains on.

The reference is TRL itself: a ``trl.DPOTrainer`` built on the same raw rows (tiny random model, explicit
reference model), whose processed ``train_dataset`` goes through the trainer's own ``data_collator``. Each kept
row's chosen and rejected sequences (padding stripped) must agree on input_ids and completion_mask, and the rows
TRL filters out must be the rows moedpo reports as dropped. Four tokenizers trained locally (conftest.py): GPT-2
style, Llama-3 style (BOS from its post-processor), ChatML style and the built-in word-level one.
"""

import copy

import pytest

from moedpo.data.builtin import tiny_causal_lm
from moedpo.data.formats import PreferenceDataError, normalise_row
from moedpo.data.tokenize import collate, tokenize_rows

trl = pytest.importorskip("trl")

TRL_WARNINGS = ("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
TOKENIZERS = ("gpt2_tokenizer", "llama3_tokenizer", "chat_tokenizer", "tokenizer")
CHAT_TOKENIZERS = ("llama3_tokenizer", "chat_tokenizer", "tokenizer")  # the ones with a chat template
LONG = "describe the garden and the river by the golden house : " * 6

EXPLICIT = [
    {"prompt": "describe the garden :", "chosen": " sunny warm day", "rejected": " dark cold day"},
    {"prompt": "Answer: ", "chosen": "Yes it is.", "rejected": "No it is not."},  # 'Ġ' + 'Yes' merge
    {"prompt": "tell the beach : ", "chosen": "bright sky", "rejected": "grey sky"},
    {"prompt": LONG, "chosen": " calm water", "rejected": " wild water"},  # prompt longer than max_length
    {"prompt": "write the city :", "chosen": " golden light" * 12, "rejected": " harsh wind"},
]
HH = "\n\nHuman: {}\n\nAssistant: {}"
IMPLICIT = [
    {
        "chosen": HH.format("What color is the sky?", "It is blue."),
        "rejected": HH.format("What color is the sky?", "No."),
    },
    {
        "chosen": HH.format("Can you help me?", "Sure thing, please wait."),
        "rejected": HH.format("Can you help me?", "Sure"),
    },
    {"chosen": HH.format("Why is it blue?", "Maybe."), "rejected": HH.format("Why is it blue?", "")[:-1]},  # "...:"
    {
        "chosen": HH.format("Why is the sea blue?", "It is the sky.") + HH.format("Is it?", "Yes, sure."),
        "rejected": HH.format("Why is the sea blue?", "It is the sky.") + HH.format("Is it?", "No, it is red."),
    },
    {"chosen": HH.format(LONG, "Yes."), "rejected": HH.format(LONG, "No.")},
    {"chosen": HH.format("Help me.", "Sure thing, " * 10 + "yes."), "rejected": HH.format("Help me.", "No.")},
]


def _turn(role, content):
    return {"role": role, "content": content}


CONVERSATIONAL = [
    {
        "prompt": [_turn("user", "describe the garden")],
        "chosen": [_turn("assistant", "sunny warm day")],
        "rejected": [_turn("assistant", "dark cold day")],
    },
    {
        "prompt": [
            _turn("system", "be brief"),
            _turn("user", "tell the beach"),
            _turn("assistant", "bright"),
            _turn("user", "more"),
        ],
        "chosen": [_turn("assistant", "golden light")],
        "rejected": [_turn("assistant", "grey wind")],
    },
    {"prompt": [_turn("user", LONG)], "chosen": [_turn("assistant", "calm")], "rejected": [_turn("assistant", "wild")]},
    {
        "prompt": [_turn("user", "write the city")],
        "chosen": [_turn("assistant", "golden light " * 12)],
        "rejected": [_turn("assistant", "harsh wind")],
    },
]
CONVERSATIONAL_IMPLICIT = [
    {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONVERSATIONAL
]
FORMATS = {
    "explicit": (EXPLICIT, TOKENIZERS),
    "implicit": (IMPLICIT, TOKENIZERS),
    "conversational": (CONVERSATIONAL, CHAT_TOKENIZERS),
    "conversational_implicit": (CONVERSATIONAL_IMPLICIT, CHAT_TOKENIZERS),
}
CASES = [(f, t) for f, (_, tokenizers) in FORMATS.items() for t in tokenizers]
TRUNCATION = [(None, "keep_start"), (24, "keep_start"), (24, "keep_end")]


def _pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


PARTS = tuple(f"{side} {what}" for side in ("chosen", "rejected") for what in ("ids", "completion_mask", "attention"))


def _sequences(batch, rows: list[int]) -> dict[int, tuple]:
    """{row: (ids, completion_mask, attention_mask) of chosen, then of rejected}, trailing padding stripped.

    ``batch`` is [chosen; rejected] (2B, T) with B = len(rows).
    """
    out, n = {}, len(rows)
    for b, row in enumerate(rows):
        parts = []
        for s in (b, b + n):
            width = int(batch["attention_mask"][s].nonzero().max()) + 1  # up to the last attended token
            parts += [batch[key][s][:width].tolist() for key in ("input_ids", "completion_mask", "attention_mask")]
        out[row] = tuple(parts)
    return out


def _trl_sequences(tokenizer, records, max_length, mode, tmp_path) -> dict[int, tuple]:
    from datasets import Dataset

    tokenizer = copy.deepcopy(tokenizer)  # DPOTrainer sets a pad token on the tokenizer it is given
    model = tiny_causal_lm(len(tokenizer), hidden_size=16, num_layers=1, seed=0)
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_length=max_length,
        truncation_mode=mode,
        per_device_train_batch_size=len(records),
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=Dataset.from_list([{"row": i, **r} for i, r in enumerate(records)]),
        processing_class=tokenizer,
    )
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    sequences = _sequences(batch, dataset["row"])
    # what training draws (shuffled, one batch of all rows) is the same set of sequence pairs
    drawn = next(iter(trainer.get_train_dataloader()))
    assert sorted(_sequences(drawn, list(range(len(dataset)))).values()) == sorted(sequences.values())
    return sequences


def _first_difference(ours: list[int], theirs: list[int]) -> str:
    k = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"at token {k} (moedpo {ours[k : k + 4]}, TRL {theirs[k : k + 4]}; lengths {len(ours)} vs {len(theirs)})"


@pytest.mark.filterwarnings(*TRL_WARNINGS)
@pytest.mark.parametrize("max_length, mode", TRUNCATION)
@pytest.mark.parametrize("fmt, tokenizer_name", CASES)
def test_ids_match_trl_dpo_trainer(fmt, tokenizer_name, max_length, mode, request, tmp_path):
    tokenizer = request.getfixturevalue(tokenizer_name)
    records = FORMATS[fmt][0]
    expected = _trl_sequences(tokenizer, records, max_length, mode, tmp_path)
    rows = [normalise_row(r, fmt, i) for i, r in enumerate(records)]
    out = tokenize_rows(rows, tokenizer, source=fmt, max_length=max_length, truncation_mode=mode)
    ours = _sequences(collate(out.examples, _pad_id(tokenizer)), [e["index"] for e in out.examples])
    for row in sorted(set(ours) & set(expected)):
        for what, a, b in zip(PARTS, ours[row], expected[row], strict=True):
            assert a == b, f"row {row} {what} differ {_first_difference(a, b)}"
    assert sorted(ours) == sorted(expected), f"kept rows: moedpo {sorted(ours)}, TRL {sorted(expected)}"
    assert [i for i, _ in out.dropped] == sorted(set(range(len(records))) - set(expected))
    assert out.num_dropped == len(out.dropped)
    if max_length is not None:  # the case exercises truncation, and keep_start drops the long prompt
        assert out.num_truncated >= 1
        assert (out.num_dropped >= 1) == (mode == "keep_start")


@pytest.mark.filterwarnings(*TRL_WARNINGS)
@pytest.mark.parametrize(
    "chosen, rejected",
    [
        (IMPLICIT[0]["chosen"], IMPLICIT[0]["rejected"]),
        (IMPLICIT[1]["chosen"], IMPLICIT[1]["rejected"]),  # rejected is a prefix of chosen
        (IMPLICIT[2]["chosen"], IMPLICIT[2]["rejected"]),  # rejected stops at "Assistant:"
        (IMPLICIT[1]["rejected"], IMPLICIT[1]["chosen"]),  # chosen is a prefix of rejected
        ("tell the beach : warm sky", "tell the beach : cold sky"),
        (CONVERSATIONAL_IMPLICIT[1]["chosen"], CONVERSATIONAL_IMPLICIT[1]["rejected"]),
    ],
)
def test_implicit_prompt_split_matches_trl_extract_prompt(chosen, rejected):
    from trl.data_utils import extract_prompt

    row = normalise_row({"chosen": chosen, "rejected": rejected}, "f", 0)
    assert {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected} == extract_prompt(
        {"chosen": chosen, "rejected": rejected}
    )


def test_boundary_merge_keeps_the_first_completion_word(gpt2_tokenizer):
    """'Answer: ' alone ends in 'Ġ'; with the completion that space merges into 'ĠYes', which is trained on."""
    row = normalise_row({"prompt": "Answer: ", "chosen": "Yes it is.", "rejected": "No it is not."}, "f", 0)
    example = tokenize_rows([row], gpt2_tokenizer).examples[0]
    tokens = gpt2_tokenizer.convert_ids_to_tokens
    assert tokens(example["prompt_chosen_ids"]) == ["Answer", ":"]
    assert tokens(example["chosen_ids"])[0] == "ĠYes"
    assert gpt2_tokenizer.decode(example["chosen_ids"]) == " Yes it is.<|endoftext|>"


def test_special_tokens_come_from_the_tokenizer(gpt2_tokenizer, llama3_tokenizer, chat_tokenizer):
    plain = normalise_row(EXPLICIT[0], "f", 0)
    gpt2 = tokenize_rows([plain], gpt2_tokenizer).examples[0]  # GPT-2 adds no BOS; completions end in one EOS
    assert gpt2["prompt_chosen_ids"][0] != gpt2_tokenizer.bos_token_id
    eos = gpt2_tokenizer.eos_token_id
    assert gpt2["chosen_ids"][-1] == eos and gpt2["chosen_ids"][-2] != eos
    llama = tokenize_rows([plain], llama3_tokenizer).examples[0]  # one BOS, from the post-processor
    assert llama["prompt_chosen_ids"].count(llama3_tokenizer.bos_token_id) == 1
    assert llama["prompt_chosen_ids"][0] == llama3_tokenizer.bos_token_id
    conv = tokenize_rows([normalise_row(CONVERSATIONAL[0], "f", 0)], chat_tokenizer).examples[0]
    assert chat_tokenizer.decode(conv["chosen_ids"]) == "sunny warm day<|im_end|>\n"  # no EOS after the turn


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_prompt_input_ids_are_the_training_prompt_ids(tokenizer_name, request):
    """Equal where the prompt ends on a token boundary; otherwise training's prompt is their head (as in TRL):
    "Answer: " before "Yes", or an HH row whose rejected answer is a prefix of the chosen one."""
    from moedpo.data.tokenize import prompt_input_ids

    tokenizer = request.getfixturevalue(tokenizer_name)
    clean = [EXPLICIT[0], EXPLICIT[3], EXPLICIT[4], IMPLICIT[0], IMPLICIT[3], IMPLICIT[4], IMPLICIT[5]]
    if tokenizer.chat_template is not None:
        clean += CONVERSATIONAL + CONVERSATIONAL_IMPLICIT
    records = clean + [EXPLICIT[1], EXPLICIT[2], IMPLICIT[1], IMPLICIT[2]]
    rows = [normalise_row(r, "f", i) for i, r in enumerate(records)]
    for row, example in zip(rows, tokenize_rows(rows, tokenizer).examples, strict=True):
        ids, trained = prompt_input_ids(tokenizer, row.prompt), example["prompt_chosen_ids"]
        assert trained == example["prompt_rejected_ids"] == ids[: len(trained)], f"row {example['index']}"
        assert example["index"] >= len(clean) or trained == ids, f"row {example['index']}"


def test_dropped_rows_are_counted_with_a_reason(gpt2_tokenizer):
    rows = [normalise_row(r, "f", i) for i, r in enumerate(EXPLICIT)]
    out = tokenize_rows(rows, gpt2_tokenizer, source="f", max_length=24)
    assert out.num_dropped == 1 and [i for i, _ in out.dropped] == [3]
    assert "max_length is 24" in out.dropped[0][1]
    assert [e["index"] for e in out.examples] == [0, 1, 2, 4] and len(out.groups) == len(rows)
    kept_end = tokenize_rows(rows, gpt2_tokenizer, max_length=24, truncation_mode="keep_end")
    assert kept_end.num_dropped == 0 and len(kept_end.examples) == len(rows)
    with pytest.raises(
        PreferenceDataError, match=r"f: row 1 \(counting from 1\): field 'prompt': no usable rows remain: all 1 rows"
    ):
        tokenize_rows(rows[3:4], gpt2_tokenizer, source="f", max_length=24)


@pytest.mark.parametrize(
    "record, field, words",
    [
        ({"chosen": HH.format("hi", "yes"), "rejected": None}, "rejected", "missing"),
        ({"chosen": HH.format("hi", "yes"), "rejected": 5}, "rejected", "expected a string"),
        ({"chosen": "", "rejected": HH.format("hi", "no")}, "chosen", "empty completion"),
    ],
)
def test_malformed_implicit_rows_still_raise(record, field, words):
    with pytest.raises(PreferenceDataError, match=words) as info:
        normalise_row(record, "hh.jsonl", 7)
    assert (info.value.source, info.value.row, info.value.field) == ("hh.jsonl", 7, field)


def _exactly(tokenizer, tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens for ``tokenizer`` (its own special tokens counted)."""
    text = ""
    while len(tokenizer(text + " garden")["input_ids"]) <= tokens:
        text += " garden"
    assert len(tokenizer(text)["input_ids"]) == tokens
    return text


@pytest.mark.filterwarnings(*TRL_WARNINGS)
def test_edge_rows_match_trl(gpt2_tokenizer, tmp_path):
    """Rows at the edges of TRL's rules: only one completion merges with the prompt across the boundary; a
    completion that already ends with the EOS text (no second EOS); a prompt of exactly max_length tokens
    (dropped under keep_start, as TRL drops it) and one of max_length - 1 (kept)."""
    eos = gpt2_tokenizer.eos_token
    records = [
        {"prompt": "Answer: ", "chosen": "Yes", "rejected": "\nNo"},
        {"prompt": "Answer: ", "chosen": "\nYes", "rejected": "Yes"},  # only the rejected one merges
        {"prompt": "tell the beach :", "chosen": " bright sky" + eos, "rejected": " grey sky"},
        {"prompt": _exactly(gpt2_tokenizer, 24), "chosen": " calm", "rejected": " wild"},
        {"prompt": _exactly(gpt2_tokenizer, 23), "chosen": " calm", "rejected": " wild"},
    ]
    expected = _trl_sequences(gpt2_tokenizer, records, 24, "keep_start", tmp_path)
    rows = [normalise_row(r, "edge", i) for i, r in enumerate(records)]
    out = tokenize_rows(rows, gpt2_tokenizer, source="edge", max_length=24, truncation_mode="keep_start")
    ours = _sequences(collate(out.examples, _pad_id(gpt2_tokenizer)), [e["index"] for e in out.examples])
    assert sorted(expected) == sorted(ours) == [0, 1, 2, 4] and [i for i, _ in out.dropped] == [3]
    for row in ours:
        for what, a, b in zip(PARTS, ours[row], expected[row], strict=True):
            assert a == b, f"row {row} {what} differ {_first_difference(a, b)}"
    assert ours[2][0].count(gpt2_tokenizer.eos_token_id) == 1
