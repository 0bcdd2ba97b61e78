"""One generator for every planted-type world: annotators of hidden types label pairs by Bradley–Terry.

An annotator of type t prefers ``first`` over ``second`` with probability
sigmoid(scale * (r_t(first) - r_t(second))), with r_t the type's reward. The built-in world
(:mod:`.builtin`), the users world (:mod:`.users_world`) and the reviews worlds (:mod:`.reviews`,
:mod:`.reviews_world`) differ only in how a pair is drawn and what the reward is; they configure
:func:`label_pairs`. Rows come out in TRL's explicit-prompt format with ``user_id``, optional ``user_features`` and
the ground-truth ``group``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Annotator:
    user_id: str
    kind: object  # what the world's reward reads: a type name or index
    group: str  # the ground-truth column written with each row
    features: list[float] | None = None  # the user_features column, when the world has one


def bt_label(rng: random.Random, first: str, second: str, margin: float) -> tuple[str, str]:
    """(chosen, rejected) by a Bradley–Terry annotator: ``first`` wins with probability sigmoid(margin), the
    annotator's reward of ``first`` minus that of ``second``."""
    return (first, second) if rng.random() < 1 / (1 + math.exp(-margin)) else (second, first)


def distinct_pair(rng: random.Random, kind, draw: Callable, reward: Callable) -> tuple[str, str]:
    """Two completions from ``draw(rng)`` that type ``kind`` does not value equally (the second is redrawn)."""
    first, second = draw(rng), draw(rng)
    while reward(first, kind) == reward(second, kind):
        second = draw(rng)
    return first, second


def label_pairs(
    annotators: Sequence[Annotator],
    pairs_per_annotator: int,
    draw_pair: Callable,
    reward: Callable,
    rng: random.Random,
    scale: float = 1.0,
) -> list[dict]:
    """``pairs_per_annotator`` labelled rows per annotator, in order. ``draw_pair(rng, kind)`` gives
    (prompt, first, second), or None for a pair that cannot be labelled (skipped, still counted);
    ``reward(text, kind)`` is the type's reward."""
    rows = []
    for annotator in annotators:
        for _ in range(pairs_per_annotator):
            pair = draw_pair(rng, annotator.kind)
            if pair is None:
                continue
            prompt, first, second = pair
            margin = scale * (reward(first, annotator.kind) - reward(second, annotator.kind))
            chosen, rejected = bt_label(rng, first, second, margin)
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "user_id": annotator.user_id}
            if annotator.features is not None:
                row["user_features"] = annotator.features
            row["group"] = annotator.group
            rows.append(row)
    return rows
