"""A tabular world of rankings with planted annotator types (EM-DPO v2, arXiv 2510.15716; issue 20's ranking world).

P prompts with R candidate responses each; each of T annotator types orders each prompt's responses its own
(random) way, any two types apart by half the pairs or more, with reward r_t(x, y) = ``reward_scale`` times the
response's place in that order. An annotator
of type t is shown M of a prompt's responses and ranks them by Plackett–Luce on r_t (pick the best with
probability softmax(r_t), then the best of the rest, ...). One ranking of M >= 3 responses is M - 1 choices that
share one type, which is what identifies the type from a single annotation; cut into pairs, the same data
loses that link (:func:`cut_into_pairs`), and one comparison per annotator cannot identify a mixture (SPEC §1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moedpo.data.synthetic import TabularPairs
from moedpo.losses.rankings import ranking_component_log_likelihood, ranking_pairs


@dataclass
class TabularRankings:
    """Rankings as index tensors: prompt (N,), the shown responses ``completions`` (N, M), ``ranking`` (N, M)
    (positions into ``completions``, best first) and the annotator ``user`` (N,)."""

    prompt: torch.Tensor
    completions: torch.Tensor
    ranking: torch.Tensor
    user: torch.Tensor

    def __len__(self) -> int:
        return self.prompt.numel()

    def rewards(self, table: torch.Tensor) -> torch.Tensor:
        """The shown responses' entries of a (P, R) table: (N, M)."""
        return table[self.prompt.unsqueeze(-1), self.completions]


@dataclass
class TabularRankingWorld:
    rewards: torch.Tensor  # (T, P, R) planted reward tables
    ref_logits: torch.Tensor  # (P, R) reference policy logits
    user_types: torch.Tensor  # (A,) hidden type of each annotator
    proportions: torch.Tensor  # (T,) the types' shares of annotators
    train: TabularRankings
    heldout: TabularRankings

    @property
    def num_types(self) -> int:
        return self.rewards.shape[0]

    def oracle_posterior(self, rankings: TabularRankings) -> torch.Tensor:
        """The Bayes posterior over each annotator's type (A, T) from the true rewards and proportions."""
        h = torch.stack([rankings.rewards(table) for table in self.rewards.double()], -1)  # (N, M, T)
        loglik = ranking_component_log_likelihood(
            h, rankings.ranking, 1.0, user_index=rankings.user, num_users=self.user_types.numel()
        )
        return torch.softmax(self.proportions.double().log() + loglik, -1)

    def oracle_scores(self, rankings: TabularRankings) -> torch.Tensor:
        """Each shown response's true reward under its annotator's true type: (N, M)."""
        types = self.user_types[rankings.user]
        return self.rewards[types.unsqueeze(-1), rankings.prompt.unsqueeze(-1), rankings.completions]


def _distinct_orders(num_types: int, num_responses: int, generator: torch.Generator) -> torch.Tensor:
    """Each type's place for each of R responses (T, R), any two types' orders apart by at least half of the
    R (R - 1) / 2 pairs (Kendall distance; redrawn until so): types that disagree, as the world's name says."""
    pairs = num_responses * (num_responses - 1) // 2
    while True:
        places = torch.rand(num_types, num_responses, generator=generator).argsort(-1).argsort(-1)
        above = torch.sign(places.unsqueeze(-1) - places.unsqueeze(-2))  # (T, R, R)
        discordant = (above.unsqueeze(0) != above.unsqueeze(1)).sum((-1, -2)) // 2  # (T, T) Kendall distances
        if bool((discordant + pairs * torch.eye(num_types, dtype=torch.long) >= pairs / 2).all()):
            return places.double()


