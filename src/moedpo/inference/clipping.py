"""Gradient clipping over parameters of which some are sharded (DTensors under ``train.parallel=fsdp``).

``torch.nn.utils.clip_grad_norm_`` refuses a mix of DTensor and plain gradients; this is its rule (one total
2-norm over every gradient, each scaled by min(1, max_norm / (norm + 1e-6))) with each sharded gradient's norm
taken over all its shards.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients of ``params`` in place to total 2-norm ``max_norm``; returns the norm before clipping.
    The same arithmetic as torch's (each gradient's norm, their norm, one clamped coefficient), so a group of one
    process clips bit for bit as no parallelism does."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(coefficient.item() if isinstance(g, DTensor) else coefficient)
    return float(total)
