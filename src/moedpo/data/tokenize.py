"""Tokenize preference rows to the ids TRL 1.16's ``DPOTrainer`` trains on, and collate them into one
[chosen; rejected] right-padded batch.

What TRL 1.16 does (``DPOTrainer._prepare_dataset`` and ``DataCollatorForPreference``), and so do we:

- Special tokens come from the tokenizer alone. Plain text is tokenized with the tokenizer's own post-processor
  (a Llama-3 style one adds BOS, a GPT-2 style one adds nothing); chat messages through ``apply_chat_template``
  (whose template writes any BOS). Plain-text completions get the EOS *text* appended unless they already end
  with it; conversational completions get nothing after the template's end of turn.
- The prompt, prompt+chosen and prompt+rejected are tokenized separately. The completion starts where the
  prompt's ids stop being a prefix of *both* joint tokenizations, so a token that merges across the boundary
  (``"Answer: "`` + ``"Yes"`` -> ``'Ġ'`` vs ``'ĠYes'``) goes to the completions and the prompt loses its tail.
  One prompt serves chosen and rejected.
- Truncation is per sequence (prompt+completion) to ``max_length``: ``keep_start`` keeps the first tokens and
  drops rows whose prompt alone has ``max_length`` tokens or more (nothing would be left to learn from);
  ``keep_end`` (deprecated in TRL 1.16) keeps the last tokens and drops nothing.
- A pair whose chosen equals its rejected is dropped too (TRL trains on it, but it carries no preference).

``max_prompt_length`` is not a TRL 1.16 option: when set, the prompt keeps its last ``max_prompt_length`` tokens
(those next to the completion) before the rules above. Each example keeps prompt, chosen and rejected ids
separately; ``collate`` builds ``input_ids`` (2B, T), ``attention_mask`` and ``completion_mask`` (1 on completion
tokens only, which is what log-probs sum over), exactly the layout of TRL's ``DataCollatorForPreference``.

Rankings (:mod:`moedpo.data.ranking_rows`) go through the same rules, every completion joined to the one prompt
(which ends where its ids stop being a prefix of all of them); ``collate_rankings`` stacks one block of B rows per
completion, (M * B, T).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moedpo.data.formats import PreferenceDataError, PreferenceRow
from moedpo.data.ranking_rows import RankingRow

TRUNCATION_MODES = ("keep_start", "keep_end")
NO_PREFERENCE = "chosen equals rejected (no preference)"
TIED_BEST = "the best completions' scores tie (no preference)"


@dataclass
class Tokenized:
    examples: list[dict]
    user_ids: list[str]  # position = integer user index
    num_truncated: int = 0
    groups: list[str | None] = field(default_factory=list)  # one per input row, dropped ones included
    num_dropped: int = 0
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (0-based row, one-line reason)


def _chat_ids(tokenizer, messages: list, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def prompt_input_ids(tokenizer, prompt: str | list) -> list[int]:
    """Ids the model sees for ``prompt`` (a string or chat messages) at generation and routing time.

    The same call that gives the prompt ids in training: the tokenizer's special tokens for a string, the chat
    template with its generation prompt for messages. Training's prompt is exactly these ids unless a token
    merges across the prompt/completion boundary (a prompt ending in a space before a byte-level BPE tokenizer's
    ``'Ġword'``); it is then these ids without their merged tail, as in TRL.
    """
    if isinstance(prompt, list):
        return _chat_ids(tokenizer, prompt, add_generation_prompt=True)
    return tokenizer(prompt)["input_ids"]


def prompt_text(tokenizer, prompt: str | list) -> str:
    """The prompt as text: a string as it is, chat messages rendered with the generation prompt."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_completions(tokenizer, prompt: str | list, completions: list) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, completion ids) for one prompt and its completions (texts or message lists): each is
    tokenized joined to the prompt, and the prompt ends where its ids stop being a prefix of every joint one."""
    prompt_ids = prompt_input_ids(tokenizer, prompt)
    if isinstance(prompt, list):
        full = [_chat_ids(tokenizer, prompt + completion) for completion in completions]
    else:
        eos = tokenizer.eos_token or ""
        full = [tokenizer(prompt + (c if c.endswith(eos) else c + eos))["input_ids"] for c in completions]
    cut = min(_common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:cut], [ids[cut:] for ids in full]


def truncate(prompt: list[int], completion: list[int], max_length: int | None, mode: str):
    """(prompt, completion, truncated) after cutting the sequence prompt+completion to ``max_length`` tokens."""
    if max_length is None or len(prompt) + len(completion) <= max_length:
        return prompt, completion, False
    if mode == "keep_start":  # the caller has dropped rows with len(prompt) >= max_length
        return prompt, completion[: max_length - len(prompt)], True
    if len(completion) >= max_length:
        return [], completion[-max_length:], True
    return prompt[len(prompt) + len(completion) - max_length :], completion, True


def drop_reason(prompt_ids: list[int], max_length: int | None, mode: str) -> str | None:
    if max_length is not None and mode == "keep_start" and len(prompt_ids) >= max_length:
        return (
            f"prompt has {len(prompt_ids)} tokens, max_length is {max_length}: no completion token would be left "
            "(TRL's keep_start drops it)"
        )
    return None


def no_rows_left(source: str, dropped: list[tuple[int, str]]) -> PreferenceDataError:
    """The error for a dataset with every row dropped; it names the first row dropped for length, if any."""
    too_long = [(row, reason) for row, reason in dropped if reason not in (NO_PREFERENCE, TIED_BEST)]
    row, reason = (too_long or dropped)[0]
    if too_long:
        field, hint = "prompt", "raise max_length, set max_prompt_length below it, or use truncation_mode=keep_end"
    elif reason == TIED_BEST:
        field, hint = "scores", "give rankings whose best completion scores above the others"
    else:
        field, hint = "rejected", "give pairs whose chosen and rejected answers differ"
    return PreferenceDataError(
        source, row, field, f"no usable rows remain: all {len(dropped)} rows were dropped ({reason}); {hint}"
    )


def tokenize_rows(
    rows: list[PreferenceRow | RankingRow],
    tokenizer,
    *,
    source: str = "<data>",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    user_ids: list[str] | None = None,
) -> Tokenized:
    """Tokenize rows like TRL; returns examples with integer user indices (new users appended to ``user_ids``).

    Pairs become ``prompt_chosen_ids`` / ``prompt_rejected_ids`` / ``chosen_ids`` / ``rejected_ids``; rankings
    (:mod:`moedpo.data.ranking_rows`) ``prompt_ids`` and ``completion_ids`` (one list per completion, the prompt as
    each sequence keeps it after truncation), ``ranking`` and ``ranked``, each completion joined to the one prompt
    by the same rules. Rows TRL drops, pairs whose chosen equals their rejected and rankings whose best scores tie
    (no preference) are counted in ``num_dropped`` and listed in ``dropped``; their users are not registered.
    Raises :class:`PreferenceDataError` if rows were given and every one was dropped.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode {truncation_mode!r}: expected one of {TRUNCATION_MODES}")
    users = list(user_ids or [])
    lookup = {u: i for i, u in enumerate(users)}
    examples, dropped, truncated_rows = [], [], 0
    for i, row in enumerate(rows):
        ranking = isinstance(row, RankingRow)
        if row.no_preference:  # TRL trains on it; it carries no preference, so it is dropped and counted
            dropped.append((i, TIED_BEST if ranking else NO_PREFERENCE))
            continue
        completions = row.completions if ranking else [row.chosen, row.rejected]
        prompt_ids, completion_ids = split_completions(tokenizer, row.prompt, completions)
        cut_prompt = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
        if cut_prompt:
            prompt_ids = prompt_ids[-max_prompt_length:]
        reason = drop_reason(prompt_ids, max_length, truncation_mode)
        if reason is not None:
            dropped.append((i, reason))
            continue
        cuts = [truncate(prompt_ids, ids, max_length, truncation_mode) for ids in completion_ids]
        truncated_rows += cut_prompt or any(cut for _, _, cut in cuts)
        user = row.user_id if row.user_id is not None else f"__row_{i}"
        if user not in lookup:
            lookup[user] = len(users)
            users.append(user)
        if ranking:
            ids = {"prompt_ids": [p for p, _, _ in cuts], "completion_ids": [c for _, c, _ in cuts],
                   "ranking": row.ranking, "ranked": row.ranked}  # fmt: skip
        else:
            (p_c, chosen_ids, _), (p_r, rejected_ids, _) = cuts
            ids = {"prompt_chosen_ids": p_c, "prompt_rejected_ids": p_r, "chosen_ids": chosen_ids,
                   "rejected_ids": rejected_ids}  # fmt: skip
        examples.append(
            {"index": i, "prompt_text": prompt_text(tokenizer, row.prompt), **ids, "user": lookup[user],
             "group": row.group, "user_features": row.user_features}
        )  # fmt: skip
    if rows and not examples:
        raise no_rows_left(source, dropped)
    return Tokenized(examples, users, truncated_rows, [row.group for row in rows], len(dropped), dropped)


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    """Right-padded (N, longest) long tensor of the id lists."""
    rows = [torch.tensor(s, dtype=torch.long) for s in sequences]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def collate(examples: list[dict], pad_token_id: int) -> dict:
    """Right-padded [chosen; rejected] batch: input_ids/attention_mask/completion_mask (2B, T); index, user (B,)."""
    chosen = [e["prompt_chosen_ids"] + e["chosen_ids"] for e in examples]
    rejected = [e["prompt_rejected_ids"] + e["rejected_ids"] for e in examples]
    completion = [[0] * len(e["prompt_chosen_ids"]) + [1] * len(e["chosen_ids"]) for e in examples] + [
        [0] * len(e["prompt_rejected_ids"]) + [1] * len(e["rejected_ids"]) for e in examples
    ]
    sequences = chosen + rejected
    batch = {
        "input_ids": pad(sequences, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in sequences], 0),
        "completion_mask": pad(completion, 0),
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "user": torch.tensor([e["user"] for e in examples], dtype=torch.long),
        "group": [e["group"] for e in examples],
    }
    if all(e["user_features"] is not None for e in examples):
        batch["user_features"] = torch.tensor([e["user_features"] for e in examples], dtype=torch.float32)
    if all("prompt_features" in e for e in examples):  # sentence-encoder features for the gate
        batch["prompt_features"] = torch.stack([e["prompt_features"] for e in examples])
    return batch


