"""Tokenize preference rows like TRL and collate them into one [chosen; rejected] right-padded batch.

Each example keeps prompt, chosen and rejected token ids separately; ``collate`` builds ``input_ids`` (2B, T),
``attention_mask`` and ``completion_mask`` (1 on completion tokens only, which is what log-probs sum over),
exactly the layout of TRL's ``DataCollatorForPreference``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moedpo.data.formats import PreferenceDataError, PreferenceRow

TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class Tokenized:
    examples: list[dict]
    user_ids: list[str]  # position = integer user index
    num_truncated: int = 0
    groups: list[str | None] = field(default_factory=list)


def _ids(tokenizer, text) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, row: PreferenceRow) -> tuple[str, list[int], list[int], list[int]]:
    if row.conversational:
        prompt = tokenizer.apply_chat_template(row.prompt, add_generation_prompt=True, tokenize=False)
        full_chosen = tokenizer.apply_chat_template(row.prompt + row.chosen, tokenize=False)
        full_rejected = tokenizer.apply_chat_template(row.prompt + row.rejected, tokenize=False)
    else:
        prompt, full_chosen, full_rejected = row.prompt, row.prompt + row.chosen, row.prompt + row.rejected
    prompt_ids = _ids(tokenizer, prompt)
    if tokenizer.bos_token_id is not None and not row.conversational:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    offset = len(prompt_ids) - (1 if tokenizer.bos_token_id is not None and not row.conversational else 0)
    chosen_ids = _ids(tokenizer, full_chosen)[offset:]
    rejected_ids = _ids(tokenizer, full_rejected)[offset:]
    eos = tokenizer.eos_token_id
    if eos is not None:  # like TRL: end every completion with EOS, once
        chosen_ids = chosen_ids if chosen_ids[-1:] == [eos] else chosen_ids + [eos]
        rejected_ids = rejected_ids if rejected_ids[-1:] == [eos] else rejected_ids + [eos]
    return prompt, prompt_ids, chosen_ids, rejected_ids


def _truncate(prompt, completion, max_length, max_prompt_length, mode):
    truncated = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, truncated = prompt[-max_prompt_length:], True
    if max_length is not None and len(prompt) + len(completion) > max_length:
        truncated = True
        if mode == "keep_start":
            completion = completion[: max(max_length - len(prompt), 0)]
        else:
            prompt = prompt[-max(max_length - len(completion), 0) :] if len(completion) < max_length else []
            completion = completion[-max_length:]
    return prompt, completion, truncated


def tokenize_rows(
    rows: list[PreferenceRow],
    tokenizer,
    *,
    source: str = "<data>",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    user_ids: list[str] | None = None,
) -> Tokenized:
    """Tokenize rows; returns examples with integer user indices (new users appended to ``user_ids``)."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode {truncation_mode!r}: expected one of {TRUNCATION_MODES}")
    users = list(user_ids or [])
    lookup = {u: i for i, u in enumerate(users)}
    examples, truncated_rows = [], 0
    for i, row in enumerate(rows):
        prompt_text, prompt_ids, chosen_ids, rejected_ids = _render(tokenizer, row)
        p_c, chosen_ids, t_c = _truncate(prompt_ids, chosen_ids, max_length, max_prompt_length, truncation_mode)
        p_r, rejected_ids, t_r = _truncate(prompt_ids, rejected_ids, max_length, max_prompt_length, truncation_mode)
        if not chosen_ids or not rejected_ids:
            field = "chosen" if not chosen_ids else "rejected"
            raise PreferenceDataError(source, i, field, f"no completion token left after truncation to {max_length}")
        truncated_rows += t_c or t_r
        user = row.user_id if row.user_id is not None else f"__row_{i}"
        if user not in lookup:
            lookup[user] = len(users)
            users.append(user)
        examples.append(
            {
                "index": i,
                "prompt_text": prompt_text,
                "prompt_chosen_ids": p_c,
                "prompt_rejected_ids": p_r,
                "chosen_ids": chosen_ids,
                "rejected_ids": rejected_ids,
                "user": lookup[user],
                "group": row.group,
                "user_features": row.user_features,
            }
        )
    return Tokenized(examples, users, truncated_rows, [row.group for row in rows])


def _pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def collate(examples: list[dict], pad_token_id: int) -> dict:
    """Right-padded [chosen; rejected] batch: input_ids/attention_mask/completion_mask (2B, T); index, user (B,)."""
    chosen = [e["prompt_chosen_ids"] + e["chosen_ids"] for e in examples]
    rejected = [e["prompt_rejected_ids"] + e["rejected_ids"] for e in examples]
    completion = [[0] * len(e["prompt_chosen_ids"]) + [1] * len(e["chosen_ids"]) for e in examples] + [
        [0] * len(e["prompt_rejected_ids"]) + [1] * len(e["rejected_ids"]) for e in examples
    ]
    sequences = chosen + rejected
    batch = {
        "input_ids": _pad(sequences, pad_token_id),
        "attention_mask": _pad([[1] * len(s) for s in sequences], 0),
        "completion_mask": _pad(completion, 0),
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "user": torch.tensor([e["user"] for e in examples], dtype=torch.long),
        "group": [e["group"] for e in examples],
    }
    if all(e["user_features"] is not None for e in examples):
        batch["user_features"] = torch.tensor([e["user_features"] for e in examples], dtype=torch.float32)
    if all("prompt_features" in e for e in examples):  # sentence-encoder features for the gate
        batch["prompt_features"] = torch.stack([e["prompt_features"] for e in examples])
    return batch
