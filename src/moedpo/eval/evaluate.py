"""Held-out evaluation of a mixture of LLM experts: mixture and per-expert accuracy, responsibilities, ARI.

User scope: each annotator's posterior over experts comes from their *training* pairs (the E-step), and
predicts their held-out pairs as sum_k q_uk sigmoid(beta h_k). Pair scope: the gate's prior w(x, u) predicts.
ARI compares the inferred type (user posterior or pair gate/posterior argmax) with the ``group`` column.
"""

from __future__ import annotations

import torch

from moedpo.builders import gate_logits
from moedpo.config import Config
from moedpo.data.tokenize import collate
from moedpo.eval.metrics import adjusted_rand_index
from moedpo.losses import log_likelihood, responsibilities, user_responsibilities


@torch.no_grad()
def bank_margins(bank, examples: list[dict], pad_token_id: int, batch_size: int = 64) -> dict:
    """Margins and log-probs of every example, batched: {"h": (N, K), ...}."""
    parts = []
    for start in range(0, len(examples), batch_size):
        out = bank.margins(collate(examples[start : start + batch_size], pad_token_id))
        parts.append({k: v.cpu() for k, v in out.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _gate_for(config, gate, examples, features):
    """Gate logits for many examples: only the fields a gate reads, not a padded token batch."""
    batch = {"user": torch.tensor([e["user"] for e in examples], dtype=torch.long)}
    if all(e["user_features"] is not None for e in examples):
        batch["user_features"] = torch.tensor([e["user_features"] for e in examples], dtype=torch.float32)
    if all("prompt_features" in e for e in examples):
        batch["prompt_features"] = torch.stack([e["prompt_features"] for e in examples])
    return gate_logits(config, gate, batch, features)


@torch.no_grad()
def evaluate(config: Config, bank, gate, train: list[dict], held_out: list[dict], pad_token_id: int) -> tuple:
    """Returns (metrics with ``eval/`` keys, details with per-example responsibilities and log-probs)."""
    beta, k = config.em.beta, config.experts.num_experts
    test = bank_margins(bank, held_out, pad_token_id)
    h = test["h"]
    metrics, details = (
        {},
        {"expert_chosen_logps": test["chosen_logps"], "expert_rejected_logps": test["rejected_logps"]},
    )
    if config.em.scope == "user":
        fit = bank_margins(bank, train, pad_token_id)
        users = torch.tensor([e["user"] for e in train])
        ids, local = torch.unique(users, return_inverse=True)
        logits, _ = _gate_for(config, gate, train, fit["features"].to(bank.device))
        q_users = user_responsibilities(fit["h"], logits.cpu(), beta, local)  # (U, K)
        position = {int(u): i for i, u in enumerate(ids)}
        rows = torch.tensor([position.get(e["user"], -1) for e in held_out])
        prior = torch.softmax(logits.cpu().mean(0), -1)
        weights = torch.where((rows >= 0).unsqueeze(-1), q_users[rows.clamp_min(0)], prior)  # unseen users: prior
        groups = _groups(train, ids, users)
        inferred = q_users.argmax(-1)
        details["user_responsibilities"] = q_users
    else:
        logits, _ = _gate_for(config, gate, held_out, test["features"].to(bank.device))
        weights = torch.softmax(logits.cpu(), -1)
        groups = [e["group"] for e in held_out]
        inferred = responsibilities(h, logits.cpu(), beta).argmax(-1)
    prob = (weights * log_likelihood(h, beta, config.em.label_smoothing).exp()).sum(-1)
    metrics["eval/rewards/accuracies"] = float((prob > 0.5).float().mean())
    metrics["eval/mixture_nll"] = float(-prob.clamp_min(1e-30).log().mean())
    for j in range(k):
        metrics[f"eval/expert_{j}/accuracies"] = float((h[:, j] > 0).float().mean())
        metrics[f"eval/expert_{j}/rewards/margins"] = float(beta * h[:, j].mean())
    routed = weights.argmax(-1)  # sparse: the top expert's own prediction
    metrics["eval/top1/accuracies"] = float((h[torch.arange(h.shape[0]), routed] > 0).float().mean())
    if all(g is not None for g in groups) and groups:
        metrics["eval/ari"] = adjusted_rand_index(_codes(groups), inferred)
    details["weights"] = weights
    return metrics, details


def _groups(train, ids, users):
    group_of = {}
    for e, u in zip(train, users.tolist()):
        group_of.setdefault(u, e["group"])
    return [group_of[int(u)] for u in ids]


def _codes(groups):
    lookup = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    return torch.tensor([lookup[g] for g in groups])
