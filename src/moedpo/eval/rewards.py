"""The report's table of rewards (the paper's Table 1): mean ± standard error of each reward function over
completions sampled for held-out prompts, for the reference, a DPO policy, each expert, the mixture and sparse
routing.

Who is served by "the mixture"? In user scope each column's reward belongs to one kind of reader: where the
annotators' type names a reward (the reviews world: ``group`` = ``sentiment`` ...), the column is scored on
prompts asked by annotators of that type, in turn. The **mixture** answers each with an expert drawn from that
annotator's posterior q(z_u); **sparse** routing answers with its top expert. Columns no annotator type names,
and pair-scope runs, draw from the gate's weights for the prompt instead. Every policy samples the same prompt at
the same seed (temperature 1), so a routed answer is the chosen expert's own sample and rows are comparable.
"""

from __future__ import annotations

import math

import torch
from scipy import stats

from moedpo.config import Config, ConfigError
from moedpo.data import reviews
from moedpo.eval.evaluate import user_posteriors
from moedpo.experts.generation import policy, sample_completions
from moedpo.plugins import import_object


def resolve_rewards(config: Config) -> dict:
    """name -> reward(text) -> float: ``report.rewards`` (reviews names or package.module:name), else the reviews
    world's three for ``data.source: reviews``, else none."""
    names = config.report.rewards
    if names is None:
        names = list(reviews.OBJECTIVES) if config.data.source == "reviews" else []
    out = {}
    for name in names:
        if name in reviews.REWARDS:
            out[name] = reviews.REWARDS[name]
        elif ":" in name:
            out[name.rsplit(":", 1)[1]] = import_object(name, "report.rewards")
        else:
            raise ConfigError(
                f"report.rewards: {name!r}: expected one of {list(reviews.REWARDS)} or package.module:name"
            )
    return out


def mean_se(values: list[float]) -> dict:
    """Mean, standard error of the mean (``scipy.stats.sem``: sample standard deviation / sqrt n; 0 for one value)
    and n."""
    n = len(values)
    return {"mean": sum(values) / n, "se": float(stats.sem(values)) if n > 1 else 0.0, "n": n}


def routes(session, prompts: list, columns: list[str], seed: int, posteriors=None) -> dict[str, dict]:
    """column -> {"mixture": expert per prompt (drawn from the routing weights), "sparse": top expert per prompt,
    "how": the routing weights, in words}. Prompts go to a type's training annotators in turn (i mod n).
    ``posteriors``: the training annotators' ``user_posteriors``, when the caller has them already."""
    run, config = session.run, session.config
    user_gate = config.gate.type == "user"
    if posteriors is None and (config.em.scope == "user" or user_gate):
        posteriors = user_posteriors(run, run.data.train)
    generator = torch.Generator().manual_seed(seed)
    by_type: dict[str, list[torch.Tensor]] = {}
    if config.em.scope == "user":
        group = {e["user"]: e["group"] for e in run.data.train}
        for u, weights in zip(posteriors[0].tolist(), posteriors[1]):
            by_type.setdefault(group[u], []).append(weights)
    prior = None
    out = {}
    for column in columns:
        if column in by_type:
            weights = torch.stack([by_type[column][i % len(by_type[column])] for i in range(len(prompts))])
            how = f"posteriors of the {len(by_type[column])} {column} annotators, in turn"
        else:
            if prior is None:  # a user gate with no annotator of this type: its mean weights over annotators
                prior = (
                    posteriors[1].mean(0).expand(len(prompts), -1)
                    if user_gate
                    else torch.stack([session.route(p) for p in prompts])
                )
            weights = prior
            how = "no annotator type of this name: the gate's weights" + (
                " (mean posterior over annotators)" if user_gate else " for the prompt"
            )
        drawn = torch.multinomial(weights.double().clamp_min(0), 1, generator=generator).squeeze(-1)
        out[column] = {"mixture": drawn.tolist(), "sparse": weights.argmax(-1).tolist(), "how": how}
    return out


def reward_table(
    session, rewards: dict, prompts: list, dpo=None, max_new_tokens: int = 48, seed: int = 0, posteriors=None
) -> dict:
    """{"rows": {policy: {reward: mean_se}}, "samples": {policy: first completions}} (see the module docstring)."""
    tok = session.tokenizer
    asked = [session.as_prompt(p) for p in prompts]
    texts: dict[str, list[str]] = {}
    with policy(session.bank, None) as model:
        texts["reference"] = sample_completions(model, tok, asked, max_new_tokens, seed, desc="report: reference")
    if dpo is not None:
        with policy(dpo.bank, 0) as model:
            texts["dpo"] = sample_completions(model, dpo.tokenizer, asked, max_new_tokens, seed, desc="report: dpo")
    num_experts = session.config.experts.num_experts
    for k in range(num_experts):
        with policy(session.bank, k) as model:
            texts[f"expert_{k}"] = sample_completions(
                model, tok, asked, max_new_tokens, seed, desc=f"report: expert {k}"
            )
    scores = {name: {r: [fn(t) for t in ts] for r, fn in rewards.items()} for name, ts in texts.items()}
    routing = routes(session, prompts, list(rewards), seed, posteriors)
    for how in ("mixture", "sparse"):
        scores[how] = {r: [scores[f"expert_{k}"][r][i] for i, k in enumerate(routing[r][how])] for r in rewards}
    order = ["reference", "dpo", "mixture", "sparse"] + [f"expert_{k}" for k in range(num_experts)]
    rows = {n: {r: mean_se(v) for r, v in scores[n].items()} for n in order if n in scores}
    return {
        "rows": rows,
        "routing": {r: route["how"] for r, route in routing.items()},
        "samples": {n: ts[:3] for n, ts in texts.items()},
        "num_prompts": len(prompts),
    }


def checks(table: dict) -> dict:
    """The acceptance checks of the multi-objective experiment, where they apply: rewards on which the mixture
    beats DPO by more than 2 standard errors (of the difference), and each reward's best expert."""
    rows = table["rows"]
    out = {"best_expert": {}}
    experts = [n for n in rows if n.startswith("expert_")]
    out["best_by_2se"] = {}
    for r in rows["reference"]:
        ranked = sorted(experts, key=lambda n: -rows[n][r]["mean"])
        out["best_expert"][r] = ranked[0]
        if len(ranked) > 1:
            a, b = rows[ranked[0]][r], rows[ranked[1]][r]
            out["best_by_2se"][r] = a["mean"] - b["mean"] > 2 * math.hypot(a["se"], b["se"])
    if "dpo" in rows:
        out["mixture_beats_dpo"] = [
            r
            for r in rows["reference"]
            if rows["mixture"][r]["mean"] - rows["dpo"][r]["mean"]
            > 2 * math.hypot(rows["mixture"][r]["se"], rows["dpo"][r]["se"])
        ]
    out["experts_best_on_different_rewards"] = len(set(out["best_expert"].values())) == len(out["best_expert"])
    return out
