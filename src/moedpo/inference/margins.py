"""The experts' side of a step, as the EM loop sees it: margins h (B, K) from whatever the experts return.

Experts return h with a graph, or sequence log-probs without one (then the loop makes them leaves, and the
experts' own ``backward`` takes their gradients). Helpers here turn either into h, log-ratios and the margins a
TRL loss reads.

Rankings (a Plackett–Luce latent model, :mod:`moedpo.models.pl`): the experts return ``completion_logps``
(B, M, K) with ``ref_completion_logps`` (B, M) or (B, M, K), or ``h`` (B, M, K) directly, together with
``ranking`` (B, M) long (completion indices, best first) and optionally ``ranking_mask`` (B, M) bool and
``ranked`` (B,) long (observed first choices); h is then each completion's log-ratio and the ranking is the
observation.
"""

from __future__ import annotations

import torch


def num_pairs(batch) -> int:
    if isinstance(batch, dict) and "index" in batch:
        return int(batch["index"].shape[0])
    return int(len(batch))


def as_dict(out) -> dict:
    return {"h": out} if isinstance(out, torch.Tensor) else dict(out)


def gate_output(out) -> tuple[torch.Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})


def margins_with_leaves(out: dict):
    """h (B, K) and the leaf tensors the experts' backward needs (none when h already has a graph)."""
    if "h" in out:
        return out["h"], []
    if "completion_logps" in out:
        logps, leaves = out["completion_logps"], []
        if not logps.requires_grad:
            logps = out["completion_logps"] = logps.detach().requires_grad_(True)
            leaves = [logps]
        return completion_log_ratios(out), leaves
    chosen, rejected = out["chosen_logps"], out["rejected_logps"]
    leaves = []
    if not chosen.requires_grad:
        chosen, rejected = chosen.detach().requires_grad_(True), rejected.detach().requires_grad_(True)
        out["chosen_logps"], out["rejected_logps"] = chosen, rejected
        leaves = [chosen, rejected]
    chosen_ratio, rejected_ratio = log_ratios(out)
    return chosen_ratio - rejected_ratio, leaves


def completion_log_ratios(out: dict) -> torch.Tensor:
    """A ranking batch's h: log pi_k / pi_ref(k) of every completion, (B, M, K) (a shared reference (B, M)
    broadcasts)."""
    ref = out["ref_completion_logps"]
    return out["completion_logps"] - (ref.unsqueeze(-1) if ref.dim() == 2 else ref)


def observations(out: dict, h: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """What the latent model observes and its extra keyword arguments: each ranking (B, M) and its mask, or for
    pairs "chosen won" (B,) ones."""
    if "ranking" in out:
        extra = {"mask": out.get("ranking_mask"), "ranked": out.get("ranked")}
        return out["ranking"], {key: value for key, value in extra.items() if value is not None}
    return torch.ones(h.shape[0], dtype=h.dtype, device=h.device), {}


def log_ratios(out: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_k / pi_ref(k) of chosen and rejected: (B, K) each (a shared reference (B,) broadcasts)."""
    ref_c, ref_r = out["ref_chosen_logps"], out["ref_rejected_logps"]
    if ref_c.dim() == 1:
        ref_c, ref_r = ref_c.unsqueeze(-1), ref_r.unsqueeze(-1)
    return out["chosen_logps"] - ref_c, out["rejected_logps"] - ref_r


def loss_margins(out: dict, h: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The margin a TRL loss reads: h, or for ``ipo`` the log-ratios averaged per completion token."""
    if loss_type != "ipo":
        return h
    if "chosen_lengths" not in out:
        raise ValueError("loss_type='ipo' needs chosen_lengths / rejected_lengths (completion tokens) from the experts")
    chosen, rejected = log_ratios(out)
    n_c = out["chosen_lengths"].clamp_min(1).unsqueeze(-1).to(chosen.dtype)
    n_r = out["rejected_lengths"].clamp_min(1).unsqueeze(-1).to(rejected.dtype)
    return chosen / n_c - rejected / n_r


def detached(out: dict) -> dict:
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
