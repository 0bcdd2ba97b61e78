"""Rankings identify annotator types that pairs cut from them do not (issue 20's ranking world; EM-DPO v2,
arXiv 2510.15716).

Three annotator types order one prompt's four responses in three different ways; each annotator ranks the four
once. A Plackett–Luce mixture of K = 3 tabular experts, trained by moedpo's ``VariationalEM`` with the library's
start from the data (annotators clustered by their rankings' Borda contrasts), is compared with the same
rankings cut into pairs, as datasets ship them:

- ``binarized``: the best response against a random other, one pair per ranking (UltraFeedback's binarization):
  one comparison per annotator, which cannot identify a mixture;
- ``all pairs, pair scope``: every pair a ranking implies, each with its own latent type in training (as when
  pairs are shuffled into a pairwise dataset); its experts still specialise, and its ARI is read out with the
  annotator link put back (each annotator's posterior from its pairs under the fitted experts), which pair
  scope itself does not have;
- ``all pairs, user scope``: every implied pair with the annotator link kept. It identifies the types too (the
  pairs share the annotator's latent), with a misspecified likelihood: six comparisons from three choices, so its
  posteriors are overconfident.

One DPO policy (K = 1 on all pairs) and the Bayes oracle (the true types' rewards) are shown beside them. Every
fit uses the same settings. Run: ``python examples/ranking_world.py [--shrink] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from moedpo.data.tabular_rankings import TabularRankings, cut_into_pairs, make_tabular_ranking_world
from moedpo.eval import adjusted_rand_index, ranking_agreement
from moedpo.experts import TabularExperts
from moedpo.inference import VariationalEM
from moedpo.inference.start import clustered_start, ranking_contrasts
from moedpo.losses import ranking_responsibilities, user_responsibilities
from moedpo.models import FixedGate, mixture_bt_model, user_bt_model, user_pl_model

STEPS, LEARNING_RATE, INIT_STD, START_STEPS, GATE_MOMENTUM = 200, 0.05, 0.05, 30, 0.9  # the library's defaults
BETA = 1.0


def contrasts(data, num_prompts: int, num_responses: int) -> torch.Tensor:
    """Per ranking or pair, its Borda contrast over one-hot (prompt, response) features (N, P * R)."""
    if isinstance(data, TabularRankings):
        shown, ranking = data.prompt.unsqueeze(-1) * num_responses + data.completions, data.ranking
    else:
        shown = data.prompt.unsqueeze(-1) * num_responses + torch.stack([data.chosen, data.rejected], -1)
        ranking = torch.tensor([0, 1]).expand(len(data), 2)
    features = torch.nn.functional.one_hot(shown, num_prompts * num_responses).double()
    return ranking_contrasts(features, ranking)


def fit(world, data, num_experts: int, model, scope: str = "user", seed: int = 0):
    """Train K tabular experts and a Mix-DPO gate on ``data``; returns (experts, gate)."""
    torch.manual_seed(seed)
    experts = TabularExperts(world.ref_logits, num_experts, init_std=INIT_STD, seed=seed)
    gate = FixedGate(num_experts, learnable=False)
    num_users = world.user_types.numel()
    if scope == "user":
        keys, owner = [("user", u) for u in range(num_users)], data.user
        route = lambda batch, _: (gate(num_users), {"user_index": batch.user})  # noqa: E731
    else:
        keys, owner = [("pair", i) for i in range(len(data))], torch.arange(len(data))
        route = lambda batch, _: gate(len(batch))  # noqa: E731
    start = clustered_start(contrasts(data, *world.ref_logits.shape), keys, owner, num_experts, START_STEPS, seed)
    optimizer = torch.optim.Adam(experts.parameters(), lr=LEARNING_RATE)
    loop = VariationalEM(
        experts, route, optimizer, beta=BETA, model=model, closed_form_gate=gate, gate_momentum=GATE_MOMENTUM,
        start=start if num_experts > 1 else None,
    )  # fmt: skip
    for _ in range(STEPS):
        loop.step(data)
    return experts, gate


@torch.no_grad()
def annotator_types(world, experts, gate, data) -> torch.Tensor:
    """Each annotator's posterior over experts (A, K) from its training data, under the fitted experts."""
    num_users = world.user_types.numel()
    if isinstance(data, TabularRankings):
        h = experts.completion_log_ratios(data.prompt, data.completions)
        return ranking_responsibilities(h, gate(num_users), BETA, data.ranking, user_index=data.user)
    return user_responsibilities(experts.margins(data), gate(num_users), BETA, data.user)


