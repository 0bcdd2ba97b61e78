"""The reviews world: short procedurally generated movie reviews and three reward functions.

Natural-language text for the paper's multi-objective experiment (IMDb, GPT-2, three rewards) at laptop scale.
A review is a few sentences from a small grammar: an opinion on an aspect of the film ("the soundtrack was
superb."), with sentiment words, content nouns and, at random, an injected grammar error (subject-verb
disagreement, a doubled word, an article before a bare adjective, a missing full stop).

Rewards of a completion, each roughly in [-1, 1] or [0, 1]:

- :func:`sentiment` — VADER's compound polarity (the lexicon ships with ``vaderSentiment``, no download);
- :func:`informativeness` — distinct content aspects mentioned (the plot, the cast ...), over 4, less a penalty
  for evaluative words (an informative review describes; it pulls against sentiment);
- :func:`grammar` — share of sentences with none of the error patterns (and ending in a full stop).

Annotators of hidden types each prefer by one objective, with Bradley–Terry noise: P(a > b) =
sigmoid(scale * (r_t(a) - r_t(b))). :func:`make_review_rows` labels pairs of random reviews (no model needed);
the full experiment labels pairs sampled from a reference policy instead.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from moedpo.data.worlds import Annotator, distinct_pair, label_pairs

OBJECTIVES = ("sentiment", "informativeness", "grammar")
ASPECTS = [
    "plot", "acting", "soundtrack", "cinematography", "dialogue", "pacing", "ending", "cast", "script", "editing",
    "lighting", "costumes",
]  # fmt: skip
POSITIVE = ["wonderful", "brilliant", "lovely", "delightful", "superb", "beautiful", "great", "charming"]
NEGATIVE = ["dull", "awful", "horrible", "stupid", "boring", "weak", "terrible", "bad"]
NEUTRAL = ["long", "quiet", "unusual", "familiar", "simple", "slow"]
OPENERS = ["I watched this film last week.", "We saw it at the cinema.", "This one came out last year.", "I rented it."]
GENRES = ["drama", "comedy", "thriller", "western", "musical", "documentary", "romance", "mystery"]
PROMPTS = ["Write a review of {t}, a {g}.", "Review {t} (a {g}):", "What did you think of {t}?", "Your take on {t}:"]
TITLE_WORDS = (
    ["Silent", "Last", "Broken", "Golden", "Hidden", "Crimson", "Long", "Quiet", "Lost", "Northern", "Paper", "Iron"],
    [
        "Harbor",
        "Summer",
        "Road",
        "Letter",
        "Garden",
        "River",
        "Promise",
        "Train",
        "Winter",
        "Mirror",
        "Island",
        "Crown",
    ],
)  # 144 titles x 8 genres x 4 templates: thousands of distinct prompts
ERRORS = ("agreement", "doubled", "article", "stop")


def _sentence(rng: random.Random, aspect: str | None, error: str | None, warmth: float = 0.5) -> str:
    """One sentence: on ``aspect`` (None: on the film as a whole), positive with probability ``warmth``."""
    mood = rng.choices([POSITIVE, NEGATIVE, NEUTRAL], weights=[warmth, 0.3, 1 - warmth])[0]
    word = rng.choice(mood)
    if aspect is None:
        text = rng.choice([f"It was {word}.", f"Overall it felt {word}.", f"The film is {word}."])
    else:
        verb = "were" if error == "agreement" else "was"
        text = rng.choice([f"The {aspect} {verb} {word}.", f"I thought the {aspect} {verb} {word}."])
    if error == "agreement" and aspect is None:
        text = text.replace("It was", "It were").replace("The film is", "The film are").replace("felt", "feel")
    if error == "doubled":
        words = text.split()
        i = rng.randrange(len(words) - 1)
        text = " ".join(words[: i + 1] + [words[i]] + words[i + 1 :])
    if error == "article":  # an article before a bare adjective: "the plot was a dull."
        text = re.sub(r"\b(was|were|is|are|felt|feel) ", r"\1 a ", text, count=1)
    if error == "stop":
        text = text.rstrip(".")
    return text


def make_review(rng: random.Random, error_rate: float = 0.3) -> str:
    """One review of 2-4 sentences (a completion, with a leading space as TRL's implicit style expects).

    Each review has a hidden enthusiasm e ~ U(0, 1), as real ones do: a fan gushes about the film as a whole
    (mostly positive words, few aspects), a reporter goes through the aspects in plain words. The injected
    grammar errors are independent of e.
    """
    e = rng.random()
    sentences = [rng.choice(OPENERS)] if rng.random() < 0.3 else []
    for _ in range(rng.randint(2, 4)):
        aspect = rng.choice(ASPECTS) if rng.random() < 0.9 - 0.8 * e else None
        error = rng.choice(ERRORS) if rng.random() < error_rate else None
        sentences.append(_sentence(rng, aspect, error, warmth=0.1 + 0.8 * e))
    return " " + " ".join(sentences)


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError(
            "the reviews world's sentiment reward needs vaderSentiment (pip install vaderSentiment)"
        ) from None
    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound polarity in [-1, 1]."""
    return float(_vader().polarity_scores(text)["compound"])


def informativeness(text: str) -> float:
    """Distinct content aspects named (over 4, capped at 1), less 1/2 per evaluative word per sentence.

    An informative review describes rather than gushes: "The pacing was slow. The cast was familiar." scores 0.5;
    "The pacing was wonderful." 0.25 - 0.5. So informativeness and sentiment pull against each other on word
    choice, and one policy for both kinds of reader pleases neither.
    """
    words = re.findall(r"[a-z]+", text.lower())
    sentences = max(1, len([s for s in re.split(r"[.!?]+", text) if s.strip()]))
    evaluative = sum(w in _EVALUATIVE for w in words)
    return min(1.0, len(set(words) & set(ASPECTS)) / 4) - 0.5 * evaluative / sentences


_EVALUATIVE = frozenset(POSITIVE + NEGATIVE)
_BAD = [
    re.compile(r"\b(\w+) \1\b", re.IGNORECASE),  # a doubled word
    re.compile(r"\b(was|were|is|are|felt|feel) a\b|\bit were\b|\bfilm are\b|\bfeel\b", re.IGNORECASE),
    re.compile(r"\bThe (\w+) were\b|\bthe (\w+) were\b"),  # singular aspect with a plural verb
]


def grammar(text: str) -> float:
    """Share of sentences free of the error patterns; a text not ending in a full stop loses one sentence."""
    sentences = [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]
    if not sentences:
        return 0.0
    good = 0
    for s in sentences:
        ends = s.endswith(".") and s.count(".") == 1
        good += int(ends and not any(p.search(s) for p in _BAD))
    return good / len(sentences)


REWARDS = {"sentiment": sentiment, "informativeness": informativeness, "grammar": grammar}


def reward(text: str, objective: str) -> float:
    return REWARDS[objective](text)


def make_prompt(rng: random.Random) -> str:
    title = f"The {rng.choice(TITLE_WORDS[0])} {rng.choice(TITLE_WORDS[1])}"
    return rng.choice(PROMPTS).format(t=title, g=rng.choice(GENRES))


def make_review_rows(
    objectives: tuple[str, ...] = ("sentiment", "informativeness"),
    annotators_per_type: int = 10,
    pairs_per_annotator: int = 12,
    scale: float = 6.0,
    seed: int = 0,
) -> list[dict]:
    """Rows (explicit prompt, user_id, group = the annotator's objective) labelling pairs of random reviews."""

    def draw_pair(rng, objective):
        return (make_prompt(rng), *distinct_pair(rng, objective, make_review, reward))

    annotators = [
        Annotator(f"critic_{t * annotators_per_type + a:03d}", objective, objective)
        for t, objective in enumerate(objectives)
        for a in range(annotators_per_type)
    ]
    rng = random.Random(seed)
    rows = label_pairs(annotators, pairs_per_annotator, draw_pair, reward, rng, scale)
    rng.shuffle(rows)
    return rows
