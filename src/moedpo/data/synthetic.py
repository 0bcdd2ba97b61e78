"""Built-in synthetic worlds with planted annotator types (ground truth for recovery tests).

Tabular world: P prompts with R candidate responses each. Each of T annotator types has a reward table
r_t(x, y); annotators have known ids and hidden types and label pairs by Bradley–Terry:
P(a > b | x, type t) = sigmoid(r_t(x, a) - r_t(x, b)). Every annotator labels many pairs, so the types are
identifiable with the user-scope latent (SPEC §1 "Identifiability").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TabularPairs:
    """Preference pairs as index tensors (N,): prompt, chosen and rejected response, annotator id."""

    prompt: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    user: torch.Tensor

    def __len__(self) -> int:
        return self.prompt.numel()


@dataclass
class TabularWorld:
    rewards: torch.Tensor  # (T, P, R) planted reward tables
    ref_logits: torch.Tensor  # (P, R) reference policy logits
    user_types: torch.Tensor  # (A,) hidden type of each annotator
    train: TabularPairs
    heldout: TabularPairs

    @property
    def num_types(self) -> int:
        return self.rewards.shape[0]

    def oracle_accuracy(self, pairs: TabularPairs) -> float:
        """Bayes oracle: knows each annotator's type and reward, predicts the higher-reward response."""
        types = self.user_types[pairs.user]
        better = self.rewards[types, pairs.prompt, pairs.chosen] > self.rewards[types, pairs.prompt, pairs.rejected]
        return float(better.double().mean())


def _label_pairs(rewards, types, num_prompts, num_responses, generator) -> TabularPairs:
    """One random pair per entry of ``types`` (N,), labelled by that type's Bradley–Terry model."""
    n = types.numel()
    prompt = torch.randint(num_prompts, (n,), generator=generator)
    first = torch.randint(num_responses, (n,), generator=generator)
    second = (first + torch.randint(1, num_responses, (n,), generator=generator)) % num_responses  # != first
    p_first = torch.sigmoid(rewards[types, prompt, first] - rewards[types, prompt, second])
    first_wins = torch.rand(n, generator=generator) < p_first
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    return TabularPairs(prompt, chosen, rejected, torch.zeros_like(prompt))


def make_tabular_world(
    num_types: int = 3,
    num_prompts: int = 4,
    num_responses: int = 5,
    annotators_per_type: int | list[int] = 20,
    pairs_per_annotator: int = 40,
    heldout_per_annotator: int = 20,
    reward_scale: float = 1.5,
    seed: int = 0,
) -> TabularWorld:
    """Draw planted rewards, a reference policy, annotators and their labelled train / held-out pairs."""
    if pairs_per_annotator < 2:
        raise ValueError("each annotator needs several pairs: one label per annotator cannot identify types")
    generator = torch.Generator().manual_seed(seed)
    rewards = reward_scale * torch.randn(num_types, num_prompts, num_responses, generator=generator)
    ref_logits = 0.5 * torch.randn(num_prompts, num_responses, generator=generator)
    user_types = torch.arange(num_types).repeat_interleave(torch.as_tensor(annotators_per_type))  # int or per type

    def draw(per_annotator: int) -> TabularPairs:
        types = user_types.repeat_interleave(per_annotator)
        pairs = _label_pairs(rewards, types, num_prompts, num_responses, generator)
        pairs.user = torch.arange(user_types.numel()).repeat_interleave(per_annotator)
        return pairs

    return TabularWorld(rewards, ref_logits, user_types, draw(pairs_per_annotator), draw(heldout_per_annotator))
