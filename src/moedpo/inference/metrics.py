"""What one EM step logs, TRL-style: per-expert rewards and log-probs, responsibilities, gate usage (sums, then
means)."""

from __future__ import annotations

import torch

from moedpo.inference.estep import EStep
from moedpo.inference.margins import log_ratios
from moedpo.losses.rankings import pairwise_margins

PER_EXPERT = (
    "em/expert_usage",
    "gate/usage",
    "rewards/margins",
    "rewards/accuracies_per_expert",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen_per_expert",
    "logps/rejected_per_expert",
)
PER_PAIR = ("logps/chosen", "logps/rejected")  # means over pairs, where every record has them


def step_record(e: EStep, out: dict, h: torch.Tensor, gate_logits: torch.Tensor, beta: float, shift: float) -> dict:
    """Sums over one micro-batch's pairs (or latent units) of what the step logs; ``out`` detached."""
    margin, correct = _row_margins(out, h.detach().float())
    q = e.gate_q.reshape(-1, e.gate_q.shape[-1]).float()
    prior = torch.softmax(gate_logits.detach().float().reshape(-1, gate_logits.shape[-1]), -1)
    record = {
        "pairs": h.shape[0],
        "units": q.shape[0],
        "loss": -float(e.post.log_evidence) + shift,
        "em/marginal_nll": -float(e.post.log_evidence),
        "em/responsibility_entropy": float(-(torch.special.xlogy(q, q)).sum()),
        "rewards/accuracies": float((e.pair_q.float() * correct).sum()),
        "em/expert_usage": q.sum(0).cpu(),
        "gate/usage": prior.sum(0).cpu(),
        "rewards/margins": beta * margin.sum(0).cpu(),
        "rewards/accuracies_per_expert": correct.sum(0).cpu(),
    }
    if "chosen_logps" in out:
        chosen, rejected = log_ratios(out)
        record["rewards/chosen"] = beta * chosen.float().sum(0).cpu()
        record["rewards/rejected"] = beta * rejected.float().sum(0).cpu()
        record.update(_logps(out["chosen_logps"], out["rejected_logps"], e.pair_q))
    return record


def _row_margins(out: dict, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's margin and whether each expert orders it right, (B, K) each. A ranking's h (B, M, K) counts
    every pair it implies: the mean margin over them and the share ordered right (Kendall's concordance)."""
    if h.dim() == 2:
        return h, (h > 0).float()
    margins, valid = pairwise_margins(h, out["ranking"], out.get("ranking_mask"), out.get("ranked"))  # (B, P, K)
    weights = (valid.float() / valid.sum(-1, keepdim=True).clamp_min(1)).unsqueeze(-1)  # (B, P, 1)
    return (weights * margins).sum(1), (weights * (margins > 0).float()).sum(1)


def _logps(chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor) -> dict:
    """TRL's ``logps/chosen`` / ``logps/rejected`` (the policy's sequence log-prob of each completion), summed over
    pairs. A mixture's policy log-prob of a pair is the posterior-weighted mean over experts, sum_k q_ik log pi_k(y|x)
    (``weights`` (B, K): the responsibilities, or a routed step's one-hot draw); K = 1 gives TRL's value. Each
    expert's own mean is logged too (``expert_<k>/logps/*``). ``chosen``, ``rejected``: (B, K)."""
    chosen, rejected, weights = chosen.detach().float(), rejected.detach().float(), weights.detach().float()
    return {
        "logps/chosen": float((weights * chosen).sum()),
        "logps/rejected": float((weights * rejected).sum()),
        "logps/chosen_per_expert": chosen.sum(0).cpu(),
        "logps/rejected_per_expert": rejected.sum(0).cpu(),
    }


def routed_record(q, drawn, route, h, gate_logits, elbo: float, out: dict | None = None) -> dict:
    """A routed step's sums: the guide's q (units, K), the drawn experts per unit and per pair, and the drawn
    expert's margin (``h`` is zero elsewhere) and, from ``out``, its log-probs (the other experts' are zero)."""
    num_experts = q.shape[-1]
    prior = torch.softmax(gate_logits.detach().float().reshape(-1, num_experts), -1)
    drawn_h = h.gather(-1, route.unsqueeze(-1)).squeeze(-1).float()
    q = q.float()
    record = {
        "pairs": h.shape[0],
        "units": q.shape[0],
        "loss": -elbo,
        "em/responsibility_entropy": float(-(torch.special.xlogy(q, q)).sum()),  # the guide's q
        "rewards/accuracies": float((drawn_h > 0).float().sum()),
        "em/expert_usage": torch.nn.functional.one_hot(drawn, num_experts).float().sum(0).cpu(),
        "gate/usage": prior.sum(0).cpu(),
    }
    if out is not None and "chosen_logps" in out:
        drawn_one_hot = torch.nn.functional.one_hot(route, num_experts).to(out["chosen_logps"])
        logps = _logps(out["chosen_logps"], out["rejected_logps"], drawn_one_hot)
        record.update({key: logps[key] for key in PER_PAIR})  # only the drawn expert ran: no per-expert means
    return record


def summarise(records: list[dict]) -> dict:
    """Means over pairs (rewards, accuracies) or latent units (usage, entropy) of the records (the loop passes every
    process's)."""
    if not records:
        return {}
    pairs, units = sum(r["pairs"] for r in records), sum(r["units"] for r in records)
    metrics = {
        "rewards/accuracies": sum(r["rewards/accuracies"] for r in records) / pairs,
        "em/responsibility_entropy": sum(r["em/responsibility_entropy"] for r in records) / units,
    }
    for key in PER_PAIR:
        if all(key in r for r in records):
            metrics[key] = sum(r[key] for r in records) / pairs
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
    return f"expert_{k}/{key.removesuffix('_per_expert')}"  # rewards/accuracies_per_expert: expert_k/rewards/...
