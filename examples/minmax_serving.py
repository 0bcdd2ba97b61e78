"""One policy for a population of unknown types: the gate's average serves the majority, min-max regret serves
everyone (issue 20's majority/minority world; EM-DPO's min-max regret aggregation, arXiv 2405.15065).

Two annotator types, 80% and 20% of the annotators, label pairs of a tabular world. K = 2 tabular experts and a
Mix-DPO gate are fitted by moedpo's ``VariationalEM`` (user scope); one DPO policy (K = 1) beside them. At serving
time the type is unknown: serving expert k with probability w_k gives each type the w-weighted mean of the
experts' rewards. The gate's average takes w = the learned shares (0.8 / 0.2); min-max takes the w that minimises
the largest regret on the experts' *estimated* rewards, each expert's own implicit reward beta * log(pi_k / pi_ref)
standing for its type (no true reward is used to choose w). Each type's true reward is then read from the
world's tables; the oracle row solves the same program on the true rewards. Run:
``python examples/minmax_serving.py [--shrink] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from moedpo.data import make_tabular_world
from moedpo.eval import adjusted_rand_index
from moedpo.eval.regret import minmax_regret_weights
from moedpo.experts import TabularExperts
from moedpo.inference import VariationalEM
from moedpo.losses import user_responsibilities
from moedpo.models import FixedGate, user_bt_model

STEPS, LEARNING_RATE, INIT_STD, GATE_MOMENTUM, BETA = 200, 0.05, 0.5, 0.9, 1.0


def fit(world, num_experts: int, seed: int):
    """K tabular experts and the gate's shares (K,), and the annotators' posteriors (A, K)."""
    torch.manual_seed(seed)
    experts = TabularExperts(world.ref_logits, num_experts, init_std=INIT_STD, seed=seed)
    gate = FixedGate(num_experts, learnable=False)
    users = world.user_types.numel()
    loop = VariationalEM(
        experts, lambda batch, _: (gate(users), {"user_index": batch.user}),
        torch.optim.Adam(experts.parameters(), lr=LEARNING_RATE), beta=BETA, model=user_bt_model,
        closed_form_gate=gate, gate_momentum=GATE_MOMENTUM,
    )  # fmt: skip
    for _ in range(STEPS):
        loop.step(world.train)
    with torch.no_grad():
        q = user_responsibilities(experts.margins(world.train), gate(users), BETA, world.train.user)
    return experts, torch.softmax(gate.logits.detach().reshape(-1), -1).double(), q


@torch.no_grad()
def utilities(experts, rewards: torch.Tensor) -> torch.Tensor:
    """(T, K): type t's reward of expert k's policy, sum_y pi_k(y|x) r_t(x, y), averaged over prompts."""
    policies = experts.policies().double()  # (K, P, R)
    return torch.einsum("kpr,tpr->tk", policies, rewards.double()) / policies.shape[1]


def run_world(seed: int, annotators: list[int], pairs: int) -> dict:
    world = make_tabular_world(num_types=2, annotators_per_type=annotators, pairs_per_annotator=pairs, seed=seed)
    experts, shares, q = fit(world, 2, seed)
    dpo, _, _ = fit(world, 1, seed)
    estimated = utilities(experts, BETA * experts.log_ratios().detach())  # "type" k: expert k's implicit reward
    true = utilities(experts, world.rewards)  # (true types, experts)
    weights = {"gate's average": shares, "min-max regret": minmax_regret_weights(estimated),
               "min-max (oracle: true rewards)": minmax_regret_weights(true)}  # fmt: skip
    rows = {name: true @ w for name, w in weights.items()}
    rows["one DPO policy"] = utilities(dpo, world.rewards)[:, 0]
    best = true.max(-1).values
    return {
        "ari": adjusted_rand_index(world.user_types, q.argmax(-1)),
        "weights": weights,
        "rewards": rows,
        "regrets": {name: best - r for name, r in rows.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shrink", action="store_true", help="three seeds (a smoke run: no 2-SE check)")
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args(argv)
    seeds, annotators, pairs = (3 if args.shrink else args.seeds), [32, 8], 40
    print(
        f"majority/minority world: {annotators[0]} + {annotators[1]} annotators x {pairs} pairs; seeds 0..{seeds - 1}"
    )
    print(f"{'seed':>4}  {'policy':<31} {'w':>12} {'majority':>9} {'minority':>9} {'worst regret':>12}")
    results = [run_world(seed, annotators, pairs) for seed in range(seeds)]
    for seed, result in enumerate(results):
        for name, reward in result["rewards"].items():
            w = result["weights"].get(name)
            shown = "-" if w is None else "/".join(f"{x:.2f}" for x in w.tolist())
            worst = float(result["regrets"][name].max())
            print(f"{seed:>4}  {name:<31} {shown:>12} {float(reward[0]):>9.3f} {float(reward[1]):>9.3f} {worst:>12.3f}")
    gain = [float(r["rewards"]["min-max regret"][1] - r["rewards"]["gate's average"][1]) for r in results]
    drop = [float(r["rewards"]["gate's average"][0] - r["rewards"]["min-max regret"][0]) for r in results]
    se = statistics.stdev(gain) / len(gain) ** 0.5
    print(
        f"minority's gain from min-max over the gate's average: {statistics.mean(gain):.3f} ± {se:.3f} (SE over "
        f"seeds); majority's drop: {statistics.mean(drop):.3f}; ARI {[round(r['ari'], 2) for r in results]}"
    )
    failures = []
    if not statistics.mean(gain) > (0.0 if args.shrink else 2 * se):
        failures.append(f"minority gain {statistics.mean(gain):.3f} not above {'0' if args.shrink else '2 SE'}")
    if not statistics.mean(drop) < statistics.mean(gain):
        failures.append(f"majority drop {statistics.mean(drop):.3f} not below the minority's gain")
    for r in results:  # the program's own promise, on the estimated rewards it was given, holds on the true ones
        if float(r["regrets"]["min-max regret"].max()) > float(r["regrets"]["gate's average"].max()) + 1e-9:
            failures.append("min-max left a type further behind than the gate's average")
    for failure in failures:
        print(f"[FAIL] {failure}")
    print("[ok] min-max regret serving lifts the minority" if not failures else "")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