@torch.no_grad()
def heldout(world, experts, q: torch.Tensor) -> dict:
    """Held-out rankings, each predicted by its annotator's most probable expert: top-1 and Kendall's tau."""
    h = experts.completion_log_ratios(world.heldout.prompt, world.heldout.completions)  # (N, M, K)
    pick = q.argmax(-1)[world.heldout.user]
    scores = h.gather(-1, pick.view(-1, 1, 1).expand(-1, h.shape[1], 1)).squeeze(-1)
    return ranking_agreement(scores, world.heldout.ranking)


def run_world(seed: int, annotators: int) -> dict:
    world = make_tabular_ranking_world(annotators_per_type=annotators, seed=seed)
    oracle_q = world.oracle_posterior(world.train)
    rows = {
        "Bayes oracle": (
            adjusted_rand_index(world.user_types, oracle_q.argmax(-1)),
            ranking_agreement(world.oracle_scores(world.heldout), world.heldout.ranking),
        )
    }
    pairs = cut_into_pairs(world.train)
    variants = {
        "Plackett-Luce mixture": (world.train, user_pl_model, "user", 3),
        "binarized pairs": (cut_into_pairs(world.train, "binarized", seed=seed), user_bt_model, "user", 3),
        "all pairs, pair scope": (pairs, mixture_bt_model, "pair", 3),
        "all pairs, user scope": (pairs, user_bt_model, "user", 3),
        "one DPO policy": (pairs, user_bt_model, "user", 1),
    }
    for name, (data, model, scope, k) in variants.items():
        experts, gate = fit(world, data, k, model, scope, seed)
        q = annotator_types(world, experts, gate, data)
        ari = adjusted_rand_index(world.user_types, q.argmax(-1)) if k > 1 else float("nan")
        rows[name] = (ari, heldout(world, experts, q))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shrink", action="store_true", help="one seed, fewer annotators (a smoke run)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    seeds, annotators = (1, 30) if args.shrink else (args.seeds, 40)
    print(f"ranking world: 3 types x {annotators} annotators, one ranking of 4 responses each; seeds 0..{seeds - 1}")
    print(f"{'seed':>4}  {'method':<24} {'ARI':>5} {'top-1':>6} {'tau':>6}")
    failures, binarized = [], []
    for seed in range(seeds):
        rows = run_world(seed, annotators)
        for name, (ari, agreement) in rows.items():
            print(f"{seed:>4}  {name:<24} {ari:>5.2f} {agreement['top1']:>6.3f} {agreement['kendall_tau']:>6.3f}")
        oracle_ari = rows["Bayes oracle"][0]
        pl_ari, pl = rows["Plackett-Luce mixture"]
        dpo = rows["one DPO policy"][1]
        if oracle_ari >= 0.95 and pl_ari < 0.9:
            failures.append(f"seed {seed}: Plackett-Luce ARI {pl_ari:.2f} < 0.9 (oracle {oracle_ari:.2f})")
        binarized.append(rows["binarized pairs"][0])
        if not pl["top1"] >= dpo["top1"] + 0.1:
            failures.append(f"seed {seed}: top-1 {pl['top1']:.3f} not 0.1 above one DPO policy's {dpo['top1']:.3f}")
        if math.isnan(pl_ari):
            failures.append(f"seed {seed}: no ARI")
    mean_binarized = sum(binarized) / len(binarized)
    print(f"binarized pairs: mean ARI {mean_binarized:.2f} over {len(binarized)} seeds (max {max(binarized):.2f})")
    if not mean_binarized < 0.5:
        failures.append(f"binarized pairs: mean ARI {mean_binarized:.2f}, expected < 0.5")
    for failure in failures:
        print(f"[FAIL] {failure}")
    print("[ok] rankings identify the types; pairs cut from them do not" if not failures else "")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
