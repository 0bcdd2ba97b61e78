"""The data start (moedpo.inference.start): contrasts, the whitened clustering and the E-step prior it gives."""

import math
import random

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from moedpo.inference.start import CONFIDENCE, Start, data_start, token_contrasts


def test_token_contrasts_count_chosen_minus_rejected_over_the_tokens_that_differ():
    examples = [
        {"chosen_ids": [5, 5, 7], "rejected_ids": [7, 9]},  # 5: +2, 9: -1, 7: 0 (equal)
        {"chosen_ids": [9], "rejected_ids": [5]},  # 9: +1, 5: -1
    ]
    x = token_contrasts(examples)
    # tokens by how often they differ (5: twice, 9: twice; ties by id), 7 never differs and is left out
    assert x.tolist() == [[2.0, -1.0], [-1.0, 1.0]]


def planted(types: int, annotators: int, pairs: int, seed: int, noise_tokens: int = 200) -> list[dict]:
    """Type t likes token t (Bradley–Terry on its count), and every completion also carries common noise tokens:
    a few pairs per annotator, unequal counts, a real share of labels against the type."""
    rng = random.Random(seed)
    examples = []
    for u in range(types * annotators):
        t = u % types
        for _ in range(rng.randint(pairs // 2, pairs)):
            a = [rng.randrange(types) for _ in range(3)] + [types + rng.randrange(noise_tokens) for _ in range(8)]
            b = [rng.randrange(types) for _ in range(3)] + [types + rng.randrange(noise_tokens) for _ in range(8)]
            margin = 1.5 * (a.count(t) - b.count(t))
            chosen, rejected = (a, b) if rng.random() < 1 / (1 + math.exp(-margin)) else (b, a)
            examples.append({"chosen_ids": chosen, "rejected_ids": rejected, "user": u, "group": t,
                             "index": len(examples)})  # fmt: skip
    return examples


def oracle(examples: list[dict], types: int) -> dict[int, int]:
    """Each annotator's most likely type under the true rewards (the Bayes oracle)."""
    loglik: dict[int, list[float]] = {}
    for e in examples:
        row = loglik.setdefault(e["user"], [0.0] * types)
        for t in range(types):
            margin = 1.5 * (e["chosen_ids"].count(t) - e["rejected_ids"].count(t))
            row[t] -= math.log1p(math.exp(-margin))
    return {u: max(range(types), key=row.__getitem__) for u, row in loglik.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_data_start_clusters_planted_annotators_as_the_oracle_does(seed):
    examples = planted(types=3, annotators=12, pairs=30, seed=seed)  # 15-30 pairs each
    start = data_start(examples, 3, by_user=True, steps=10, seed=seed)
    truth = {e["user"]: e["group"] for e in examples}
    users = sorted(truth)
    best = oracle(examples, 3)
    assert adjusted_rand_score([truth[u] for u in users], [best[u] for u in users]) >= 0.95
    assert adjusted_rand_score([truth[u] for u in users], [start.clusters[("user", u)] for u in users]) >= 0.9


def test_the_prior_leans_on_the_cluster_and_fades_linearly():
    start = Start({("user", 4): 1, ("user", 7): 0}, num_experts=3, steps=4)
    like = torch.zeros(3, 3)
    prior = start.log_prior([("user", 7), ("user", 4), ("user", 99)], 1, like)  # weight 1 - 1/4
    rest = (1 - CONFIDENCE) / 2
    expected = 0.75 * torch.tensor([[CONFIDENCE, rest, rest], [rest, CONFIDENCE, rest], [1 / 3] * 3]).log()
    torch.testing.assert_close(prior, expected)
    assert start.log_prior([("user", 7)], 4, like) is None  # spent: the E-step is the plain posterior
    assert start.log_prior(None, 0, like) is None  # units without ids: no prior
