"""Preference rows in TRL's formats, normalised to {prompt, chosen, rejected} plus optional columns.

Accepted (as TRL's ``DPOTrainer``):
- explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings;
- implicit prompt: ``chosen`` and ``rejected`` share a prefix, which becomes the prompt;
- conversational: lists of ``{"role", "content"}`` messages, rendered with the tokenizer's chat template.
Optional columns: ``user_id`` (annotator), ``user_features`` (list of numbers), ``group`` (ground-truth type,
used only for evaluation). A bad row raises :class:`PreferenceDataError` naming file, row and field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

OPTIONAL = ("user_id", "user_features", "group")


class PreferenceDataError(ValueError):
    """A row that cannot be used; the message names the source, the 0-based row and the field."""

    def __init__(self, source: str, row: int, field: str, problem: str):
        self.source, self.row, self.field = source, row, field
        super().__init__(f"{source}: row {row}: field {field!r}: {problem}")


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


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_completion(value, source, row, field, conversational) -> None:
    if value is None:
        raise PreferenceDataError(source, row, field, "missing (expected a non-empty completion)")
    if conversational:
        if not _is_messages(value) or not value:
            raise PreferenceDataError(source, row, field, f"expected a non-empty list of messages, got {value!r:.80}")
        if any(not isinstance(m["content"], str) or not m["content"].strip() for m in value):
            raise PreferenceDataError(source, row, field, "a message has empty or non-string content")
        return
    if not isinstance(value, str):
        raise PreferenceDataError(source, row, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise PreferenceDataError(source, row, field, "empty completion")


def _common_prefix(a: str, b: str) -> str:
    n = len(os.path.commonprefix([a, b]))
    cut = max(a.rfind(" ", 0, n + 1), a.rfind("\n", 0, n + 1))  # split on a word boundary
    return a[: cut + 1] if cut >= 0 and n < min(len(a), len(b)) else a[:n]


def normalise_row(record: dict[str, Any], source: str, row: int) -> PreferenceRow:
    """Validate one raw record and return it in explicit-prompt form (conversational rows stay messages)."""
    if not isinstance(record, dict):
        raise PreferenceDataError(source, row, "<row>", f"expected an object with chosen/rejected, got {record!r:.80}")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    conversational = _is_messages(chosen) or _is_messages(rejected)
    _check_completion(chosen, source, row, "chosen", conversational)
    _check_completion(rejected, source, row, "rejected", conversational)
    prompt = record.get("prompt")
    if prompt is None:  # implicit prompt: the shared prefix
        if conversational:
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            prompt = _common_prefix(chosen, rejected)
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        if not prompt:
            raise PreferenceDataError(source, row, "prompt", "missing, and chosen/rejected share no prefix")
        _check_completion(chosen, source, row, "chosen", conversational)
        _check_completion(rejected, source, row, "rejected", conversational)
    elif conversational and not _is_messages(prompt):
        raise PreferenceDataError(source, row, "prompt", "conversational rows need the prompt as a list of messages")
    elif not conversational and not isinstance(prompt, str):
        raise PreferenceDataError(source, row, "prompt", f"expected a string, got {type(prompt).__name__}")
    extras = {}
    for field in OPTIONAL:
        value = record.get(field)
        if value is None:
            continue
        if field == "user_features":
            if isinstance(value, str):  # CSV cells carry lists as JSON text
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise PreferenceDataError(
                        source, row, field, f"expected a list of numbers, got {value!r:.80}"
                    ) from None
            if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
                raise PreferenceDataError(source, row, field, f"expected a list of numbers, got {value!r:.80}")
            value = [float(v) for v in value]
        elif not isinstance(value, str | int):
            raise PreferenceDataError(source, row, field, f"expected a string or integer, got {type(value).__name__}")
        else:
            value = str(value)
        extras[field] = value
    return PreferenceRow(prompt, chosen, rejected, **extras)
