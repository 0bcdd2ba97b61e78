"""Held-out evaluation of a mixture of LLM experts: mixture and per-expert accuracy, responsibilities, ARI.

User scope: each annotator's posterior over the gate's latent comes from their *training* pairs (the same
E-step as training, :func:`moedpo.inference.e_step`), and predicts their held-out pairs as
sum_k q_uk sigmoid(beta h_k) (exact for the built-in models; for a user's own model, q is the posterior of the
latent whose prior is the gate). Pair scope: the gate's prior w(x, u) predicts (the label is what is predicted).
ARI compares the inferred type (user posterior or pair posterior argmax) of the held-out data's own annotators with
its ``group`` column (no group, no ARI), beside ``eval/posterior_confidence``, the mean largest posterior.
"""

from __future__ import annotations

import torch

from moedpo.data.tokenize import collate
from moedpo.eval.metrics import adjusted_rand_index
from moedpo.inference import e_step
from moedpo.inference.margins import log_ratios
from moedpo.losses import mixture_nll


@torch.no_grad()
def bank_margins(bank, examples: list[dict], pad_token_id: int, batch_size: int = 64) -> dict:
    """Margins and log-probs of every example, batched: {"h": (N, K), "chosen_logps": (N, K), ...} on CPU."""
    parts = []
    for start in range(0, len(examples), batch_size):
        out = bank.margins(collate(examples[start : start + batch_size], pad_token_id))
        chosen, rejected = log_ratios(out)
        parts.append({"h": (chosen - rejected).cpu(), **{k: v.cpu() for k, v in out.items()}})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def gate_batch(examples: list[dict]) -> dict:
    """Only the fields a gate reads, for many examples (no padded token batch)."""
    batch = {"user": torch.tensor([e["user"] for e in examples], dtype=torch.long)}
    if all(e["user_features"] is not None for e in examples):
        batch["user_features"] = torch.tensor([e["user_features"] for e in examples], dtype=torch.float32)
    if all("prompt_features" in e for e in examples):
        batch["prompt_features"] = torch.stack([e["prompt_features"] for e in examples])
    return batch


@torch.no_grad()
def latent_posterior(run, h: torch.Tensor, gate_logits: torch.Tensor, extra: dict) -> torch.Tensor:
    """The exact posterior of the latent whose prior is the gate, under the run's own latent model (``em.model``):
    (U, K) per annotator in user scope, (B, K) per pair in pair scope. The one route for posteriors after training
    (evaluation, routing, ``personalize``, the report): the E-step of training, :func:`moedpo.inference.e_step`.

    ``h`` (B, K) margins; ``gate_logits`` and ``extra`` as the gate gives them (``extra``: e.g. ``user_index``)."""
    q = _exact_e_step(run, h, gate_logits, extra).gate_q
    return q.reshape(-1, q.shape[-1])  # float64


def _exact_e_step(run, h: torch.Tensor, gate_logits: torch.Tensor, extra: dict):
    beta, smoothing = run.config.em.beta, run.config.em.label_smoothing
    h = h.double()
    args = (h, gate_logits.cpu().double(), beta, torch.ones(h.shape[0], dtype=h.dtype))
    kwargs = {"label_smoothing": smoothing, **{k: v.cpu() for k, v in extra.items()}}
    return e_step(run.model, args, kwargs, beta, smoothing, run.model.max_plate_nesting)


