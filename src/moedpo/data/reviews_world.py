"""``data.source: reviews``: the paper's multi-objective experiment on the reviews world (:mod:`.reviews`).

Three stages, each cached so that the DPO baseline, the mixture and ``--resume`` see the same data:

1. **Reference.** With ``model.name_or_path: scratch`` the reference is pretrained from nothing on
   ``data.pretrain_reviews`` unlabelled reviews (a byte-level BPE tokenizer, a small Llama, SFT; see
   :mod:`moedpo.sft`). Any other model that writes English works too (a local folder, a hub name).
2. **Annotation.** For each pair, two completions are sampled from the reference for a fresh prompt (temperature
   1, fixed seeds), and an annotator of hidden type t (one of ``data.objectives``) labels them by its reward,
   with Bradley–Terry noise: P(a > b) = sigmoid(6 (r_t(a) - r_t(b))). Empty or identical samples are drawn again.
   ``data.annotators_per_type`` annotators per type label ``data.pairs_per_annotator`` pairs each.
3. The rows (``prompt``, ``chosen``, ``rejected``, ``user_id``, ``group`` = the type) go through the same
   validation and tokenization as a user's file; they are cached as JSONL beside the scratch references.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

import torch

from moedpo.config import Config, ConfigError
from moedpo.data import reviews

SCALE = 6.0  # Bradley–Terry sharpness of the annotators
HELD_OUT_SEED = 1_000_003  # the report's prompts come from their own stream, never from the annotated ones


def objectives(config: Config) -> list[str]:
    return list(config.data.objectives or reviews.OBJECTIVES)


def pretraining_rows(config: Config) -> list[dict]:
    """Unlabelled reviews for the scratch reference, as rows (prompt, chosen = a review; rejected is unused)."""
    rng = random.Random(config.train.seed)
    return [
        {"prompt": reviews.make_prompt(rng), "chosen": reviews.make_review(rng), "rejected": reviews.make_review(rng)}
        for _ in range(config.data.pretrain_reviews)
    ]


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(HELD_OUT_SEED + seed)
    return [reviews.make_prompt(rng) for _ in range(n)]


def _cache_path(config: Config, reference: str) -> Path:
    from moedpo.sft import cache_root

    weights = sorted(Path(reference).glob("*.safetensors")) if Path(reference).is_dir() else []
    stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    d = config.data
    key = [reference, stamp, objectives(config), d.annotators_per_type, d.pairs_per_annotator, config.train.seed]
    return cache_root().parent / "reviews" / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16] + ".jsonl")


def annotated_rows(config: Config) -> list[dict]:
    """The annotated pairs (cached; see the module docstring). The global random state is left as it was, so a
    run draws the same initialisation whether the pairs came from the cache or not."""
    with torch.random.fork_rng(devices=[]):
        return _annotated_rows(config)


def _annotated_rows(config: Config) -> list[dict]:
    from moedpo.builders import build_base
    from moedpo.eval.generation import sample_completions

    if config.model.name_or_path == "builtin":
        raise ConfigError(
            "data.source=reviews needs a model that writes English, and the builtin one knows ~60 words: set "
            "model.name_or_path=scratch (pretrained here from the world's reviews), a local folder or a hub name"
        )
    reference = config.model.name_or_path
    if reference == "scratch":
        from moedpo.sft import scratch_reference

        reference = str(scratch_reference(config))  # the cached folder (built here on first use)
    path = _cache_path(config, reference)
    if path.exists():  # every later run: no model load at all
        return [json.loads(line) for line in path.read_text().splitlines()]
    tokenizer, model = build_base(config)
    types, d = objectives(config), config.data
    n = len(types) * d.annotators_per_type * d.pairs_per_annotator
    print(f"moedpo: annotating {n} pairs sampled from the reference ({', '.join(types)})", file=sys.stderr)
    rng = random.Random(config.train.seed)
    prompts = [reviews.make_prompt(rng) for _ in range(n)]
    model.eval()
    first = sample_completions(model, tokenizer, prompts, seed=config.train.seed * 2 + 1, desc="annotation 1/2")
    second = sample_completions(model, tokenizer, prompts, seed=config.train.seed * 2 + 2, desc="annotation 2/2")
    for attempt in range(5):  # a reference may stop at once, or say the same thing twice: draw those again
        bad = [i for i in range(n) if not first[i].strip() or not second[i].strip() or first[i] == second[i]]
        if not bad:
            break
        again = sample_completions(model, tokenizer, [prompts[i] for i in bad], seed=1000 + attempt)
        for i, text in zip(bad, again):
            (first if not first[i].strip() else second)[i] = text
    rows, i = [], 0
    for t, objective in enumerate(types):
        for a in range(d.annotators_per_type):
            for _ in range(d.pairs_per_annotator):
                if first[i].strip() and second[i].strip() and first[i] != second[i]:
                    chosen, rejected = reviews.label(rng, first[i], second[i], objective, SCALE)
                    user = f"critic_{t * d.annotators_per_type + a:03d}"
                    rows.append(
                        {"prompt": prompts[i], "chosen": chosen, "rejected": rejected, "user_id": user,
                         "group": objective}
                    )  # fmt: skip
                i += 1
    if len(rows) < n:
        print(f"moedpo: {n - len(rows)} pairs dropped (empty or identical samples)", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return rows
