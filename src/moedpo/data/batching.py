"""Batches by step, the same in every run with the same seed (so a resumed run sees the same data), and the one
grouping of examples by annotator.

A :class:`BatchPlan` orders *units* (a pair, or all pairs of one annotator in user scope, so user-scope
E-steps stay exact) by a seeded shuffle per epoch; batch ``i`` is a slice of that order (the last one of an
epoch may be short). Training and ``moedpo sft`` draw their batches from it.
"""

from __future__ import annotations

import math
import random


def by_annotator(examples: list[dict]) -> dict[int, list[dict]]:
    """Examples grouped by their integer annotator index ``user``, in order of first appearance."""
    groups: dict[int, list[dict]] = {}
    for e in examples:
        groups.setdefault(e["user"], []).append(e)
    return groups


def epoch_order(num_units: int, seed: int, epoch: int) -> list[int]:
    """The seeded order of ``num_units`` units in ``epoch``."""
    order = list(range(num_units))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


class BatchPlan:
    """Deterministic batches by step: ``units`` (lists of items) shuffled per epoch, ``per_batch`` units a batch."""

    def __init__(self, units: list[list], per_batch: int, seed: int):
        self.units = units
        self.per_batch, self.seed = max(1, min(per_batch, len(units))), seed  # the last batch may be short
        self.per_epoch = math.ceil(len(units) / self.per_batch)

    @classmethod
    def for_examples(cls, examples: list[dict], by_user: bool, per_batch: int, seed: int) -> BatchPlan:
        """Units of pairs, or of whole annotators (``by_user``)."""
        units = list(by_annotator(examples).values()) if by_user else [[e] for e in examples]
        return cls(units, per_batch, seed)

    def __call__(self, index: int, shard=lambda units: units) -> list:
        """The items of global batch ``index`` (``shard`` keeps this process's units of it)."""
        epoch, position = divmod(index, self.per_epoch)
        order = epoch_order(len(self.units), self.seed, epoch)
        chosen = shard(order[position * self.per_batch : (position + 1) * self.per_batch])
        return [item for i in chosen for item in self.units[i]]