@torch.no_grad()
def user_posteriors(run, examples: list[dict], fit: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(user ids (U,), posterior over the gate's latent (U, K)) of the annotators of ``examples``."""
    fit = fit if fit is not None else bank_margins(run.bank, examples, run.tokenizer.pad_token_id)
    batch = gate_batch(examples)
    logits, extra = run.gate.logits(batch, fit["features"].to(run.bank.device))
    return torch.unique(batch["user"]), latent_posterior(run, fit["h"], logits, extra).float()


@torch.no_grad()
def log_evidence(run, examples: list[dict]) -> tuple[float, torch.Tensor]:
    """(log p(pairs) per pair under the run's model, gate and experts; the latent's posterior (units, K)) of
    ``examples``, all in one exact E-step (``em.restarts`` ranks its starts by it without held-out pairs)."""
    fit = bank_margins(run.bank, examples, run.tokenizer.pad_token_id)
    logits, extra = run.gate.logits(gate_batch(examples), fit["features"].to(run.bank.device))
    e = _exact_e_step(run, fit["h"], logits, extra)
    return float(e.post.log_evidence) / len(examples), e.gate_q.reshape(-1, e.gate_q.shape[-1]).float()


def predictive_log_prob(h: torch.Tensor, weights: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """log sum_k w_k P(y+ > y- | expert k) of each pair, (N, K) margins and weights -> (N,)."""
    return -mixture_nll(h, weights.clamp_min(1e-30).log(), beta, label_smoothing)


@torch.no_grad()
def evaluate(run, train: list[dict], held_out: list[dict]) -> tuple[dict, dict]:
    """Returns (metrics with ``eval/`` keys, details with per-example responsibilities and log-probs)."""
    config, pad = run.config, run.tokenizer.pad_token_id
    beta, k = config.em.beta, config.experts.num_experts
    test = bank_margins(run.bank, held_out, pad)
    h = test["h"]
    details = {"expert_chosen_logps": test["chosen_logps"], "expert_rejected_logps": test["rejected_logps"], "h": h}
    logits, extra = run.gate.logits(gate_batch(held_out), test["features"].to(run.bank.device))
    prior = torch.softmax(logits, -1).cpu()
    prior = prior[extra["user_index"].cpu()] if "user_index" in extra else prior  # (N, K): w(x, u) per pair
    if config.em.scope == "user":
        ids, q_users = user_posteriors(run, train)
        position = {int(u): i for i, u in enumerate(ids)}
        rows = torch.tensor([position.get(e["user"], -1) for e in held_out])
        weights = torch.where((rows >= 0).unsqueeze(-1), q_users[rows.clamp_min(0)], prior)  # unseen users: prior
        seen = sorted({e["user"] for e in held_out if e["user"] in position})  # the held-out data's annotators
        group_of = {e["user"]: e["group"] for e in held_out}
        groups, posteriors = [group_of[u] for u in seen], q_users[[position[u] for u in seen]]
        details["user_responsibilities"], details["user_ids"] = q_users, ids
    else:
        weights = prior
        groups = [e["group"] for e in held_out]
        posteriors = latent_posterior(run, h, logits, extra).float()
    log_prob = predictive_log_prob(h, weights, beta, config.em.label_smoothing)
    metrics = {
        "eval/rewards/accuracies": float((log_prob > -torch.log(torch.tensor(2.0))).float().mean()),
        "eval/mixture_nll": float(-log_prob.mean()),
    }
    for side in ("chosen", "rejected"):  # TRL's logps/*: per pair, the mean over experts under the predicting weights
        metrics[f"eval/logps/{side}"] = float((weights * test[f"{side}_logps"]).sum(-1).mean())
    kinds = [e["group"] for e in held_out]
    for j in range(k):
        metrics[f"eval/expert_{j}/rewards/accuracies"] = float((h[:, j] > 0).float().mean())
        metrics[f"eval/expert_{j}/rewards/margins"] = float(beta * h[:, j].mean())
        for kind in sorted({g for g in kinds if g is not None}):  # per annotator type: each expert's own type
            rows = torch.tensor([g == kind for g in kinds])
            metrics[f"eval/expert_{j}/{kind}/rewards/accuracies"] = float((h[rows, j] > 0).float().mean())
    routed = weights.argmax(-1)  # sparse: the top expert's own prediction
    metrics["eval/top1/rewards/accuracies"] = float((h[torch.arange(h.shape[0]), routed] > 0).float().mean())
    if groups and all(g is not None for g in groups):  # only where the data says who is of which type
        metrics["eval/ari"] = adjusted_rand_index(_codes(groups), posteriors.argmax(-1))
        # the hard ARI reads 1.0 even for near-uniform posteriors: report how sure they are beside it
        metrics["eval/posterior_confidence"] = float(posteriors.max(-1).values.mean())
    details["weights"], details["log_prob"] = weights, log_prob  # log p(y+ > y-) of each held-out pair
    return metrics, details


def _codes(groups):
    lookup = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    return torch.tensor([lookup[g] for g in groups])
