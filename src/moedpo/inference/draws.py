"""Random draws keyed by latent unit: a function of the seed, the step and the unit alone.

``gumbel`` draws each unit's expert from its exact posterior, ``routed`` from the guide, and the guide's subset
fit keeps a random share of each annotator's pairs. Drawn from one shared random stream, a unit's draw would
depend on which other units share its batch: N processes, each holding a shard of the global batch, would draw
something other than one process holding all of it. Here every unit (``("user", id)`` or ``("pair", index)``,
:func:`~moedpo.inference.em.unit_keys`) gets its own generator, seeded from (seed, step, stream, unit) by numpy's
``SeedSequence``, so any split of a batch into processes, shards or micro-batches draws the same values.

Categorical draws use the Gumbel-max trick: argmax_k (log p_k + G_k) with G_k = -log(-log U_k) is distributed as
p. Models with several latent sites (a user's nested model) draw their joint assignment by Pyro's
``infer_discrete`` from the shared stream instead (:func:`posterior_draw` says when).
"""

from __future__ import annotations

import numpy as np
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from moedpo.inference.estep import Posterior, sample_posterior

KINDS = {"user": 1, "pair": 2}
STREAMS = {"posterior": 1, "guide": 2, "subset": 3}


class UnitDraws:
    """Uniform and Gumbel noise per latent unit, from ``seed``; ``step`` and ``stream`` pick a fresh draw."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def uniform(self, keys: list, size: int, step: int, stream: str) -> torch.Tensor:
        """(units, size) float64 uniforms in (0, 1), row u a function of (seed, step, stream, keys[u]) only."""
        rows = []
        for kind, ident in keys:
            words = np.random.SeedSequence([self.seed, step, STREAMS[stream], KINDS[kind], ident]).generate_state(2)
            generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
            rows.append(torch.rand(size, generator=generator, dtype=torch.float64))
        if not rows:
            return torch.empty(0, size, dtype=torch.float64)
        return torch.stack(rows).clamp(1e-300, 1 - 2**-53)

    def categorical(self, logits: torch.Tensor, keys: list, step: int, stream: str) -> torch.Tensor:
        """One draw per unit from softmax(logits) (units..., K), shaped like ``logits`` without its last dim."""
        flat = logits.detach().reshape(-1, logits.shape[-1])
        if flat.shape[0] != len(keys):
            raise ValueError(f"{flat.shape[0]} units of logits {tuple(logits.shape)} for {len(keys)} unit keys")
        gumbel = -torch.log(-torch.log(self.uniform(keys, flat.shape[-1], step, stream)))
        drawn = (flat.double() + gumbel.to(flat.device)).argmax(-1)
        return drawn.reshape(logits.shape[:-1])


def posterior_draw(
    draws: UnitDraws, model, post: Posterior, args, kwargs, nesting: int, keys: list | None, step: int
) -> dict[str, torch.Tensor]:
    """One draw of the latents from their exact posterior: keyed per unit where the model has one latent site (its
    marginals are then the posterior of each unit, independent across units) and the batch names its units;
    else the joint forward-filter backward-sample draw of :func:`~moedpo.inference.estep.sample_posterior`."""
    if keys is None or len(post.marginals) != 1:
        return sample_posterior(model, *args, max_plate_nesting=nesting, **kwargs)
    ((name, q),) = post.marginals.items()
    return {name: draws.categorical(q.clamp_min(0).log(), keys, step, "posterior")}


class KeyedSampling(Messenger):
    """Inside it, a program's one latent categorical site is drawn per unit by ``draws`` (the guide's z under
    ``routed``), its log-probability and graph as Pyro computes them."""

    def __init__(self, draws: UnitDraws, keys: list, step: int):
        super().__init__()
        self.draws, self.keys, self.step = draws, keys, step

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        fn = msg["fn"]
        while hasattr(fn, "base_dist"):  # Independent / masked / expanded wrappers around the categorical
            fn = fn.base_dist
        logits = fn.logits.expand(*msg["fn"].batch_shape, fn.logits.shape[-1])
        msg["value"] = self.draws.categorical(logits, self.keys, self.step, "guide")
        msg["done"] = True
