"""Preference rows in TRL's formats, normalised to {prompt, chosen, rejected} plus optional columns.

Accepted (as TRL's ``DPOTrainer``):
- explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings;
- implicit prompt: no ``prompt``; ``chosen`` and ``rejected`` are whole texts (e.g. Anthropic HH's
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) and the prompt is split off as TRL 1.16's ``data_utils.extract_prompt``
  does (see :func:`prompt_cut`);
- conversational: lists of ``{"role", "content"}`` messages, rendered with the tokenizer's chat template.
Optional columns: ``user_id`` (annotator), ``user_features`` (list of numbers), ``group`` (ground-truth type,
used only for evaluation). A bad row raises :class:`PreferenceDataError` naming file, row and field. A pair whose
chosen equals its rejected is not bad, only uninformative: it is kept here and dropped (counted) by
:func:`moedpo.data.tokenize.tokenize_rows`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

OPTIONAL = ("user_id", "user_features", "group")


class PreferenceDataError(ValueError):
    """A row that cannot be used; the message names the source, the row (counted from 1, as an editor shows
    lines of a JSONL file) and the field. ``.row`` keeps the 0-based index."""

    def __init__(self, source: str, row: int, field: str, problem: str):
        self.source, self.row, self.field = source, row, field
        super().__init__(f"{source}: row {row + 1} (counting from 1): field {field!r}: {problem}")


@dataclass
class PreferenceRow:
    prompt: str | list
    chosen: str | list
    rejected: str | list
    user_id: str | None = None
    user_features: list[float] | None = None
    group: str | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)

    @property
    def no_preference(self) -> bool:
        """Chosen equals rejected (texts or message lists): the pair says nothing about which is better."""
        return self.chosen == self.rejected


def is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def check_completion(value, source, row, field, conversational, explicit) -> None:
    """A completion must have the row's type; an explicitly given one (``explicit``) must also be non-empty.

    Implicit-prompt rows are whole texts/conversations, checked before the prompt is split off; what is left
    after the split is never empty (see :func:`prompt_cut`), so it is not checked again.
    """
    if value is None:
        raise PreferenceDataError(source, row, field, "missing (expected a non-empty completion)")
    if conversational:
        if not is_messages(value) or not value:
            raise PreferenceDataError(source, row, field, f"expected a non-empty list of messages, got {value!r:.80}")
        if any(not isinstance(m["content"], str) for m in value):
            raise PreferenceDataError(source, row, field, "a message has non-string content")
        if explicit and not any(m["content"].strip() for m in value):
            raise PreferenceDataError(source, row, field, "empty completion (every message's content is empty)")
        return
    if not isinstance(value, str):
        raise PreferenceDataError(source, row, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise PreferenceDataError(source, row, field, "empty completion")


def prompt_cut(chosen: str | list, rejected: str | list) -> int:
    """Where TRL 1.16's ``data_utils.extract_prompt`` cuts an implicit-prompt pair: the prompt is ``chosen[:cut]``.

    ``chosen``/``rejected`` are strings (cut in characters) or message lists (cut in messages). The cut is the
    first position where they differ; for strings, a space just before it goes with the completions, so
    ``"...Assistant: Sure"`` / ``"...Assistant: No"`` split into ``"...Assistant:"`` + ``" Sure"`` / ``" No"``
    (byte-level BPE tokenizers glue the space to the next word, so the prompt ends on a token boundary). When one
    is a prefix of the other (HH rows whose rejected answer is a truncated chosen one), the cut is one before the
    shorter one's end, so each completion keeps at least its last character (message).
    """
    shortest = min(len(chosen), len(rejected))
    for cut in range(shortest):
        if chosen[cut] != rejected[cut]:
            return cut - 1 if cut > 0 and chosen[cut - 1] == " " else cut
    return shortest - 1


def _split_implicit(chosen, rejected, source, row) -> tuple:
    """(prompt, chosen, rejected) of an implicit-prompt row; a pair that shares no prefix cannot carry a prompt.

    An identical pair splits like any other (a one-character or one-message pair into an empty prompt); it is
    dropped at tokenization, so its prompt is never used.
    """
    cut = prompt_cut(chosen, rejected)
    if cut <= 0 and chosen != rejected:
        raise PreferenceDataError(
            source,
            row,
            "prompt",
            "missing, and chosen/rejected share no prefix to split off as the prompt; "
            "give a 'prompt' column, or whole texts/conversations that share the prompt",
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def normalise_row(record: dict[str, Any], source: str, row: int) -> PreferenceRow:
    """Validate one raw record and return it in explicit-prompt form (conversational rows stay messages)."""
    if not isinstance(record, dict):
        raise PreferenceDataError(source, row, "<row>", f"expected an object with chosen/rejected, got {record!r:.80}")
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    conversational = is_messages(chosen) or is_messages(rejected)
    check_completion(chosen, source, row, "chosen", conversational, explicit=prompt is not None)
    check_completion(rejected, source, row, "rejected", conversational, explicit=prompt is not None)
    if prompt is None:  # an identical pair is kept here and dropped, counted, by tokenize_rows (no preference)
        prompt, chosen, rejected = _split_implicit(chosen, rejected, source, row)
    elif conversational and not is_messages(prompt):
        raise PreferenceDataError(source, row, "prompt", "conversational rows need the prompt as a list of messages")
    elif not conversational and not isinstance(prompt, str):
        raise PreferenceDataError(source, row, "prompt", f"expected a string, got {type(prompt).__name__}")
    return PreferenceRow(prompt, chosen, rejected, **optional_fields(record, source, row))


def json_cell(value, source: str, row: int, field: str, expected: str = "a JSON list"):
    """A list given as JSON text (how CSV cells carry lists) decoded; anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise PreferenceDataError(source, row, field, f"expected {expected}, got {value!r:.80}") from None


def optional_fields(record: dict[str, Any], source: str, row: int) -> dict:
    """The row's ``user_id``, ``user_features`` and ``group``, validated (those it has)."""
    extras = {}
    for field in OPTIONAL:
        value = record.get(field)
        if value is None:
            continue
        if field == "user_features":
            value = json_cell(value, source, row, field, "a list of numbers")
            if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
                raise PreferenceDataError(source, row, field, f"expected a list of numbers, got {value!r:.80}")
            value = [float(v) for v in value]
        elif not isinstance(value, str | int):
            raise PreferenceDataError(source, row, field, f"expected a string or integer, got {type(value).__name__}")
        else:
            value = str(value)
        extras[field] = value
    return extras
