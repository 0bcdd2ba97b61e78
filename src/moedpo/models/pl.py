"""Latent-class Plackett–Luce models over rankings, as Pyro programs (EM-DPO v2, arXiv 2510.15716).

The ranking counterparts of :mod:`moedpo.models.bt`, with the same signature
``model(h, gate_logits, beta, obs=None, *, mask=None, **batch)``, so the E-step, the EM losses and
:mod:`moedpo.testing` take them as they are. Here ``h`` (B, M, K) holds each completion's implicit log-ratio
log pi_k(y_m | x) - log pi_ref(y_m | x) per expert, and ``obs`` (B, M) long each ranking, completion indices
best first; ``mask`` (B, M) marks real positions (a prefix of at least two) when rankings differ in length;
``ranked`` (B,) long, where given, how many first choices each ranking observes (tied scores below them).
The closed forms are in :mod:`moedpo.losses.rankings`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.ops.indexing import Vindex

from moedpo.losses.rankings import plackett_luce_log_prob, ranking_log_likelihood
from moedpo.models.bt import ENUM, user_slots


class _Rankings(constraints.Constraint):
    """Each ranking is a permutation of its real completions 0..n-1 (n = the mask's count)."""

    event_dim = 1

    def __init__(self, mask):
        self.mask = mask
        super().__init__()

    def check(self, value):
        mask = torch.ones_like(value, dtype=torch.bool) if self.mask is None else self.mask.expand_as(value)
        n = mask.sum(-1, keepdim=True)
        real = torch.where(mask, value, value.shape[-1])  # padding sorts last whatever its index
        ordered = real.sort(-1).values
        positions = torch.arange(value.shape[-1], device=value.device).expand_as(value)
        return (mask.long().cumprod(-1).bool() == mask).all(-1) & ((ordered == positions) | (positions >= n)).all(-1)


class PlackettLuce(TorchDistribution):
    """Rankings of M items with log-scores ``logits`` (..., M): P(sigma) = prod_j softmax over the remaining
    items of the score of sigma_j. A value is (..., M) long, item indices best first. ``mask`` (..., M) bool
    keeps the first n items of each row (n >= 2) and marks padding at the end of both logits and rankings.
    ``ranked`` (...) long: only the first ``ranked`` choices of a value are scored (a top-k observation; the
    rest of its order is summed out). Sampling is the Gumbel top-k trick: sort logits + Gumbel noise (a whole
    ranking, whose first ``ranked`` places are a draw of the top-k)."""

    arg_constraints = {"logits": constraints.real_vector}
    has_enumerate_support = False

    def __init__(
        self,
        logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        ranked: torch.Tensor | None = None,
        validate_args=None,
    ):
        self.logits = logits
        self.item_mask = None if mask is None else mask.expand_as(logits)  # not .mask: Pyro's method
        self.ranked = None if ranked is None else ranked.expand(logits.shape[:-1])
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return _Rankings(self.item_mask)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        mask = None if self.item_mask is None else self.item_mask.expand(shape)
        ranked = None if self.ranked is None else self.ranked.expand(shape[:-1])
        return PlackettLuce(self.logits.expand(shape), mask, ranked, validate_args=False)

    def sample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            gumbel = -torch.log(-torch.log(torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device)))
            keys = self.logits.expand(shape) + gumbel
            if self.item_mask is not None:
                keys = keys.masked_fill(~self.item_mask.expand(shape), -torch.inf)
            return keys.argsort(dim=-1, descending=True, stable=True)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return plackett_luce_log_prob(self.logits, value, self.item_mask, self.ranked)


def ranking_rows(h, beta, obs, *, mask=None, ranked=None, **_) -> torch.Tensor:
    """log P(ranking_i | z = k), (B, K): what each expert makes of each row. The E-step reads a model's
    ``row_log_likelihood`` to turn its derivatives into per-row responsibilities (BT models: the sigmoid link)."""
    return ranking_log_likelihood(h, obs, beta, mask, ranked=ranked)


def _no_smoothing(label_smoothing: float) -> None:
    if label_smoothing:
        raise ValueError(f"Plackett–Luce models have no label-smoothing link; got label_smoothing={label_smoothing}")


def mixture_pl_model(
    h, gate_logits, beta, obs=None, *, mask=None, ranked=None, label_smoothing=0.0, subsample_size=None,
    subsample=None, **_,
):  # fmt: skip
    """Ranking scope: each ranking i has its own type z_i ~ Categorical(softmax(gate_logits_i)).

    h (B, M, K), gate_logits (B, K), obs (B, M) or None (then rankings are sampled), mask (B, M) or None,
    ranked (B,) or None.
    """
    _no_smoothing(label_smoothing)
    by_expert = h.transpose(-1, -2)  # (B, K, M)
    with pyro.plate("pairs", h.shape[0], subsample_size=subsample_size, subsample=subsample) as idx:
        z = pyro.sample("z", dist.Categorical(logits=gate_logits[idx]), infer=ENUM)  # (B,) or (K, 1)
        scores = beta * Vindex(by_expert[idx])[..., z, :]  # (B, M) or (K, B, M)
        rows = None if mask is None else mask[idx]
        top = None if ranked is None else ranked[idx]
        pyro.sample("y", PlackettLuce(scores, rows, top), obs=None if obs is None else obs[idx])


mixture_pl_model.max_plate_nesting = 1
mixture_pl_model.row_log_likelihood = ranking_rows


def user_pl_model(
    h, gate_logits, beta, obs=None, *, user_index, mask=None, ranked=None, label_smoothing=0.0,
    subsample_size=None, subsample=None, **_,
):  # fmt: skip
    """User scope: user u has one type z_u shared by all its rankings, P(D_u) = sum_k w_uk prod_i P(sigma_i | k).

    h (B, M, K), gate_logits (U, K), user_index (B,) long in [0, U). Rankings are laid out (U, N) as in
    :func:`moedpo.models.user_bt_model`; plate "users" (dim -2) subsamples users.
    """
    _no_smoothing(label_smoothing)
    num_users = gate_logits.shape[0]
    slots, present = user_slots(user_index, num_users)  # (U, N)
    by_expert = h.transpose(-1, -2)  # (B, K, M)
    real = torch.ones(h.shape[0], h.shape[1], dtype=torch.bool, device=h.device) if mask is None else mask
    with pyro.plate("users", num_users, dim=-2, subsample_size=subsample_size, subsample=subsample) as users:
        z = pyro.sample("z", dist.Categorical(logits=gate_logits[users].unsqueeze(-2)), infer=ENUM)
        with pyro.plate("user_pairs", slots.shape[1], dim=-1):
            rows = slots[users]  # (U, N)
            scores = beta * Vindex(by_expert[rows])[..., z, :]  # (U, N, M) or (K, U, N, M)
            pyro.sample(
                "y",
                PlackettLuce(scores, real[rows], None if ranked is None else ranked[rows]).mask(present[users]),
                obs=None if obs is None else obs[rows],
            )


user_pl_model.max_plate_nesting = 2
user_pl_model.row_log_likelihood = ranking_rows
