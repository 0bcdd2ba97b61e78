"""What one EM step logs, TRL-style: per-expert rewards, responsibilities, gate usage (sums, then means)."""

from __future__ import annotations

import torch

from moedpo.inference.estep import EStep
from moedpo.inference.margins import log_ratios

PER_EXPERT = (
    "em/expert_usage",
    "gate/usage",
    "rewards/margins",
    "rewards/accuracies_per_expert",
    "rewards/chosen",
    "rewards/rejected",
)


def step_record(e: EStep, out: dict, h: torch.Tensor, gate_logits: torch.Tensor, beta: float, shift: float) -> dict:
    """Sums over one micro-batch's pairs (or latent units) of what the step logs; ``out`` detached."""
    h = h.detach().float()
    q = e.gate_q.reshape(-1, e.gate_q.shape[-1]).float()
    prior = torch.softmax(gate_logits.detach().float().reshape(-1, gate_logits.shape[-1]), -1)
    record = {
        "pairs": h.shape[0],
        "units": q.shape[0],
        "loss": -float(e.post.log_evidence) + shift,
        "em/marginal_nll": -float(e.post.log_evidence),
        "em/responsibility_entropy": float(-(torch.special.xlogy(q, q)).sum()),
        "rewards/accuracies": float((e.pair_q.float() * (h > 0).float()).sum()),
        "em/expert_usage": q.sum(0).cpu(),
        "gate/usage": prior.sum(0).cpu(),
        "rewards/margins": beta * h.sum(0).cpu(),
        "rewards/accuracies_per_expert": (h > 0).float().sum(0).cpu(),
    }
    if "chosen_logps" in out:
        chosen, rejected = log_ratios(out)
        record["rewards/chosen"] = beta * chosen.float().sum(0).cpu()
        record["rewards/rejected"] = beta * rejected.float().sum(0).cpu()
    return record


def routed_record(q, drawn, route, h, gate_logits, elbo: float) -> dict:
    """A routed step's sums: the guide's q (units, K), the drawn experts per unit and per pair, and the drawn
    expert's margin (``h`` is zero elsewhere)."""
    num_experts = q.shape[-1]
    prior = torch.softmax(gate_logits.detach().float().reshape(-1, num_experts), -1)
    drawn_h = h.gather(-1, route.unsqueeze(-1)).squeeze(-1).float()
    q = q.float()
    return {
        "pairs": h.shape[0],
        "units": q.shape[0],
        "loss": -elbo,
        "em/responsibility_entropy": float(-(torch.special.xlogy(q, q)).sum()),  # the guide's q
        "rewards/accuracies": float((drawn_h > 0).float().sum()),
        "em/expert_usage": torch.nn.functional.one_hot(drawn, num_experts).float().sum(0).cpu(),
        "gate/usage": prior.sum(0).cpu(),
    }


def summarise(records: list[dict]) -> dict:
    """Means over pairs (rewards, accuracies) or latent units (usage, entropy) of this process's records."""
    if not records:
        return {}
    pairs, units = sum(r["pairs"] for r in records), sum(r["units"] for r in records)
    metrics = {
        "rewards/accuracies": sum(r["rewards/accuracies"] for r in records) / pairs,
        "em/responsibility_entropy": sum(r["em/responsibility_entropy"] for r in records) / units,
    }
    if all("guide/kl" in r for r in records):
        metrics["guide/kl"] = sum(r["guide/kl"] for r in records) / units
    per_unit = {"em/expert_usage": units, "gate/usage": units}
    for key in PER_EXPERT:
        if key not in records[0]:
            continue
        values = sum(r[key] for r in records) / per_unit.get(key, pairs)
        for k, value in enumerate(values.tolist()):
            metrics[_expert_key(key, k)] = value
    return metrics


def _expert_key(key: str, k: int) -> str:
    if key in ("em/expert_usage", "gate/usage"):
        return f"{key}_{k}"
    if key == "rewards/accuracies_per_expert":
        return f"expert_{k}/rewards/accuracies"
    return f"expert_{k}/{key}"
