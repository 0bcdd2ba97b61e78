"""The reviews world's annotation stage: sample two completions per prompt from a reference policy, and have the
hidden critics label them (:mod:`moedpo.data.reviews_world`). It receives the reference (a model folder or a
hub name); the rows are cached as JSONL beside the scratch references, keyed by the reference's weights and the
world's settings, so the DPO baseline, the mixture and ``--resume`` see the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from moedpo.config import Config
from moedpo.data import reviews_world
from moedpo.experts.generation import sample_completions
from moedpo.experts.loading import load_pretrained
from moedpo.reference.scratch import cache_root


def cache_path(config: Config, reference: str) -> Path:
    weights = sorted(Path(reference).glob("*.safetensors")) if Path(reference).is_dir() else []
    stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    d = config.data
    key = [
        reference, stamp, reviews_world.objectives(config), d.annotators_per_type, d.pairs_per_annotator,
        config.train.seed,
    ]  # fmt: skip
    return cache_root() / "reviews" / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16] + ".jsonl")


def annotated_rows(config: Config, reference: str) -> list[dict]:
    """The annotated pairs sampled from ``reference`` (cached). The global random state is left as it was, so a
    run draws the same initialisation whether the pairs came from the cache or not."""
    path = cache_path(config, reference)
    if path.exists():  # every later run: no model load at all
        return [json.loads(line) for line in path.read_text().splitlines()]
    with torch.random.fork_rng(devices=[]):
        rows = _annotate(config, reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return rows


def _annotate(config: Config, reference: str) -> list[dict]:
    tokenizer, model = load_pretrained(reference, config.model.dtype, config.model.trust_remote_code)
    rng, prompts = reviews_world.annotation_prompts(config)
    n = len(prompts)
    names = ", ".join(reviews_world.objectives(config))
    print(f"moedpo: annotating {n} pairs sampled from the reference ({names})", file=sys.stderr)
    model.eval()
    seed = config.train.seed
    first = sample_completions(model, tokenizer, prompts, seed=seed * 2 + 1, desc="annotation 1/2")
    second = sample_completions(model, tokenizer, prompts, seed=seed * 2 + 2, desc="annotation 2/2")
    for attempt in range(5):  # a reference may stop at once, or say the same thing twice: draw those again
        bad = [i for i in range(n) if not reviews_world.usable(first[i], second[i])]
        if not bad:
            break
        again = sample_completions(model, tokenizer, [prompts[i] for i in bad], seed=1000 + attempt)
        for i, text in zip(bad, again):
            (first if not first[i].strip() else second)[i] = text
    rows = reviews_world.label_samples(config, rng, prompts, first, second)
    if len(rows) < n:
        print(f"moedpo: {n - len(rows)} pairs dropped (empty or identical samples)", file=sys.stderr)
    return rows
