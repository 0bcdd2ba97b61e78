"""The ranking world with LLM experts: K = 3 LoRA experts of the built-in tiny Llama, trained by ``moedpo train``
on rankings, against the same rankings cut into pairs and one DPO policy (issue 20's ranking world, beside the
tabular one in ``ranking_world.py``).

    python examples/llm_ranking_world.py [--seeds 0,1,2] [--annotators 30] [--out runs/llm_ranking_world] [--shrink]

The world is ``data.source=builtin:rankings`` (:mod:`moedpo.data.builtin_rankings`): three annotator types, each
annotator ranking four completions of ``data.rankings_per_annotator`` = 4 prompts (a quarter held out: three
training rankings each). Per seed, with the library's defaults otherwise:

- ``Plackett-Luce mixture``: the rankings as they are (K = 3, user scope), with ``train.dpo_baseline`` for the
  ``one DPO policy`` row (K = 1 on the same rankings);
- ``binarized pairs``: each ranking cut to its best completion against a random other (UltraFeedback's
  binarization), the annotator kept (K = 3, user scope);
- ``Bayes oracle``: each annotator's type posterior from its training rankings under the true rewards.

Checks ([FAIL] lines, exit 1): the mixture's ARI >= 0.9 on every seed whose oracle reaches 0.95; binarized pairs
below 0.5 on average; the mixture's held-out top-1 at least 0.1 above one DPO policy's on every seed.
``--shrink``: one seed, 4 annotators per type and 20 steps, checks that the pipeline runs (no thresholds).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from moedpo import train
from moedpo.config import load_config
from moedpo.data.builtin_rankings import make_builtin_ranking_rows, ranking_oracle
from moedpo.eval import adjusted_rand_index

RANKINGS_PER_ANNOTATOR = 4


def fit(out: Path, source: str, num_experts: int, seed: int, extra: list[str]) -> dict:
    """Train one run; returns its held-out metrics (and the run directory under "dir")."""
    config = load_config(
        overrides=[
            f"data.source={source}",
            f"experts.num_experts={num_experts}",
            f"train.seed={seed}",
            f"train.output_dir={out}",
            "train.overwrite=true",
            *extra,
        ]
    )
    run = train(config)
    return {**json.loads((run / "report" / "eval.json").read_text())["metrics"], "dir": run}


def binarize(rows: list[dict], seed: int) -> list[dict]:
    """Each ranking as one pair: its best completion against a random other, with the row's annotator."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        best, other = row["ranking"][0], rng.choice(row["ranking"][1:])
        texts = row["completions"]
        pairs.append({"prompt": row["prompt"], "chosen": texts[best], "rejected": texts[other],
                      "user_id": row["user_id"], "group": row["group"]})  # fmt: skip
    return pairs


def oracle_ari(rows: list[dict], run: Path) -> float:
    """The Bayes oracle's ARI on the run's own training rankings (``data.json`` names their rows)."""
    train_rows = [rows[e["index"]] for e in json.loads((run / "data.json").read_text())["train"]]
    assigned = ranking_oracle(train_rows)["assigned"]
    group = {r["user_id"]: r["group"] for r in train_rows}
    types, users = sorted(set(group.values())), sorted(assigned)
    return adjusted_rand_index([types.index(group[u]) for u in users], [types.index(assigned[u]) for u in users])


def run_seed(out: Path, seed: int, annotators: int, extra: list[str]) -> dict:
    """The table's rows for one seed: name -> (ARI, top-1, Kendall tau)."""
    rows = make_builtin_ranking_rows(annotators, RANKINGS_PER_ANNOTATOR, seed=seed)
    world = [f"data.annotators_per_type={annotators}", f"data.rankings_per_annotator={RANKINGS_PER_ANNOTATOR}"]
    mixture = fit(
        out / f"s{seed}" / "mixture", "builtin:rankings", 3, seed, [*world, "train.dpo_baseline=true", *extra]
    )
    dpo = json.loads((mixture["dir"] / "dpo" / "report" / "eval.json").read_text())["metrics"]
    pairs_file = out / f"s{seed}" / "binarized.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in binarize(rows, seed)))
    binarized = fit(out / f"s{seed}" / "binarized", str(pairs_file), 3, seed, extra)
    nan = float("nan")

    def row(metrics, ari=True):
        return (metrics["eval/ari"] if ari else nan, metrics.get("eval/rankings/top1", nan),
                metrics.get("eval/rankings/kendall_tau", nan))  # fmt: skip

    return {
        "Plackett-Luce mixture": row(mixture),
        "binarized pairs": row(binarized),
        "one DPO policy": row(dpo, ari=False),
        "Bayes oracle": (oracle_ari(rows, mixture["dir"]), nan, nan),
    }


def checks(table: dict[int, dict]) -> list[str]:
    failures, binarized = [], []
    for seed, rows in table.items():
        (ari, top1, _), oracle = rows["Plackett-Luce mixture"], rows["Bayes oracle"][0]
        if oracle >= 0.95 and not ari >= 0.9:
            failures.append(f"seed {seed}: Plackett-Luce ARI {ari:.2f} < 0.9 (oracle {oracle:.2f})")
        if not top1 >= rows["one DPO policy"][1] + 0.1:
            failures.append(f"seed {seed}: top-1 {top1:.3f} not 0.1 above one DPO policy's")
        binarized.append(rows["binarized pairs"][0])
    mean = sum(binarized) / len(binarized)
    if not mean < 0.5:
        failures.append(f"binarized pairs: mean ARI {mean:.2f}, expected < 0.5")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--annotators", type=int, default=30, help="annotators per type")
    parser.add_argument("--out", default="runs/llm_ranking_world")
    parser.add_argument("--shrink", action="store_true", help="one seed, 4 annotators per type, 20 steps (smoke)")
    args = parser.parse_args(argv)
    seeds = [0] if args.shrink else [int(s) for s in args.seeds.split(",")]
    annotators, extra = (4, ["train.max_steps=20", "train.eval_steps=0"]) if args.shrink else (args.annotators, [])
    start, out = time.time(), Path(args.out)
    print(f"LLM ranking world: 3 types x {annotators} annotators, {RANKINGS_PER_ANNOTATOR} rankings of 4 each")
    print(f"{'seed':>4}  {'method':<24} {'ARI':>5} {'top-1':>6} {'tau':>6}")
    table = {}
    for seed in seeds:
        table[seed] = run_seed(out, seed, annotators, extra)
        for name, (ari, top1, tau) in table[seed].items():
            print(f"{seed:>4}  {name:<24} {ari:>5.2f} {top1:>6.3f} {tau:>6.3f}", flush=True)
    failures = [] if args.shrink else checks(table)
    for failure in failures:
        print(f"[FAIL] {failure}")
    print(f"{time.time() - start:.0f} s; runs under {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
