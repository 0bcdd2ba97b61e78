"""Rankings through the EM loop: the E-step's responsibilities, the M-step's gradient, metrics, and the ranking
world's helpers (issue 20 item 2: Plackett–Luce trained by the same ``VariationalEM``)."""

import itertools
import math

import pytest
import torch

from moedpo.data import make_tabular_world
from moedpo.data.synthetic import TabularPairs
from moedpo.data.tabular_rankings import TabularRankings, cut_into_pairs, make_tabular_ranking_world
from moedpo.eval import ranking_agreement
from moedpo.eval.evaluate import _ranking_metrics
from moedpo.experts import TabularExperts
from moedpo.inference import VariationalEM, e_step
from moedpo.inference.start import ranking_contrasts
from moedpo.losses import ranking_mixture_nll, ranking_responsibilities
from moedpo.models import FixedGate, mixture_pl_model, user_bt_model, user_pl_model


def random_rankings(batch, completions, generator, padded=True):
    """Rankings (B, M) of unequal lengths (2..M real completions, a prefix) and their mask (B, M)."""
    lengths = torch.randint(2, completions + 1, (batch,), generator=generator) if padded else None
    mask = None if lengths is None else torch.arange(completions) < lengths.unsqueeze(-1)
    ranking = torch.empty(batch, completions, dtype=torch.long)
    for i in range(batch):
        n = completions if lengths is None else int(lengths[i])
        ranking[i, :n] = torch.randperm(n, generator=generator)
        ranking[i, n:] = torch.arange(n, completions)
    return ranking, mask


class FixedMargins(torch.nn.Module):
    """Experts whose completion log-ratios h (B, M, K) are parameters, with the batch's rankings."""

    def __init__(self, h, ranking, mask):
        super().__init__()
        self.h, self.ranking, self.mask = torch.nn.Parameter(h.clone()), ranking, mask
        self.num_experts = h.shape[-1]

    def margins(self, _batch):
        return {"h": self.h, "ranking": self.ranking, "ranking_mask": self.mask}


@pytest.mark.parametrize("scope", ["ranking", "user"])
def test_estep_responsibilities_of_rankings_equal_the_closed_form(scope):
    """e_step's per-row responsibilities and the gate latent's posterior, by differentiating the enumerated
    evidence, equal the closed form (float64) for padded rankings of unequal length."""
    generator = torch.Generator().manual_seed(4)
    batch, completions, experts, users = 9, 4, 3, 4
    h = torch.randn(batch, completions, experts, generator=generator, dtype=torch.float64)
    ranking, mask = random_rankings(batch, completions, generator)
    ranked = torch.minimum(torch.tensor([1, 3, 2, 1, 3, 2, 3, 3, 1]), mask.sum(-1) - 1)  # top-k rankings too
    beta = 0.7
    if scope == "user":
        user_index = torch.tensor([0, 1, 1, 2, 2, 2, 3, 0, 1])
        gate_logits = torch.randn(users, experts, generator=generator, dtype=torch.float64)
        model, kwargs = user_pl_model, {"user_index": user_index, "mask": mask, "ranked": ranked}
        expected = ranking_responsibilities(h, gate_logits, beta, ranking, mask, user_index, ranked=ranked)  # (U, K)
        expected_rows = expected[user_index]
    else:
        user_index = None
        gate_logits = torch.randn(batch, experts, generator=generator, dtype=torch.float64)
        model, kwargs = mixture_pl_model, {"mask": mask, "ranked": ranked}
        expected = expected_rows = ranking_responsibilities(h, gate_logits, beta, ranking, mask, ranked=ranked)
    e = e_step(model, (h, gate_logits, beta, ranking), kwargs, beta, 0.0, model.max_plate_nesting)
    torch.testing.assert_close(e.pair_q, expected_rows, atol=1e-9, rtol=0)
    torch.testing.assert_close(e.gate_q.reshape(expected.shape), expected, atol=1e-9, rtol=0)
    evidence = -ranking_mixture_nll(h, gate_logits, beta, ranking, mask, user_index, ranked=ranked).sum()
    torch.testing.assert_close(e.post.log_evidence, evidence, atol=1e-9, rtol=0)


