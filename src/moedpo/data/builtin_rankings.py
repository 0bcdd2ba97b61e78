"""The built-in ranking world for LLM experts (``data.source: builtin:rankings``): the built-in world's words,
three annotator types, each annotator ranking the four completions of a prompt (issue 20's ranking world).

Types: ``bright`` rewards "bright" words over "dark" ones, scale * (#A - #B); ``dark`` the opposite; ``plain``
neither kind, -scale * (#A + #B) / 2 (it prefers the neutral words). A ranking is drawn by Plackett–Luce on the
annotator's rewards (best first). One ranking of four per annotator is three choices that share a type; one pair
per annotator (the ranking binarized) does not identify a mixture (SPEC §1).
"""

from __future__ import annotations

import math
import random

from moedpo.data.builtin import A_WORDS, B_WORDS, DOMAINS, PROMPT_VERBS, draw_completion

RANKING_TYPES = ("bright", "dark", "plain")


def ranking_reward(completion: str, group: str, scale: float = 1.5) -> float:
    """The planted reward of a completion for an annotator of type ``group`` (see the module docstring)."""
    words = completion.split()
    bright, dark = sum(w in A_WORDS for w in words), sum(w in B_WORDS for w in words)
    return scale * {"bright": bright - dark, "dark": dark - bright, "plain": -(bright + dark) / 2}[group]


def plackett_luce_order(rng: random.Random, rewards: list[float]) -> list[int]:
    """Indices best first, drawn by Plackett–Luce: each place picks among the rest with probability prop. to exp."""
    keys = [r - math.log(-math.log(rng.random() or 1e-300)) for r in rewards]  # Gumbel top-k
    return sorted(range(len(rewards)), key=lambda i: -keys[i])


def make_builtin_ranking_rows(
    annotators_per_type: int = 20,
    rankings_per_annotator: int = 1,
    completions: int = 4,
    scale: float = 1.5,
    seed: int = 0,
) -> list[dict]:
    """Ranking rows (``prompt``, ``completions``, ``ranking``, ``user_id``, ``group``); no two completions of a row
    share a reward under every type (ties would make the order carry nothing)."""
    rng = random.Random(seed)
    rows = []
    for t, kind in enumerate(RANKING_TYPES):
        for a in range(annotators_per_type):
            user = f"annotator_{t * annotators_per_type + a:03d}"
            for _ in range(rankings_per_annotator):
                topic = rng.choice(DOMAINS["bright"] + DOMAINS["dark"])
                texts = _distinct(rng, completions, scale)
                order = plackett_luce_order(rng, [ranking_reward(c, kind, scale) for c in texts])
                rows.append({"prompt": f"{rng.choice(PROMPT_VERBS)} the {topic} :", "completions": texts,
                             "ranking": order, "user_id": user, "group": kind})  # fmt: skip
    rng.shuffle(rows)
    return rows


def _distinct(rng: random.Random, count: int, scale: float) -> list[str]:
    """``count`` completions whose rewards differ under at least one type, pairwise."""
    while True:
        texts = [draw_completion(rng) for _ in range(count)]
        keys = [tuple(ranking_reward(c, kind, scale) for kind in RANKING_TYPES) for c in texts]
        if len(set(keys)) == count:
            return texts


def ranking_oracle(rows: list[dict], scale: float = 1.5) -> dict:
    """The Bayes oracle with the true rewards: each annotator's type posterior from its rankings (uniform prior),
    returned as {"assigned": user -> type}; the ARI of those against ``group`` is the ceiling of any mixture."""
    loglik: dict[str, dict[str, float]] = {}
    for row in rows:
        per_user = loglik.setdefault(row["user_id"], dict.fromkeys(RANKING_TYPES, 0.0))
        for kind in RANKING_TYPES:
            rewards = [ranking_reward(row["completions"][i], kind, scale) for i in row["ranking"]]
            for j in range(len(rewards) - 1):
                top = max(rewards[j:])
                per_user[kind] += rewards[j] - top - math.log(sum(math.exp(r - top) for r in rewards[j:]))
    return {"assigned": {user: max(values, key=values.get) for user, values in loglik.items()}}
