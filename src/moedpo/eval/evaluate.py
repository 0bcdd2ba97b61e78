"""Held-out evaluation of a mixture of LLM experts: mixture and per-expert accuracy, responsibilities, ARI.

User scope: each annotator's posterior over the gate's latent comes from their *training* pairs (the same
E-step as training, :func:`moedpo.inference.e_step`), and predicts their held-out pairs as
sum_k q_uk sigmoid(beta h_k) (exact for the built-in models; for a user's own model, q is the posterior of the
latent whose prior is the gate). Pair scope: the gate's prior w(x, u) predicts (the label is what is predicted).
ARI compares the inferred type (user posterior or pair posterior argmax) of the held-out data's own annotators with
its ``group`` column (no group, no ARI), beside ``eval/posterior_confidence``, the mean largest posterior.

Rankings (a Plackett–Luce model): the same posteriors predict each held-out ranking, P = sum_k q_k P(ranking | k);
``eval/mixture_nll`` is its mean negative log, ``eval/rewards/accuracies`` the share of the pairs the rankings
imply that the mixture orders right, ``eval/rankings/top1`` and ``eval/rankings/kendall_tau`` the observed best and
order against the mixture reward log sum_k q_k exp(beta h_k).
"""

from __future__ import annotations

import torch

from moedpo.data.tokenize import collate_examples
from moedpo.eval.metrics import adjusted_rand_index, ranking_agreement
from moedpo.inference import e_step
from moedpo.inference.margins import completion_log_ratios, log_ratios, observations
from moedpo.losses import mixture_nll, pairwise_margins, ranking_log_likelihood

RANKING_KEYS = ("ranking", "ranking_mask", "ranked")  # what a ranking batch's latent model observes


@torch.no_grad()
def bank_margins(bank, examples: list[dict], pad_token_id: int, batch_size: int = 64) -> dict:
    """Margins and log-probs of every example, batched: {"h": (N, K), "chosen_logps": (N, K), ...} on CPU; for
    rankings {"h": (N, M, K), "completion_logps", "ranking", "ranking_mask", "ranked", ...}, M the most
    completions of any example."""
    parts = []
    for start in range(0, len(examples), batch_size):
        out = bank.margins(collate_examples(examples[start : start + batch_size], pad_token_id))
        if "completion_logps" in out:
            h = completion_log_ratios(out)
        else:
            chosen, rejected = log_ratios(out)
            h = chosen - rejected
        parts.append({"h": h.cpu(), **{k: v.cpu() for k, v in out.items() if isinstance(v, torch.Tensor)}})
    width = max(p["h"].shape[1] for p in parts) if parts[0]["h"].dim() == 3 else None
    return {k: torch.cat([_widened(p[k], k, width) for p in parts]) for k in parts[0]}


def _widened(value: torch.Tensor, key: str, width: int | None) -> torch.Tensor:
    """A ranking batch's (B, M, ...) field padded to ``width`` completions (rankings: the next indices, masks:
    False, values: 0), so batches of different widths concatenate."""
    if width is None or value.dim() < 2 or key in ("features", "guide_features") or value.shape[1] == width:
        return value
    if key == "ranking":
        extra = torch.arange(value.shape[1], width).expand(value.shape[0], -1)
        return torch.cat([value, extra], 1)
    return torch.cat([value, value.new_zeros(value.shape[0], width - value.shape[1], *value.shape[2:])], 1)


def observed(fit: dict) -> dict:
    """The fields of ``fit`` (:func:`bank_margins`) a ranking model observes; empty for pairs."""
    return {k: fit[k] for k in RANKING_KEYS if k in fit}


def gate_batch(examples: list[dict]) -> dict:
    """Only the fields a gate reads, for many examples (no padded token batch)."""
    batch = {"user": torch.tensor([e["user"] for e in examples], dtype=torch.long)}
    if all(e["user_features"] is not None for e in examples):
        batch["user_features"] = torch.tensor([e["user_features"] for e in examples], dtype=torch.float32)
    if all("prompt_features" in e for e in examples):
        batch["prompt_features"] = torch.stack([e["prompt_features"] for e in examples])
    return batch


@torch.no_grad()
def latent_posterior(
    run, h: torch.Tensor, gate_logits: torch.Tensor, extra: dict, ranked: dict | None = None
) -> torch.Tensor:
    """The exact posterior of the latent whose prior is the gate, under the run's own latent model (``em.model``):
    (U, K) per annotator in user scope, (B, K) per pair in pair scope. The one route for posteriors after training
    (evaluation, routing, ``personalize``, the report): the E-step of training, :func:`moedpo.inference.e_step`.

    ``h`` (B, K) margins; ``gate_logits`` and ``extra`` as the gate gives them (``extra``: e.g. ``user_index``);
    rankings: ``h`` (B, M, K) and ``ranked`` the :func:`observed` fields."""
    q = _exact_e_step(run, h, gate_logits, extra, ranked or {}).gate_q
    return q.reshape(-1, q.shape[-1])  # float64