def test_em_step_on_rankings_takes_the_marginal_gradient():
    """One EM step on rankings: the loss is the mean mixture NLL and the experts' gradient the gradient of the
    marginal NLL / B (Fisher's identity), checked against autograd on the closed form."""
    generator = torch.Generator().manual_seed(7)
    batch, completions, experts = 6, 5, 2
    h = torch.randn(batch, completions, experts, generator=generator)
    ranking, mask = random_rankings(batch, completions, generator)
    gate = torch.randn(batch, experts, generator=generator)
    bank = FixedMargins(h, ranking, mask)
    loop = VariationalEM(
        bank, lambda _b, _o: gate, torch.optim.SGD(bank.parameters(), lr=1.0), beta=0.5, model=mixture_pl_model
    )
    loss = loop.step(list(range(batch)))
    leaf = h.clone().requires_grad_(True)
    nll = ranking_mixture_nll(leaf, gate, 0.5, ranking, mask).sum() / batch
    nll.backward()
    assert loss == pytest.approx(float(nll.detach()), abs=1e-6)
    torch.testing.assert_close(h - bank.h.detach(), leaf.grad, atol=1e-6, rtol=0)  # SGD, lr 1: the step is -grad


def test_two_completion_rankings_train_exactly_like_pairs():
    """A ranking of two completions is a pair: the Plackett–Luce user model on [chosen, rejected] rankings and
    the BT user model on the pairs take the same steps (5 EM steps, Adam) and log the same metrics."""
    world = make_tabular_world(num_types=2, annotators_per_type=4, pairs_per_annotator=10, seed=1)
    pairs = world.train
    rankings = TabularRankings(
        pairs.prompt, torch.stack([pairs.chosen, pairs.rejected], -1), torch.tensor([0, 1]).repeat(len(pairs), 1),
        pairs.user,
    )  # fmt: skip
    users = world.user_types.numel()

    def train(data, model):
        experts = TabularExperts(world.ref_logits, 2, init_std=0.5, seed=3)
        gate = FixedGate(2, learnable=False)
        loop = VariationalEM(
            experts, lambda b, _: (gate(users), {"user_index": b.user}), torch.optim.Adam(experts.parameters(), lr=0.1),
            beta=0.8, model=model, closed_form_gate=gate, gate_momentum=0.5,
        )  # fmt: skip
        for _ in range(5):
            loop.step(data)
        return experts.logits.detach(), gate.logits.detach(), loop.metrics

    pl_logits, pl_gate, pl_metrics = train(rankings, user_pl_model)
    bt_logits, bt_gate, bt_metrics = train(pairs, user_bt_model)
    torch.testing.assert_close(pl_logits, bt_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(pl_gate, bt_gate, atol=1e-5, rtol=0)
    assert set(pl_metrics) == set(bt_metrics)
    for key, value in bt_metrics.items():
        assert pl_metrics[key] == pytest.approx(value, abs=1e-5), key


def test_ranking_metrics_count_every_implied_pair():
    """rewards/* on rankings, by hand. Row 1: ranking [2, 0, 1] implies 2 > 0, 2 > 1, 0 > 1; expert 0's log-ratios
    [1, 0, 2] order all three right (margins 1, 2, 1: mean 4/3), expert 1's [0, 1, -1] none (-1, -2, -1: -4/3).
    Row 2: [1, 0] of two real completions (the third is padding) implies 1 > 0 only; expert 0's [0, 3, 9] orders
    it right (margin 3), expert 1's [1, 0, -9] wrong (-1); the padded completion (which would flip both) counts nothing.
    Means over the two rows: expert 0 accuracy 1, margin (4/3 + 3) / 2; expert 1 accuracy 0, (-4/3 - 1) / 2."""
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]], [[0.0, 1.0], [3.0, 0.0], [9.0, -9.0]]])  # (2, 3, 2)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    bank = FixedMargins(h, torch.tensor([[2, 0, 1], [1, 0, 2]]), mask)
    gate = torch.tensor([[0.0, -50.0], [0.0, -50.0]])  # all posterior mass on expert 0
    loop = VariationalEM(bank, lambda _b, _o: gate, torch.optim.SGD(bank.parameters(), lr=0.0), beta=0.5,
                         model=mixture_pl_model)  # fmt: skip
    loop.step([0, 1])
    metrics = loop.metrics
    assert metrics["expert_0/rewards/accuracies"] == pytest.approx(1.0)
    assert metrics["expert_1/rewards/accuracies"] == pytest.approx(0.0)
    assert metrics["expert_0/rewards/margins"] == pytest.approx(0.5 * (4 / 3 + 3) / 2)
    assert metrics["expert_1/rewards/margins"] == pytest.approx(0.5 * (-4 / 3 - 1) / 2)
    assert metrics["rewards/accuracies"] == pytest.approx(1.0, abs=1e-6)  # the posterior's expert orders all


