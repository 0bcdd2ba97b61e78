"""The multi-user report: win rates judged by each user's true reward, the user map, and new users from k pairs.

Used by ``examples/users_world.py`` on the users world (:mod:`moedpo.data.users_world`); the functions take
finished run directories (:class:`~moedpo.session.RunSession`) and rows with a known true reward.

- :func:`win_rates`: for each annotator, completions sampled (fixed seed) from its routed expert, from a
  single DPO policy and from the reference, scored by the annotator's own true reward; win = 1, tie = 1/2, with a
  95% Wilson interval over the comparisons.
- :func:`user_map`: each annotator's mean reward difference beta * h_k (chosen minus rejected) under every
  learned expert, a K-vector per user, projected to 2-D by PCA.
- :func:`new_user_accuracy`: held-out accuracy of new annotators personalised from k of their pairs, by the
  exact posterior, the amortized guide and the gate's prior alone.
"""

from __future__ import annotations

import math

import torch
from scipy import stats

from moedpo.eval.evaluate import bank_margins, predictive_log_prob
from moedpo.experts.generation import policy, sample_completions
from moedpo.personalize import posteriors_from_examples, tokenize_for_run


def interval(scores: list[float]) -> dict:
    """Win rate of per-comparison scores (1 win, 1/2 tie, 0 loss) with its 95% Wilson score interval (which stays
    honest at 0 or 1, where the normal interval collapses to a point). Ties make the count fractional, which
    ``scipy.stats.binomtest(...).proportion_ci(method="wilson")`` does not take; for whole counts the two agree."""
    n, z = len(scores), float(stats.norm.ppf(0.975))
    rate = sum(scores) / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": rate, "low": centre - half, "high": centre + half, "n": n}


def sample(session, prompt: str, expert: int | None, seed: int, max_new_tokens: int = 8) -> str:
    """One completion sampled at temperature 1 (``expert`` None: the reference, adapters off)."""
    with policy(session.bank, expert) as model:
        return sample_completions(model, session.tokenizer, [session.as_prompt(prompt)], max_new_tokens, seed)[0]


def win_rates(mixture, single, users: dict[str, tuple], reward, prompts_per_user: int = 8, seed: int = 0) -> dict:
    """``users``: annotator -> (type, prompts); ``reward(completion, type)``. Returns the mixture's win rates over
    the single policy and over the reference, each with its interval, and the mean rewards."""
    scores = {"dpo": [], "reference": []}
    rewards = {"mixture": [], "dpo": [], "reference": []}
    for u, (user, (kind, prompts)) in enumerate(users.items()):
        for j, prompt in enumerate(prompts[:prompts_per_user]):
            expert = int(mixture.route(prompt, user).argmax())
            s = seed + 1000 * u + j
            ours = reward(sample(mixture, prompt, expert, s), kind)
            theirs = {
                "dpo": reward(sample(single, prompt, 0, s), kind),
                "reference": reward(sample(mixture, prompt, None, s), kind),
            }
            rewards["mixture"].append(ours)
            for name, value in theirs.items():
                rewards[name].append(value)
                scores[name].append(1.0 if ours > value else 0.5 if ours == value else 0.0)
    out = {f"win_rate_vs_{name}": interval(values) for name, values in scores.items()}
    out["mean_reward"] = {name: sum(v) / len(v) for name, v in rewards.items()}
    return out


@torch.no_grad()
def user_map(session) -> dict:
    """Each training annotator's mean beta * h_k over its pairs, (U, K), its 2-D PCA projection and group."""
    train = session.run.data.train
    fit = bank_margins(session.bank, train, session.tokenizer.pad_token_id)
    users = torch.tensor([e["user"] for e in train])
    ids = torch.unique(users)
    beta = session.config.em.beta
    vectors = torch.stack([beta * fit["h"][users == u].mean(0) for u in ids])  # (U, K)
    centred = vectors - vectors.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    points = centred @ v[: min(2, v.shape[0])].T
    group = {e["user"]: e["group"] for e in train}
    return {"users": ids.tolist(), "vectors": vectors, "points": points, "groups": [group[int(u)] for u in ids]}


@torch.no_grad()
def new_user_accuracy(session, new_users: dict[str, tuple[list, list]], ks=(1, 2, 4, 8, 16)) -> dict:
    """Held-out accuracy of new annotators from their first k pairs: {"exact"|"amortized"|"prior": {k: acc}}."""
    beta, smoothing = session.config.em.beta, session.config.em.label_smoothing
    correct: dict[str, dict[int, list[float]]] = {m: {k: [] for k in ks} for m in ("exact", "amortized", "prior")}
    for user, (fit_rows, test_rows) in new_users.items():
        fit_examples = tokenize_for_run(session, fit_rows, "<users world>")  # probes: never cached
        test_examples = tokenize_for_run(session, test_rows, "<users world>")
        h = bank_margins(session.bank, test_examples, session.tokenizer.pad_token_id)["h"].double()  # (N, K)
        for k in ks:
            result = posteriors_from_examples(session, fit_examples[:k], user)
            for method in correct:
                q = getattr(result, method)
                if q is None:
                    continue
                log_prob = predictive_log_prob(h, torch.tensor(q, dtype=h.dtype).expand_as(h), beta, smoothing)
                correct[method][k] += (log_prob > -math.log(2)).double().tolist()
    return {m: {k: sum(v) / len(v) for k, v in by_k.items() if v} for m, by_k in correct.items()}
