"""Closed forms of the latent-class Plackett–Luce mixture over rankings (EM-DPO v2, arXiv 2510.15716).

An annotator ranks M completions of one prompt, best first. Under type k, completion m has the DPO implicit
reward beta * h_mk, h_mk = log pi_k(y_m | x) - log pi_ref(y_m | x), and the ranking sigma is drawn by picking
the best, then the best of the rest, and so on:

    P(sigma | z = k) = prod_j exp(beta h_{sigma_j k}) / sum_{l >= j} exp(beta h_{sigma_l k})

For M = 2 this is sigmoid(beta (h_chosen - h_rejected)), the Bradley–Terry likelihood of
:mod:`moedpo.losses.mixture`. A ranking of M > 2 completions is M - 1 comparisons that share one type, which
is what identifies the type from a single annotation. Rankings of different lengths share a batch: ``mask``
(B, M) marks the first n_i entries of each ranking as real (n_i >= 2); the rest are padding. A partial
ranking whose order is known only for its first k_i places (scores that tie below them: the top-k_i choices are
observed, the rest are not) has ``ranked`` (B,) = k_i: only the first k_i choices enter, each still against every
completion left, which is P(the top-k_i prefix) with the order of the rest summed out. k_i = n_i - 1 (the
default) is the whole ranking; the last place's term is always 0.

These functions are the hand-written twins of :mod:`moedpo.models.pl`; everything works in log space.
"""

from __future__ import annotations

import torch


def _padded(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # the most negative float, not -inf: a suffix of padding stays finite and so does its gradient
    return scores if mask is None else scores.masked_fill(~mask, torch.finfo(scores.dtype).min)


def plackett_luce_log_prob(
    scores: torch.Tensor,
    ranking: torch.Tensor,
    mask: torch.Tensor | None = None,
    ranked: torch.Tensor | None = None,
) -> torch.Tensor:
    """log P(ranking | scores): scores (..., M) per completion, ranking (..., M) long, completion indices best
    first; ``mask`` (..., M) bool marks real ranking positions (a prefix); ``ranked`` (...) long: how many of the
    first choices are observed (None: all). Broadcasts; returns (...)."""
    scores, ranking = torch.broadcast_tensors(scores, ranking)
    ordered = _padded(scores.gather(-1, ranking), None if mask is None else mask.expand_as(scores))
    tail = torch.logcumsumexp(ordered.flip(-1), -1).flip(-1)  # log sum_{l >= j} exp(score of position l)
    terms = ordered - tail  # a padded position: min - (min + log n) = 0 exactly in floating point
    if ranked is not None:  # choices after the first ``ranked`` are not observed
        positions = torch.arange(terms.shape[-1], device=terms.device)
        terms = torch.where(positions < ranked.unsqueeze(-1), terms, 0.0)
    return terms.sum(-1)


def ranking_log_likelihood(
    h: torch.Tensor,
    ranking: torch.Tensor,
    beta: float,
    mask: torch.Tensor | None = None,
    *,
    ranked: torch.Tensor | None = None,
) -> torch.Tensor:
    """log P(ranking_i | z = k): h (B, M, K) implicit log-ratios per completion and expert, ranking (B, M),
    mask (B, M), ranked (B,) -> (B, K)."""
    by_expert = beta * h.transpose(-1, -2)  # (B, K, M)
    mask = None if mask is None else mask.unsqueeze(-2)
    ranked = None if ranked is None else ranked.unsqueeze(-1)  # (B, 1): the same for every expert
    return plackett_luce_log_prob(by_expert, ranking.unsqueeze(-2), mask, ranked)


def ranking_component_log_likelihood(
    h: torch.Tensor,
    ranking: torch.Tensor,
    beta: float,
    mask: torch.Tensor | None = None,
    user_index: torch.Tensor | None = None,
    num_users: int | None = None,
    *,
    ranked: torch.Tensor | None = None,
) -> torch.Tensor:
    """log P(data of one latent unit | z = k): per ranking (B, K), or summed per user (U, K) when
    ``user_index`` (B,) long in [0, U) is given."""
    loglik = ranking_log_likelihood(h, ranking, beta, mask, ranked=ranked)
    if user_index is None:
        return loglik
    num_users = int(user_index.max()) + 1 if num_users is None else num_users
    return loglik.new_zeros(num_users, loglik.shape[-1]).index_add(0, user_index, loglik)


def _log_joint(h, ranking, gate_logits, beta, mask, user_index, ranked) -> torch.Tensor:
    loglik = ranking_component_log_likelihood(h, ranking, beta, mask, user_index, gate_logits.shape[0], ranked=ranked)
    return torch.log_softmax(gate_logits, -1) + loglik


def ranking_mixture_nll(
    h: torch.Tensor,
    gate_logits: torch.Tensor,
    beta: float,
    ranking: torch.Tensor,
    mask: torch.Tensor | None = None,
    user_index: torch.Tensor | None = None,
    *,
    ranked: torch.Tensor | None = None,
) -> torch.Tensor:
    """-log sum_k w_k P(ranking | z = k): per ranking, h (B, M, K), gate_logits (B, K) -> (B,); user scope
    (``user_index`` given, gate_logits (U, K)) -> (U,), one type shared by all of a user's rankings."""
    return -torch.logsumexp(_log_joint(h, ranking, gate_logits, beta, mask, user_index, ranked), -1)


def ranking_responsibilities(
    h: torch.Tensor,
    gate_logits: torch.Tensor,
    beta: float,
    ranking: torch.Tensor,
    mask: torch.Tensor | None = None,
    user_index: torch.Tensor | None = None,
    *,
    ranked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact posterior over the type of each ranking (B, K), or of each user (U, K) in user scope."""
    return torch.softmax(_log_joint(h, ranking, gate_logits, beta, mask, user_index, ranked), -1)


def ranking_pairs(
    ranking: torch.Tensor, mask: torch.Tensor | None = None, ranked: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair a ranking implies, as completion indices: (better (B, P), worse (B, P)) with
    P = M (M - 1) / 2 position pairs j < l, and ``valid`` (B, P) bool (both positions real, and j among the
    ``ranked`` first places: an unranked remainder's order is not known). What a ranking "cut into pairs" is;
    :func:`pairwise_margins` reads it."""
    num = ranking.shape[-1]
    first, second = torch.triu_indices(num, num, offset=1, device=ranking.device)  # (P,) positions j < l
    better, worse = ranking[..., first], ranking[..., second]
    valid = torch.ones_like(better, dtype=torch.bool)
    if mask is not None:
        valid = valid & mask[..., first] & mask[..., second]
    if ranked is not None:
        valid = valid & (first < ranked.unsqueeze(-1))
    return torch.stack([better, worse]), valid


def pairwise_margins(
    h: torch.Tensor, ranking: torch.Tensor, mask: torch.Tensor | None = None, ranked: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_better - h_worse for every pair a ranking implies: h (B, M, K) -> margins (B, P, K) and ``valid``
    (B, P). An expert orders pair p right when its margin is positive (Kendall's concordance)."""
    (better, worse), valid = ranking_pairs(ranking, mask, ranked)
    return _rows(h, better) - _rows(h, worse), valid


def _rows(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """h (B, M, K) at completions ``index`` (B, P) -> (B, P, K)."""
    return h.gather(-2, index.unsqueeze(-1).expand(*index.shape, h.shape[-1]))