def test_rankings_refuse_what_only_pairs_have():
    bank = FixedMargins(torch.zeros(2, 3, 2), torch.tensor([[0, 1, 2], [2, 1, 0]]), None)

    def gate(_b, _o):
        return torch.zeros(2, 2)

    optimizer = torch.optim.SGD(bank.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="pairwise loss"):
        VariationalEM(bank, gate, optimizer, beta=1.0, model=mixture_pl_model, loss_type="ipo").step([0, 1])
    guide = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="without a guide"):
        VariationalEM(bank, gate, optimizer, beta=1.0, model=mixture_pl_model, guide=guide).step([0, 1])
    bank.reference = lambda _batch: {"ranking": bank.ranking}
    with pytest.raises(ValueError, match="routed"):
        VariationalEM(bank, gate, optimizer, beta=1.0, model=mixture_pl_model, schedule="routed", guide=guide).step(
            [0, 1]
        )


def test_ranking_contrasts_are_centred_borda_counts():
    """Places 0..n-1 weigh n-1-2j: [2, 0, 1] of three one-hot completions gives 2: +2, 0: 0, 1: -2; a padded
    third place counts nothing, and two completions give chosen minus rejected. With only the top place known
    (ranked 1), 2 beats both others (+2) and each of them loses once (-1)."""
    features = torch.eye(3).unsqueeze(0)
    torch.testing.assert_close(ranking_contrasts(features, torch.tensor([[2, 0, 1]])), torch.tensor([[0.0, -2, 2]]))
    padded = ranking_contrasts(features, torch.tensor([[2, 0, 0]]), torch.tensor([[True, True, False]]))
    torch.testing.assert_close(padded, torch.tensor([[-1.0, 0, 1]]))
    top = ranking_contrasts(features, torch.tensor([[2, 0, 1]]), ranked=torch.tensor([1]))
    torch.testing.assert_close(top, torch.tensor([[-1.0, -1, 2]]))


def test_ranking_agreement_by_hand():
    """top-1: is the observed best the unique highest score; tau-a: (concordant - discordant) / pairs."""
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 2.0, 0.0]])
    ranking = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    out = ranking_agreement(scores, ranking)
    assert out["top1"] == pytest.approx(1 / 3)  # row 3's best ties: not a top-1 hit
    assert out["kendall_tau"] == pytest.approx((1 - 1 + 2 / 3) / 3)  # row 3: +1 +1 and a tie
    top = ranking_agreement(scores, ranking, ranked=torch.tensor([1, 1, 1]))  # only 0 > 1 and 0 > 2 are known
    assert top["kendall_tau"] == pytest.approx((1 - 1 + 1 / 2) / 3)  # row 3: a tie and +1


