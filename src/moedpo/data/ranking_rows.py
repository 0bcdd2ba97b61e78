"""Ranking rows: a prompt with three or more completions and their order, for Plackett–Luce latent models.

A row has ``completions`` (a list of texts, or of message lists for conversational data) and either
``ranking`` (completion indices, best first: a permutation of 0..M-1) or ``scores`` (one number per completion,
higher is better, as UltraFeedback's ratings). ``prompt`` is given, or, as for TRL's implicit-prompt pairs, split
off the completions where they stop sharing a prefix (:func:`moedpo.data.formats.prompt_cut` over every pair
with the first completion). Optional columns as for pairs: ``user_id``, ``user_features``, ``group``.

Ties in ``scores``: the completions are sorted by score (ties keep the file's order) and only the places above
the first tie are observed, ``ranked`` = the number of leading completions each scored strictly above everything
below it. Scores [9, 7, 7, 2] give ranking [0, 1, 2, 3] with ranked = 1: "0 is the best of the four"; the order
of 1, 2 and 3 is not used (Plackett–Luce has no ties; this is the exact likelihood of the observed top-k with
the rest summed out). A row whose best score ties (ranked = 0) says nothing and is dropped, counted, like a pair
whose chosen equals its rejected. Two identical completions in one ranking are kept (the order of the others
still informs; between the two an expert cannot choose). A ranking of two completions is a pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moedpo.data.formats import (
    PreferenceDataError,
    PreferenceRow,
    check_completion,
    is_messages,
    json_cell,
    normalise_row,
    optional_fields,
    prompt_cut,
)


@dataclass
class RankingRow:
    prompt: str | list
    completions: list  # M texts or message lists
    ranking: list[int]  # completion indices, best first
    ranked: int  # observed first choices: M - 1 for a strict order, fewer above tied scores
    user_id: str | None = None
    user_features: list[float] | None = None
    group: str | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.completions[0], list)

    @property
    def no_preference(self) -> bool:
        """The best completion ties with another: nothing about the order is known."""
        return self.ranked == 0


def _completions(record, source, row) -> list:
    completions = json_cell(record.get("completions"), source, row, "completions")
    if not isinstance(completions, list | tuple) or len(completions) < 2:
        raise PreferenceDataError(
            source, row, "completions", f"expected a list of two or more completions, got {completions!r:.80}"
        )
    return list(completions)


def _order(record, count: int, source, row) -> tuple[list[int], int]:
    """(ranking, ranked) from ``ranking`` or ``scores``, exactly one of them."""
    ranking, scores = record.get("ranking"), record.get("scores")
    if (ranking is None) == (scores is None):
        found = "both" if ranking is not None else "neither"
        raise PreferenceDataError(source, row, "ranking", f"give 'ranking' (indices, best first) or 'scores'; {found}")
    if ranking is not None:
        ranking = json_cell(ranking, source, row, "ranking")
        indices = isinstance(ranking, list | tuple) and all(type(i) is int for i in ranking)  # no bools, no floats
        if not indices or sorted(ranking) != list(range(count)):
            problem = f"expected a permutation of 0..{count - 1} (completion indices, best first), got {ranking!r:.80}"
            raise PreferenceDataError(source, row, "ranking", problem)
        return list(ranking), count - 1
    scores = json_cell(scores, source, row, "scores")
    numbers = isinstance(scores, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in scores
    )
    if not numbers or len(scores) != count:
        problem = f"expected {count} finite numbers (one per completion, higher is better), got {scores!r:.80}"
        raise PreferenceDataError(source, row, "scores", problem)
    order = sorted(range(count), key=lambda i: -scores[i])  # stable: ties keep the file's order
    ranked = next((j for j in range(count - 1) if scores[order[j]] == scores[order[j + 1]]), count - 1)
    return order, ranked


def _split_implicit(completions: list, source, row) -> tuple:
    cut = min(prompt_cut(completions[0], other) for other in completions[1:])
    if cut <= 0 and any(c != completions[0] for c in completions[1:]):
        raise PreferenceDataError(
            source, row, "prompt",
            "missing, and the completions share no prefix to split off as the prompt; give a 'prompt' column, "
            "or whole texts/conversations that share the prompt",
        )  # fmt: skip
    return completions[0][:cut], [c[cut:] for c in completions]


def normalise_ranking_row(record: dict[str, Any], source: str, row: int) -> RankingRow:
    """Validate one raw ranking record and return it with an explicit prompt (conversational rows stay messages)."""
    completions, prompt = _completions(record, source, row), record.get("prompt")
    conversational = any(is_messages(c) for c in completions)
    for j, completion in enumerate(completions):
        check_completion(completion, source, row, f"completions[{j}]", conversational, explicit=prompt is not None)
    ranking, ranked = _order(record, len(completions), source, row)
    if prompt is None:
        prompt, completions = _split_implicit(completions, source, row)
    elif conversational and not is_messages(prompt):
        raise PreferenceDataError(source, row, "prompt", "conversational rows need the prompt as a list of messages")
    elif not conversational and not isinstance(prompt, str):
        raise PreferenceDataError(source, row, "prompt", f"expected a string, got {type(prompt).__name__}")
    return RankingRow(prompt, completions, ranking, ranked, **optional_fields(record, source, row))


def normalise_record(record: Any, source: str, row: int) -> PreferenceRow | RankingRow:
    """One raw record as a checked row: a ranking when it has ``completions``, else a pair in TRL's formats."""
    if isinstance(record, dict) and "completions" in record:
        return normalise_ranking_row(record, source, row)
    return normalise_row(record, source, row)
