"""Memory-light sequence log-probs over completion tokens.

The model returns logits only for the positions that can hold completion tokens (``logits_to_keep``), and the
log-softmax runs one sequence at a time, so no full float32 copy of the (2B, T, V) logits ever exists.
"""

from __future__ import annotations

import inspect

import torch


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """log softmax(logits)[labels] per position: (N, T, V), (N, T) -> (N, T), at least float32.

    float32/float64 logits are used in place (gather minus logsumexp: no (N, T, V) copy). Half-precision logits
    are upcast ``chunk_rows`` sequences at a time, so a float32 copy of the whole tensor never exists.
    """
    if logits.element_size() >= 4:
        return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    rows = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk = logits[start : start + chunk_rows].float()  # (chunk_rows, T, V) float32 at most
        picked = chunk.gather(-1, labels[start : start + chunk_rows].unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(chunk, -1))
    return torch.cat(rows)


def _accepts_logits_to_keep(model) -> bool:
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(target.forward).parameters


def sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    return_outputs: bool = False,
    **forward_kwargs,
):
    """Sum of log pi(token | prefix) over completion tokens: (N, T) batch -> (N,) (float32 or wider).

    Extra keyword arguments go to the model (``inputs_embeds`` replaces ``input_ids`` as the model's input; the
    labels still come from ``input_ids``). With ``return_outputs`` also returns the model's outputs.
    """
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    first = int(mask.float().argmax(1).min()) if mask.any() else labels.shape[1] - 1  # first completion label
    keep = labels.shape[1] - first  # positions whose next token can be a completion token
    kwargs = dict(forward_kwargs, use_cache=False)
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep + 1  # the last position predicts nothing; trimmed below
    if "inputs_embeds" not in kwargs:
        kwargs["input_ids"] = input_ids
    outputs = model(attention_mask=attention_mask, **kwargs)
    logits = outputs.logits[:, -(keep + 1) : -1]  # (N, keep, V): predictions for labels[:, first:]
    token_logps = selective_log_softmax(logits, labels[:, first:])
    logps = (token_logps * mask[:, first:]).sum(-1)
    return (logps, outputs) if return_outputs else logps


def pooled_prompt_features(hidden: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """Mean of hidden states over prompt tokens: (N, T, D) -> (N, D) float32."""
    prompt = (attention_mask.bool() & ~completion_mask.bool()).unsqueeze(-1).float()
    return (hidden.float() * prompt).sum(1) / prompt.sum(1).clamp_min(1.0)
