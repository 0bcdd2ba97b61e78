"""The users world: many annotators of four hidden types, and new annotators with only a few labelled pairs.

The paper's multi-user experiment at laptop scale, on the built-in vocabulary (so the built-in tokenizer and
tiny Llama serve it). The bright and dark word sets are split in halves, four word groups; each type likes one
group and dislikes another, so types 0/1 conflict, types 2/3 conflict, and 0 and 2 are unrelated:

    type 0: + bright[:4] - dark[:4]     type 1: + dark[:4] - bright[:4]
    type 2: + bright[4:] - dark[4:]     type 3: + dark[4:] - bright[4:]

An annotator of type t labels a pair by Bradley–Terry on r_t(y) = scale * (#liked - #disliked). Training
annotators label ``pairs_per_user`` pairs each (some held out by the run's split); *new* annotators, never seen
in training, each have ``new_pairs`` labelled pairs to personalise from and ``test_pairs`` more to test on.
Each annotator has ``user_features``: a noisy code of its type (for user gates that generalise to new users).
"""

from __future__ import annotations

import random

from moedpo.data.builtin import A_WORDS, B_WORDS, DOMAINS, NEUTRAL, PROMPT_VERBS
from moedpo.data.worlds import Annotator, distinct_pair, label_pairs

GROUPS = (A_WORDS[:4], A_WORDS[4:], B_WORDS[:4], B_WORDS[4:])
LIKES = {0: (0, 2), 1: (2, 0), 2: (1, 3), 3: (3, 1)}  # type -> (liked group, disliked group)
TYPE_NAMES = ("bright-a", "dark-a", "bright-b", "dark-b")


def true_reward(completion: str, kind: int | str, scale: float = 1.5) -> float:
    """The planted reward of a completion for an annotator of type ``kind`` (index or name)."""
    t = TYPE_NAMES.index(kind) if isinstance(kind, str) else kind
    liked, disliked = (set(GROUPS[g]) for g in LIKES[t])
    words = completion.split()
    return scale * (sum(w in liked for w in words) - sum(w in disliked for w in words))


def _completion(rng: random.Random, length: int = 6) -> str:
    counts = [rng.randint(0, 2) for _ in GROUPS]
    words = [w for group, n in zip(GROUPS, counts) for w in rng.sample(group, n)]
    words += [rng.choice(NEUTRAL) for _ in range(max(0, length - len(words)))]
    rng.shuffle(words)
    return " " + " ".join(words)


def _features(rng: random.Random, t: int, noise: float) -> list[float]:
    return [(1.0 if j == t else 0.0) + rng.gauss(0, noise) for j in range(len(TYPE_NAMES))]


def _draw_pair(rng: random.Random, t: int, scale: float) -> tuple[str, str, str]:
    prompt = f"{rng.choice(PROMPT_VERBS)} the {rng.choice(DOMAINS['bright'] + DOMAINS['dark'])} :"
    return (prompt, *distinct_pair(rng, t, _completion, lambda text, kind: true_reward(text, kind, scale)))


def _annotator_rows(rng: random.Random, user: str, t: int, n: int, noise: float, scale: float) -> list[dict]:
    """One annotator's ``n`` labelled rows (its user_features drawn first)."""
    annotator = Annotator(user, t, TYPE_NAMES[t], _features(rng, t, noise))
    reward = lambda text, kind: true_reward(text, kind, scale)  # noqa: E731
    return label_pairs([annotator], n, lambda r, kind: _draw_pair(r, kind, scale), reward, rng)


def make_users_world(
    users_per_type: int = 10,
    pairs_per_user: int = 40,
    new_users_per_type: int = 5,
    new_pairs: int = 16,
    test_pairs: int = 16,
    scale: float = 1.5,
    feature_noise: float = 0.3,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """{"train": rows of the training annotators, "new": {user: (personalisation rows, test rows)} as lists}."""
    rng = random.Random(seed)
    train, new = [], {}
    for t in range(len(TYPE_NAMES)):
        for a in range(users_per_type):
            user = f"user_{t * users_per_type + a:03d}"
            train += _annotator_rows(rng, user, t, pairs_per_user, feature_noise, scale)
        for a in range(new_users_per_type):
            user = f"new_{t * new_users_per_type + a:03d}"
            rows = _annotator_rows(rng, user, t, new_pairs + test_pairs, feature_noise, scale)
            new[user] = (rows[:new_pairs], rows[new_pairs:])
    rng.shuffle(train)
    return {"train": train, "new": new}