def collate_rankings(examples: list[dict], pad_token_id: int) -> dict:
    """Right-padded batch of B rankings of up to M completions: ``input_ids`` / ``attention_mask`` /
    ``completion_mask`` (M * B, T) in completion-major blocks (rows m * B .. m * B + B - 1 hold completion m of
    every ranking; a ranking with fewer completions has a one-pad-token row there), ``ranking`` (B, M) and
    ``ranking_mask`` (B, M) (its padding ranks last), ``ranked`` (B,), ``index``, ``user`` (B,), ``group``."""
    width = max(len(e["completion_ids"]) for e in examples)
    sequences, completion = [], []
    for m in range(width):
        for e in examples:
            # a missing completion: one pad token, attended, outside the completion (its log-prob is 0; a row
            # with nothing attended can turn attention's softmax into NaN)
            missing = m >= len(e["completion_ids"])
            prompt, ids = ([pad_token_id], []) if missing else (e["prompt_ids"][m], e["completion_ids"][m])
            sequences.append(prompt + ids)
            completion.append([0] * len(prompt) + [1] * len(ids))
    rankings = [e["ranking"] + list(range(len(e["ranking"]), width)) for e in examples]
    batch = {
        "input_ids": pad(sequences, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in sequences], 0),
        "completion_mask": pad(completion, 0),
        "ranking": torch.tensor(rankings, dtype=torch.long),
        "ranking_mask": torch.arange(width) < torch.tensor([len(e["ranking"]) for e in examples]).unsqueeze(-1),
        "ranked": torch.tensor([e["ranked"] for e in examples], dtype=torch.long),
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "user": torch.tensor([e["user"] for e in examples], dtype=torch.long),
        "group": [e["group"] for e in examples],
    }
    if all(e["user_features"] is not None for e in examples):
        batch["user_features"] = torch.tensor([e["user_features"] for e in examples], dtype=torch.float32)
    return batch


def collate_examples(examples: list[dict], pad_token_id: int) -> dict:
    """A batch of tokenized pairs (:func:`collate`) or rankings (:func:`collate_rankings`)."""
    if examples and "completion_ids" in examples[0]:
        return collate_rankings(examples, pad_token_id)
    return collate(examples, pad_token_id)
