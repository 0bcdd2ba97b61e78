"""A run's tokenized data: training and held-out examples, annotator ids, what was truncated or dropped.

Saved with the run as ``data.json`` (plain JSON, no pickle), so evaluation, routing and generation need none of
the original files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from moedpo.data.batching import by_annotator


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    user_ids: list[str]
    num_truncated: int
    user_feature_dim: int
    num_dropped: int = 0  # rows dropped, counted, not fatal: prompt >= max_length (as TRL), chosen equals rejected
    conversational: bool = False  # rows were chat messages: prompts at generation go through the chat template
    split: str = ""  # how the held-out pairs were chosen, in words (for the log and config.yaml)

    @property
    def rankings(self) -> bool:
        """The examples are rankings (``completions`` with ``ranking`` or ``scores``), not pairs."""
        return any("completion_ids" in e for e in self.train[:1] + self.eval[:1])

    def save(self, path: Path) -> None:
        """The tokenized splits as JSON, so a run directory needs none of the original files (no pickle)."""
        plain = lambda e: {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in e.items()}  # noqa: E731
        fields = {k: v for k, v in self.__dict__.items() if k not in ("train", "eval")}
        path.write_text(
            json.dumps({**fields, "train": [plain(e) for e in self.train], "eval": [plain(e) for e in self.eval]})
        )

    @classmethod
    def load(cls, path: Path) -> PreparedData:
        saved = json.loads(path.read_text())
        for e in saved["train"] + saved["eval"]:
            if "prompt_features" in e:
                e["prompt_features"] = torch.tensor(e["prompt_features"])
        return cls(**saved)


def held_out_split(examples: list[dict], by_user: bool, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded ``fraction`` of each annotator's pairs (``by_user``), or of all pairs; an
    annotator with one pair keeps it for training. Both lists in the examples' index order."""
    groups = by_annotator(examples).values() if by_user else [list(examples)]
    rng = random.Random(seed)
    train, held_out = [], []
    for group in groups:
        rng.shuffle(group)
        n_eval = int(round(fraction * len(group))) if len(group) > 1 else 0
        held_out += group[:n_eval]
        train += group[n_eval:]
    return sorted(train, key=lambda e: e["index"]), sorted(held_out, key=lambda e: e["index"])


UNKNOWN_LIMIT = 0.02  # more of the text than this as <unk>, and a model learns from lengths, not words


def unknown_token_share(examples: list[dict], unk_token_id: int | None) -> float:
    """The share of prompt and completion token ids that are the tokenizer's unknown token (0 without one)."""
    if unk_token_id is None:
        return 0.0
    ids = [i for e in examples for part in _token_lists(e) for i in part]
    return sum(i == unk_token_id for i in ids) / max(1, len(ids))


def _token_lists(example: dict) -> list[list[int]]:
    """A pair's prompt, chosen and rejected ids; a ranking's prompt and completions."""
    if "completion_ids" in example:
        return [example["prompt_ids"][0], *example["completion_ids"]]
    return [example["prompt_chosen_ids"], example["chosen_ids"], example["rejected_ids"]]


def user_feature_width(examples: list[dict]) -> int | None:
    """The width of the ``user_features`` column: 0 when no example has one, None when some lack it or widths
    differ (a gate cannot read them)."""
    widths = {None if e["user_features"] is None else len(e["user_features"]) for e in examples}
    if widths <= {None}:
        return 0
    return widths.pop() if len(widths) == 1 else None
