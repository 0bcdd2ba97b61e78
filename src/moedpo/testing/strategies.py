"""Hypothesis strategies for latent preference models: margins, gate logits, batches, user groupings.

Tensors come out as float64 by default (identities are checked at full precision). Bounds are keyword
arguments so users can push into the extreme regime (|beta h| up to 1e4) or keep tests cheap.
"""

from __future__ import annotations

import torch

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as error:  # hypothesis is optional: only these strategies need it
    raise ImportError(
        f"moedpo.testing.strategies needs hypothesis ({error}); install it with: pip install 'moedpo[testing]'"
    ) from error

_FLOAT = dict(allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def tensors(draw, shape: tuple[int, ...], max_abs: float = 10.0, dtype=torch.float64) -> torch.Tensor:
    """A tensor of the given shape with finite entries in [-max_abs, max_abs]."""
    array = draw(hnp.arrays("float64", shape, elements=st.floats(-max_abs, max_abs, **_FLOAT)))
    return torch.as_tensor(array, dtype=dtype)


def margins(batch_size: int, num_experts: int, max_abs: float = 10.0, dtype=torch.float64):
    """DPO margins h of shape (B, K)."""
    return tensors((batch_size, num_experts), max_abs, dtype)


def gate_logits(batch_size: int, num_experts: int, max_abs: float = 5.0, dtype=torch.float64):
    """Gate logits of shape (B, K) (or (U, K): pass the number of users as ``batch_size``)."""
    return tensors((batch_size, num_experts), max_abs, dtype)


def betas(min_value: float = 0.01, max_value: float = 5.0):
    """DPO temperatures beta > 0."""
    return st.floats(min_value, max_value, **_FLOAT)


@st.composite
def simplex(draw, batch_size: int, num_experts: int, dtype=torch.float64) -> torch.Tensor:
    """Rows on the K-simplex (B, K), including sparse rows (zeros allowed)."""
    raw = draw(tensors((batch_size, num_experts), 1.0, dtype)).abs()
    raw[:, draw(st.integers(0, num_experts - 1))] += 0.1  # every row has some mass
    return raw / raw.sum(-1, keepdim=True)


@st.composite
def user_groupings(draw, num_pairs: int, max_users: int | None = None) -> tuple[torch.Tensor, int]:
    """(user_index (B,) long, U): every user in [0, U) owns at least one of the B pairs."""
    max_users = num_pairs if max_users is None else min(max_users, num_pairs)
    num_users = draw(st.integers(1, max_users))
    rest = draw(st.lists(st.integers(0, num_users - 1), min_size=num_pairs - num_users, max_size=num_pairs - num_users))
    order = draw(st.permutations(list(range(num_users)) + rest))
    return torch.tensor(order, dtype=torch.long), num_users


@st.composite
def mixture_batches(
    draw,
    max_batch: int = 6,
    max_experts: int = 4,
    min_experts: int = 1,
    max_abs: float = 10.0,
    user_scope: bool = False,
) -> dict:
    """A batch for a latent BT model: {"h", "gate_logits", "beta", "obs"} plus "user_index" in user scope."""
    batch = draw(st.integers(1, max_batch))
    experts = draw(st.integers(min_experts, max_experts))
    out = {"h": draw(margins(batch, experts, max_abs)), "beta": draw(betas())}
    if user_scope:
        user_index, num_users = draw(user_groupings(batch))
        out.update(user_index=user_index, gate_logits=draw(gate_logits(num_users, experts)))
    else:
        out["gate_logits"] = draw(gate_logits(batch, experts))
    out["obs"] = torch.ones(batch, dtype=torch.float64)
    return out


@st.composite
def ranking_batches(
    draw,
    max_batch: int = 5,
    max_completions: int = 4,
    max_experts: int = 3,
    min_experts: int = 1,
    max_abs: float = 10.0,
    user_scope: bool = False,
) -> dict:
    """A batch for a latent Plackett–Luce model: {"h" (B, M, K), "gate_logits", "beta", "obs" (B, M) rankings,
    "mask" (B, M), "ranked" (B,)} plus "user_index" in user scope. Rankings have 2..M real completions; padding
    sits last; ``ranked`` (the observed first choices, as from tied scores) is 1..n-1, often all n - 1."""
    batch = draw(st.integers(1, max_batch))
    width = draw(st.integers(2, max_completions))
    experts = draw(st.integers(min_experts, max_experts))
    lengths = draw(st.lists(st.integers(2, width), min_size=batch, max_size=batch))
    rows = [draw(st.permutations(range(n))) + list(range(n, width)) for n in lengths]
    ranked = [draw(st.one_of(st.just(n - 1), st.integers(1, n - 1))) for n in lengths]
    out = {
        "h": draw(tensors((batch, width, experts), max_abs)),
        "beta": draw(betas()),
        "obs": torch.tensor(rows, dtype=torch.long),
        "mask": torch.arange(width) < torch.tensor(lengths).unsqueeze(-1),
        "ranked": torch.tensor(ranked, dtype=torch.long),
    }
    if user_scope:
        user_index, num_users = draw(user_groupings(batch))
        out.update(user_index=user_index, gate_logits=draw(gate_logits(num_users, experts)))
    else:
        out["gate_logits"] = draw(gate_logits(batch, experts))
    return out