def test_ranking_world_types_disagree_and_pairs_cut_as_stated():
    world = make_tabular_ranking_world(num_prompts=2, num_responses=5, annotators_per_type=[5, 3, 2], seed=2)
    assert torch.bincount(world.user_types).tolist() == [5, 3, 2]
    for prompt in range(2):  # any two types apart by at least half of the 10 pairs
        places = world.rewards[:, prompt]
        for a, b in itertools.combinations(range(3), 2):
            discordant = sum(
                bool((places[a, i] - places[a, j]) * (places[b, i] - places[b, j]) < 0)
                for i, j in itertools.combinations(range(5), 2)
            )
            assert discordant >= 5
    rows = world.train
    assert (rows.ranking.sort(-1).values == torch.arange(4)).all()  # permutations of the shown four
    every = cut_into_pairs(rows)
    assert len(every) == 6 * len(rows) and isinstance(every, TabularPairs)
    first = rows.completions[0, rows.ranking[0]]  # the first ranking's responses, best first
    expected = [(int(first[i]), int(first[j])) for i, j in itertools.combinations(range(4), 2)]
    assert list(zip(every.chosen[:6].tolist(), every.rejected[:6].tolist())) == expected
    binarized = cut_into_pairs(rows, "binarized")
    assert len(binarized) == len(rows)
    assert (binarized.chosen == rows.completions.gather(-1, rows.ranking[:, :1]).squeeze(-1)).all()
    assert (binarized.chosen != binarized.rejected).all() and (binarized.user == rows.user).all()
    places = (rows.completions.gather(-1, rows.ranking) == binarized.rejected.unsqueeze(-1)).float().argmax(-1)
    assert set(places.tolist()) == {1, 2, 3}  # the other is drawn from every place below the best


def test_held_out_ranking_metrics_by_hand():
    """Two rankings of three, K = 2, beta 1: eval/mixture_nll is -mean log sum_k w_k P(ranking | k) (the float64
    definition loop); accuracy, top-1 and tau read the mixture's pairwise probabilities and reward."""
    h = torch.tensor([[[2.0, -1.0], [0.0, 0.0], [-1.0, 1.0]], [[0.5, 0.0], [1.5, 0.0], [0.0, 3.0]]])  # (2, 3, 2)
    ranking, mask = torch.tensor([[0, 1, 2], [2, 1, 0]]), torch.ones(2, 3, dtype=torch.bool)
    ranked = torch.tensor([2, 1])  # the second: only "2 is best" observed
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5]], dtype=torch.float64)
    test = {"h": h, "ranking": ranking, "ranking_mask": mask, "ranked": ranked}
    metrics, correct, log_prob, right = _ranking_metrics(test, weights, 1.0)

    def by_hand(scores, order, k):  # log P of the first k choices
        left, total = list(order), 0.0
        for item in order[:k]:
            total += scores[item] - math.log(sum(math.exp(scores[i]) for i in left))
            left.remove(item)
        return total

    expected = [
        math.log(sum(float(weights[i, k]) * math.exp(by_hand(h[i, :, k].tolist(), ranking[i].tolist(), int(ranked[i])))
                     for k in range(2)))
        for i in range(2)
    ]  # fmt: skip
    assert log_prob.tolist() == pytest.approx(expected, abs=1e-6)
    assert metrics["eval/mixture_nll"] == pytest.approx(-sum(expected) / 2, abs=1e-6)
    assert metrics["eval/chance_nll"] == pytest.approx((math.log(6) + math.log(3)) / 2)
    # expert 0 orders ranking 1's pairs 0>1, 0>2, 1>2 all right; ranking 2's known pairs 2>1, 2>0: neither
    torch.testing.assert_close(correct[:, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(correct[:, 1], torch.tensor([0.0, 1.0]))  # expert 1 [-1, 0, 1]: none; [0, 0, 3]: both
    assert 0 <= float(right.min()) and float(right.max()) <= 1