def _exact_e_step(run, h: torch.Tensor, gate_logits: torch.Tensor, extra: dict, ranked: dict):
    beta, smoothing = run.config.em.beta, run.config.em.label_smoothing
    h = h.double()
    obs, kwargs = observations(ranked, h)
    kwargs = {"label_smoothing": smoothing, **kwargs, **{k: v.cpu() for k, v in extra.items()}}
    return e_step(
        run.model, (h, gate_logits.cpu().double(), beta, obs), kwargs, beta, smoothing, run.model.max_plate_nesting
    )


@torch.no_grad()
def user_posteriors(run, examples: list[dict], fit: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(user ids (U,), posterior over the gate's latent (U, K)) of the annotators of ``examples``."""
    fit = fit if fit is not None else bank_margins(run.bank, examples, run.tokenizer.pad_token_id)
    batch = gate_batch(examples)
    logits, extra = run.gate.logits(batch, fit["features"].to(run.bank.device))
    return torch.unique(batch["user"]), latent_posterior(run, fit["h"], logits, extra, observed(fit)).float()


@torch.no_grad()
def log_evidence(run, examples: list[dict]) -> tuple[float, torch.Tensor]:
    """(log p(pairs) per pair under the run's model, gate and experts; the latent's posterior (units, K)) of
    ``examples``, all in one exact E-step (``em.restarts`` ranks its starts by it without held-out pairs)."""
    fit = bank_margins(run.bank, examples, run.tokenizer.pad_token_id)
    logits, extra = run.gate.logits(gate_batch(examples), fit["features"].to(run.bank.device))
    e = _exact_e_step(run, fit["h"], logits, extra, observed(fit))
    return float(e.post.log_evidence) / len(examples), e.gate_q.reshape(-1, e.gate_q.shape[-1]).float()


def predictive_log_prob(h: torch.Tensor, weights: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """log sum_k w_k P(y+ > y- | expert k) of each pair, (N, K) margins and weights -> (N,)."""
    return -mixture_nll(h, weights.clamp_min(1e-30).log(), beta, label_smoothing)


@torch.no_grad()
def evaluate(run, train: list[dict], held_out: list[dict]) -> tuple[dict, dict]:
    """Returns (metrics with ``eval/`` keys, details with per-example responsibilities and log-probs)."""
    config, pad = run.config, run.tokenizer.pad_token_id
    test = bank_margins(run.bank, held_out, pad)
    logits, extra = run.gate.logits(gate_batch(held_out), test["features"].to(run.bank.device))
    weights, groups, posteriors, details = _predicting_weights(run, train, held_out, test, logits, extra)
    if "ranking" in test:
        metrics, correct, log_prob, right = _ranking_metrics(test, weights, config.em.beta)
        details["expert_completion_logps"] = test["completion_logps"]
    else:
        metrics, correct, log_prob, right = _pair_metrics(test, weights, config.em.beta, config.em.label_smoothing)
        details["expert_chosen_logps"], details["expert_rejected_logps"] = test["chosen_logps"], test["rejected_logps"]
    kinds = [e["group"] for e in held_out]
    for j in range(config.experts.num_experts):
        metrics[f"eval/expert_{j}/rewards/accuracies"] = float(correct[:, j].mean())
        for kind in sorted({g for g in kinds if g is not None}):  # per annotator type: each expert's own type
            rows = torch.tensor([g == kind for g in kinds])
            metrics[f"eval/expert_{j}/{kind}/rewards/accuracies"] = float(correct[rows, j].mean())
    routed = correct[torch.arange(correct.shape[0]), weights.argmax(-1)]  # sparse: the top expert's own prediction
    metrics["eval/top1/rewards/accuracies"] = float(routed.mean())
    metrics.update(per_type_accuracy(kinds, right, routed))
    if groups and all(g is not None for g in groups):  # only where the data says who is of which type
        metrics["eval/ari"] = adjusted_rand_index(_codes(groups), posteriors.argmax(-1))
        # the hard ARI reads 1.0 even for near-uniform posteriors: report how sure they are beside it
        metrics["eval/posterior_confidence"] = float(posteriors.max(-1).values.mean())
    details.update(h=test["h"], correct=correct, weights=weights, log_prob=log_prob)  # log p of each example
    return metrics, details


def _predicting_weights(run, train, held_out, test, logits, extra):
    """(weights (N, K) that predict each held-out example, the true groups and posteriors (units, K) the ARI
    compares, details): user scope, each annotator's posterior from its training examples (the gate's prior for an
    annotator it never saw); pair scope, the gate's prior w(x, u)."""
    prior = torch.softmax(logits, -1).cpu()
    prior = prior[extra["user_index"].cpu()] if "user_index" in extra else prior  # (N, K): w(x, u) per pair
    details = {"prior": prior}  # the gate's own weights: what serves a prompt whose annotator is unknown
    if run.config.em.scope == "user":
        ids, q_users = user_posteriors(run, train)
        position = {int(u): i for i, u in enumerate(ids)}
        rows = torch.tensor([position.get(e["user"], -1) for e in held_out])
        weights = torch.where((rows >= 0).unsqueeze(-1), q_users[rows.clamp_min(0)], prior)  # unseen users: prior
        seen = sorted({e["user"] for e in held_out if e["user"] in position})  # the held-out data's annotators
        group_of = {e["user"]: e["group"] for e in held_out}
        groups, posteriors = [group_of[u] for u in seen], q_users[[position[u] for u in seen]]
        details["user_responsibilities"], details["user_ids"] = q_users, ids
    else:
        weights, groups = prior, [e["group"] for e in held_out]
        posteriors = latent_posterior(run, test["h"], logits, extra, observed(test)).float()
    return weights, groups, posteriors, details


def per_type_accuracy(kinds: list, mixture: torch.Tensor, routed: torch.Tensor) -> dict:
    """Per annotator type (the ``group`` column) the mixture's and sparse routing's held-out accuracy, and the
    worst type's: a policy that serves the majority and fails a minority reads well on average only."""
    out = {}
    for kind in sorted({g for g in kinds if g is not None}):
        rows = torch.tensor([g == kind for g in kinds])
        out[f"eval/{kind}/rewards/accuracies"] = float(mixture[rows].mean())
        out[f"eval/top1/{kind}/rewards/accuracies"] = float(routed[rows].mean())
    if out:
        out["eval/worst_type/rewards/accuracies"] = min(v for k, v in out.items() if not k.startswith("eval/top1/"))
        out["eval/top1/worst_type/rewards/accuracies"] = min(v for k, v in out.items() if k.startswith("eval/top1/"))
    return out


def _pair_metrics(test: dict, weights: torch.Tensor, beta: float, smoothing: float) -> tuple:
    """Held-out pairs: the mixture's accuracy and NLL, TRL's logps, each expert's margin; (metrics, whether each
    expert orders each pair right (N, K), log p(y+ > y-) of each pair (N,), whether the mixture does (N,))."""
    h = test["h"]
    log_prob = predictive_log_prob(h, weights, beta, smoothing)
    right = (log_prob > -torch.log(torch.tensor(2.0))).float()  # the mixture's prediction is the chosen one
    metrics = {
        "eval/rewards/accuracies": float(right.mean()),
        "eval/mixture_nll": float(-log_prob.mean()),
    }
    for side in ("chosen", "rejected"):  # TRL's logps/*: per pair, the mean over experts under the predicting weights
        metrics[f"eval/logps/{side}"] = float((weights * test[f"{side}_logps"]).sum(-1).mean())
    for j in range(h.shape[-1]):
        metrics[f"eval/expert_{j}/rewards/margins"] = float(beta * h[:, j].mean())
    return metrics, (h > 0).float(), log_prob, right


def _ranking_metrics(test: dict, weights: torch.Tensor, beta: float) -> tuple:
    """Held-out rankings (see the module docstring); (metrics, the share of each ranking's implied pairs each expert
    orders right (N, K), log p(ranking) of each (N,), the share of its pairs the mixture orders right (N,))."""
    h, ranking, mask, ranked = test["h"].double(), test["ranking"], test["ranking_mask"], test["ranked"]
    log_w = weights.double().clamp_min(1e-30).log()
    log_prob = torch.logsumexp(log_w + ranking_log_likelihood(h, ranking, beta, mask, ranked=ranked), -1)  # (N,)
    margins, valid = pairwise_margins(h, ranking, mask, ranked)  # (N, P, K), (N, P)
    share = valid.double() / valid.sum(-1, keepdim=True).clamp_min(1)
    mixture = (weights.double().unsqueeze(1) * torch.sigmoid(beta * margins)).sum(-1)  # (N, P): P(better first)
    reward = torch.logsumexp(log_w.unsqueeze(1) + beta * h, -1)  # (N, M): the mixture reward of each completion
    agreement = ranking_agreement(reward.masked_fill(~mask, -torch.inf), ranking, mask, ranked)
    right = ((mixture > 0.5).double() * share).sum(-1).float()
    metrics = {
        "eval/rewards/accuracies": float(right.mean()),
        "eval/mixture_nll": float(-log_prob.mean()),
        "eval/rankings/top1": agreement["top1"],
        "eval/rankings/kendall_tau": agreement["kendall_tau"],
        "eval/chance_nll": float(_uniform_nll(mask, ranked).mean()),  # a uniform guess's NLL, for comparison
    }
    for j in range(h.shape[-1]):
        metrics[f"eval/expert_{j}/rewards/margins"] = float(beta * (margins[..., j] * share).sum(-1).mean())
    return metrics, ((margins > 0).double() * share.unsqueeze(-1)).sum(1).float(), log_prob.float(), right


def _uniform_nll(mask: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """-log P of a ranking's observed top-k under a uniform guess: sum_{j < k} log(n - j), (N,)."""
    n = mask.sum(-1, keepdim=True).double()
    places = torch.arange(mask.shape[-1], dtype=torch.float64)
    return torch.where(places < ranked.unsqueeze(-1), (n - places).clamp_min(1).log(), 0.0).sum(-1)


def _codes(groups):
    lookup = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    return torch.tensor([lookup[g] for g in groups])
