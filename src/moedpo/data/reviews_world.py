"""``data.source: reviews``: the paper's multi-objective experiment on the reviews world (:mod:`.reviews`).

The data side of the experiment; the stage that samples from a reference policy is
:mod:`moedpo.reference.reviews`, which hands the samples here:

1. **Reference.** The reference learns from :func:`pretraining_rows`, unlabelled reviews (``data.pretrain_reviews``),
   when it is built from nothing (``model.name_or_path: scratch``).
2. **Annotation.** For each pair, two completions are sampled from the reference for a fresh prompt
   (:func:`annotation_prompts`), and an annotator of hidden type t (one of ``data.objectives``) labels them by its
   reward with Bradley–Terry noise, P(a > b) = sigmoid(6 (r_t(a) - r_t(b))) (:func:`label_samples`). Empty or
   identical samples are skipped. ``data.annotators_per_type`` annotators per type label
   ``data.pairs_per_annotator`` pairs each.
3. The rows (``prompt``, ``chosen``, ``rejected``, ``user_id``, ``group`` = the type) go through the same
   validation and tokenization as a user's file.
"""

from __future__ import annotations

import random

from moedpo.config import Config, ConfigError
from moedpo.data import reviews
from moedpo.data.worlds import Annotator, label_pairs

SCALE = 6.0  # Bradley–Terry sharpness of the annotators
HELD_OUT_SEED = 1_000_003  # the report's prompts come from their own stream, never from the annotated ones


def objectives(config: Config) -> list[str]:
    """The annotator types, ``data.objectives`` (checked) or the reviews world's three."""
    chosen = config.data.objectives
    if chosen is None:
        return list(reviews.OBJECTIVES)
    if not chosen or any(o not in reviews.OBJECTIVES for o in chosen):
        raise ConfigError(f"data.objectives={chosen!r}: expected a list of {reviews.OBJECTIVES}")
    return list(chosen)


def pretraining_rows(config: Config) -> list[dict]:
    """Unlabelled reviews for the scratch reference, as rows (prompt, chosen = a review; rejected is unused)."""
    rng = random.Random(config.train.seed)
    return [
        {"prompt": reviews.make_prompt(rng), "chosen": reviews.make_review(rng), "rejected": reviews.make_review(rng)}
        for _ in range(config.data.pretrain_reviews)
    ]


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(HELD_OUT_SEED + seed)
    return [reviews.make_prompt(rng) for _ in range(n)]


def num_pairs(config: Config) -> int:
    d = config.data
    return len(objectives(config)) * d.annotators_per_type * d.pairs_per_annotator


def annotation_prompts(config: Config) -> tuple[random.Random, list[str]]:
    """The labelling stream (seeded by ``train.seed``) and the prompts it drew first, one per pair."""
    rng = random.Random(config.train.seed)
    return rng, [reviews.make_prompt(rng) for _ in range(num_pairs(config))]


def usable(first: str, second: str) -> bool:
    """Whether two samples can be compared: both say something, and not the same thing."""
    return bool(first.strip()) and bool(second.strip()) and first != second


def label_samples(config: Config, rng: random.Random, prompts: list[str], first: list[str], second: list[str]):
    """Rows labelled by the hidden critics from two samples per prompt (pairs in order: type, critic, pair)."""
    d, types = config.data, objectives(config)
    pairs = iter(zip(prompts, first, second))

    def draw_pair(_rng, _objective):
        prompt, a, b = next(pairs)
        return (prompt, a, b) if usable(a, b) else None

    annotators = [
        Annotator(f"critic_{t * d.annotators_per_type + a:03d}", objective, objective)
        for t, objective in enumerate(types)
        for a in range(d.annotators_per_type)
    ]
    return label_pairs(annotators, d.pairs_per_annotator, draw_pair, reviews.reward, rng, SCALE)
