"""The paper's multi-user experiment at laptop scale: users of four hidden types, new users from a few pairs.

    python examples/users_world.py [--out runs/users_world] [--steps 450] [--seed 0] [--shrink]

1. Generates the users world (:mod:`moedpo.data.users_world`): 40 training annotators (40 pairs each, a quarter
   held out), and 20 new annotators with 16 pairs to personalise from and 16 to test on.
2. Trains a mixture (K=4 LoRA experts, one latent type per annotator, a user gate on ids and user_features, the
   amortized guide trained alongside, label smoothing 0.1) and a single DPO policy (K=1) on the same rows, with
   ``moedpo.train`` (about 100 s each on 2 CPU cores).
3. Writes ``OUT/report/users.md`` (+ ``users.json``, ``user_map.png``, ``new_users.png``): win rates of the
   mixture over DPO and over the reference, judged by each user's true reward (95% intervals); the user map;
   new-user accuracy against k = 1, 2, 4, 8, 16 pairs for the exact posterior, the guide and the gate prior.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from moedpo import train
from moedpo.config import load_config
from moedpo.data.users_world import TYPE_NAMES, make_users_world, true_reward
from moedpo.eval.users import new_user_accuracy, user_map, win_rates
from moedpo.session import RunSession

KS = (1, 2, 4, 8, 16)


def configure(out: Path, data: Path, num_experts: int, steps: int, seed: int):
    return load_config(
        overrides=[
            f"data.source={data}",
            f"experts.num_experts={num_experts}",
            "em.scope=user",
            "gate.type=user",
            "gate.user_features=true",
            f"em.guide={'amortized' if num_experts > 1 else ''}",  # one policy: nothing to route
            "em.label_smoothing=0.1",  # labels are noisy: without it a few pairs overrule a new user's prior
            "train.users_per_batch=4",
            f"train.max_steps={steps}",
            "train.eval_steps=0",
            f"train.seed={seed}",
            f"train.output_dir={out}",
            "train.overwrite=true",
        ]
    )


def plots(report: Path, mapping: dict, curves: dict, seen_accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    points = mapping["points"]
    for kind in TYPE_NAMES:
        rows = [i for i, g in enumerate(mapping["groups"]) if g == kind]
        ax.scatter(points[rows, 0], points[rows, 1], label=kind, s=40)
    ax.set(title="users: mean reward difference under each expert (PCA)", xlabel="PC 1", ylabel="PC 2")
    ax.legend(title="true type")
    fig.tight_layout()
    fig.savefig(report / "user_map.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method, marker in (("exact", "o"), ("amortized", "s"), ("prior", "^")):
        if curves.get(method):
            ax.plot(list(curves[method]), list(curves[method].values()), marker=marker, label=method)
    ax.axhline(seen_accuracy, color="grey", linestyle="--", label="users seen in training")
    ax.set(xscale="log", xticks=KS, xticklabels=[str(k) for k in KS], ylim=(0.4, 1.0))
    ax.set(title="new users: held-out accuracy", xlabel="labelled pairs k", ylabel="accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "new_users.png", dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    w = results["win_rates"]
    lines = ["# Users world: four hidden types", ""]
    if results.get("shrink"):
        lines += ["**Smoke run (`--shrink`): a tiny world and 30 steps; the numbers below mean nothing.**", ""]
    lines += ["## Win rate of the mixture (routed expert per user)", ""]
    lines += ["| against | win rate | 95% interval | comparisons |", "|---|---|---|---|"]
    for name in ("dpo", "reference"):
        r = w[f"win_rate_vs_{name}"]
        lines.append(f"| {name} | {r['rate']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] | {r['n']} |")
    lines += ["", "Mean true reward: " + ", ".join(f"{k} {v:.3f}" for k, v in w["mean_reward"].items()), ""]
    lines += ["## New users from k labelled pairs (held-out accuracy)", ""]
    lines += ["| k | " + " | ".join(results["new_users"]) + " |", "|---" * (1 + len(results["new_users"])) + "|"]
    for k in KS:
        cells = [f"{results['new_users'][m].get(k, float('nan')):.3f}" for m in results["new_users"]]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", f"Users seen in training: {results['seen_accuracy']:.3f} (ARI {results['ari']:.2f}); DPO (K=1): "]
    lines[-1] += f"{results['dpo_accuracy']:.3f}."
    lines += ["", "![user map](user_map.png) ![new users](new_users.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/users_world")
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shrink", action="store_true", help="a small world and 30 steps: checks the pipeline only")
    args = parser.parse_args(argv)
    out, start = Path(args.out), time.time()
    size = dict(users_per_type=3, pairs_per_user=12, new_users_per_type=1) if args.shrink else {}
    if args.shrink:
        args.steps = 30
    world = make_users_world(seed=args.seed, **size)
    data = out / "data" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in world["train"]))
    mixture_dir = train(configure(out / "mixture", data, 4, args.steps, args.seed))
    dpo_dir = train(configure(out / "dpo", data, 1, args.steps, args.seed))
    mixture, single = RunSession(mixture_dir), RunSession(dpo_dir)
    seen = json.loads((mixture_dir / "report" / "eval.json").read_text())["metrics"]
    dpo = json.loads((dpo_dir / "report" / "eval.json").read_text())["metrics"]
    rng = random.Random(args.seed)
    users = {}
    for row in world["train"]:
        users.setdefault(row["user_id"], (row["group"], []))[1].append(row["prompt"])
    for _, prompts in users.values():
        rng.shuffle(prompts)
    results = {
        "win_rates": win_rates(mixture, single, users, true_reward, 2 if args.shrink else 8, seed=args.seed),
        "new_users": new_user_accuracy(mixture, world["new"], KS),
        "seen_accuracy": seen["eval/rewards/accuracies"],
        "ari": seen.get("eval/ari", float("nan")),
        "dpo_accuracy": dpo["eval/rewards/accuracies"],
        "shrink": args.shrink,
    }
    mapping = user_map(mixture)
    report = out / "report"
    report.mkdir(exist_ok=True)
    plots(report, mapping, results["new_users"], results["seen_accuracy"])
    results["seconds"] = time.time() - start
    (report / "users.json").write_text(json.dumps(results, indent=1))
    (report / "users.md").write_text(markdown(results))
    print(markdown(results))
    print(f"report: {report / 'users.md'} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