def plackett_luce_rankings(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One ranking per row of ``scores`` (N, M) by Plackett–Luce: sort scores + Gumbel noise (the top-k trick)."""
    uniform = torch.rand(scores.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    return (scores.double() - torch.log(-torch.log(uniform))).argsort(-1, descending=True)


def make_tabular_ranking_world(
    num_types: int = 3,
    num_prompts: int = 1,
    num_responses: int = 4,
    completions_per_ranking: int = 4,
    annotators_per_type: int | list[int] = 40,
    rankings_per_annotator: int = 1,
    heldout_per_annotator: int = 2,
    reward_scale: float = 3.0,
    seed: int = 0,
) -> TabularRankingWorld:
    """Draw planted rewards, a reference policy, annotators (``annotators_per_type``: one count for every type,
    or one per type, e.g. [80, 20] for a majority and a minority) and their train / held-out rankings.

    The defaults are issue 20's ranking world: one prompt, each annotator ranks its four responses once, adjacent
    places 3 reward units apart (a neighbour swapped with probability sigmoid(-3) = 4.7%); the Bayes oracle
    identifies the types from that one ranking (ARI 0.95-1.0 on seeds 0-5). A tabular expert has no parameters
    shared across prompts, so with several prompts an annotator's type is identified only where its rankings
    are, and one ranking per annotator links no two prompts: give it several then."""
    if not 2 <= completions_per_ranking <= num_responses:
        raise ValueError(f"completions_per_ranking must be in [2, {num_responses}], got {completions_per_ranking}")
    counts = [annotators_per_type] * num_types if isinstance(annotators_per_type, int) else list(annotators_per_type)
    if len(counts) != num_types or min(counts) < 1:
        raise ValueError(f"annotators_per_type: one positive count, or {num_types} of them; got {annotators_per_type}")
    generator = torch.Generator().manual_seed(seed)
    orders = torch.stack([_distinct_orders(num_types, num_responses, generator) for _ in range(num_prompts)], 1)
    rewards = reward_scale * (orders - (num_responses - 1) / 2)  # (T, P, R): a type's place for y, centred
    ref_logits = 0.5 * torch.randn(num_prompts, num_responses, generator=generator)
    user_types = torch.repeat_interleave(torch.arange(num_types), torch.tensor(counts))
    proportions = torch.tensor(counts, dtype=torch.float64) / sum(counts)

    def draw(per_annotator: int) -> TabularRankings:
        user = torch.arange(user_types.numel()).repeat_interleave(per_annotator)
        prompt = torch.randint(num_prompts, (user.numel(),), generator=generator)
        shown = torch.rand(user.numel(), num_responses, generator=generator).argsort(-1)[:, :completions_per_ranking]
        scores = rewards[user_types[user].unsqueeze(-1), prompt.unsqueeze(-1), shown]
        return TabularRankings(prompt, shown, plackett_luce_rankings(scores, generator), user)

    train, heldout = draw(rankings_per_annotator), draw(heldout_per_annotator)
    return TabularRankingWorld(rewards, ref_logits, user_types, proportions, train, heldout)


def cut_into_pairs(rankings: TabularRankings, how: str = "all", seed: int = 0) -> TabularPairs:
    """Rankings as preference pairs, as datasets ship them: ``all`` the M (M - 1) / 2 pairs each ranking
    implies, or ``binarized`` one pair per ranking, the best against a uniformly drawn other (UltraFeedback's
    binarization). Each pair keeps its ranking's annotator."""
    (better, worse), _ = ranking_pairs(rankings.ranking)  # positions: (N, P) each
    if how == "binarized":
        generator = torch.Generator().manual_seed(seed)
        other = torch.randint(1, rankings.ranking.shape[-1], (len(rankings),), generator=generator)
        better, worse = rankings.ranking[:, :1], rankings.ranking.gather(-1, other.unsqueeze(-1))
    elif how != "all":
        raise ValueError(f"how={how!r}: expected 'all' or 'binarized'")
    per_row = better.shape[-1]
    chosen, rejected = rankings.completions.gather(-1, better), rankings.completions.gather(-1, worse)
    return TabularPairs(
        rankings.prompt.repeat_interleave(per_row),
        chosen.reshape(-1),
        rejected.reshape(-1),
        rankings.user.repeat_interleave(per_row),
    )
