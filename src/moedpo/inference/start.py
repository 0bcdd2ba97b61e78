"""A start from the data: responsibilities for the latent units before any expert is trained.

EM on a mixture from a symmetric start (every expert the reference, plus small noise) lets the first steps
decide the types by chance, and a bad draw is a local optimum that no later step leaves (measured: natural text
through ``scratch``, 20 annotators x 12 pairs per type, ARI 0.02-0.29 on three seeds with the oracle at 1.0).
Here each pair gets a *contrast* x_i (chosen minus rejected, as a vector of token counts over the tokens that
most often differ: the score at zero of a bag-of-tokens reward), each latent unit (an annotator in user scope,
a pair in pair scope) the mean of its pairs' contrasts, and the units are clustered into K groups:

1. whiten by the contrasts' second moment S = E[x x^T] (regularised, S + lam * max eig(S)): a random pair's
   contrast is mostly text noise, and the whitening weighs each direction by how much it varies without a label;
2. scale a unit's mean by sqrt(its number of pairs) (its noise then has the same size whatever its count),
   centre, keep the top principal components (the signal subspace of the types), and run k-means++ there.

The clusters enter the first ``steps`` E-steps as the latent's prior (:meth:`Start.log_prior`), with a weight
that falls linearly to zero, so the first M-steps already train each expert on one type and the data take over.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from sklearn.cluster import KMeans

NUM_TOKENS = 1024  # contrast features: the tokens that most often differ between chosen and rejected
WHITENING = 0.1  # lam: regulariser of the whitening, as a share of the largest eigenvalue
CONFIDENCE = 0.9  # prior mass of a unit's own cluster at the first step


def token_contrasts(examples: list[dict], num_tokens: int = NUM_TOKENS) -> torch.Tensor:
    """(N, F) float64: per example, counts of each of the F tokens in the chosen completion minus the rejected;
    for a ranking, its completions' counts weighted by their wins minus losses (:func:`ranking_contrasts`)."""
    contrasts = [_token_contrast(e) for e in examples]
    differ = Counter()
    for contrast in contrasts:
        differ.update(contrast.keys())
    tokens = {t: j for j, (t, _) in enumerate(sorted(differ.items(), key=lambda kv: (-kv[1], kv[0]))[:num_tokens])}
    out = torch.zeros(len(examples), max(len(tokens), 1), dtype=torch.float64)
    for i, contrast in enumerate(contrasts):
        for t, value in contrast.items():  # the example's own tokens, not all F of them
            if t in tokens:
                out[i, tokens[t]] = value
    return out


def _token_contrast(example: dict) -> dict[int, float]:
    """token -> weighted count difference of one example, the tokens whose counts differ only."""
    if "completion_ids" in example:
        n = len(example["completion_ids"])
        places = ranking_contrasts(
            torch.eye(n, dtype=torch.float64).unsqueeze(0),
            torch.tensor([example["ranking"]]),
            ranked=torch.tensor([example["ranked"]]),
        )[0].tolist()  # each completion's wins minus losses
        sides = [(Counter(ids), w) for ids, w in zip(example["completion_ids"], places)]
    else:
        sides = [(Counter(example["chosen_ids"]), 1.0), (Counter(example["rejected_ids"]), -1.0)]
    total = Counter()
    for counts, weight in sides:
        for t, c in counts.items():
            total[t] += weight * c
    return {t: v for t, v in total.items() if v != 0}


def unit_embedding(contrasts: torch.Tensor, owner: torch.Tensor, num_units: int, dims: int) -> torch.Tensor:
    """(U, dims): the units' whitened mean contrasts, scaled by sqrt(pairs), centred, on their top components."""
    second = contrasts.T @ contrasts / max(len(contrasts), 1)
    values, vectors = torch.linalg.eigh(second)
    whiten = vectors @ torch.diag((values.clamp_min(0) + WHITENING * values.max().clamp_min(1e-12)).rsqrt())
    counts = torch.bincount(owner, minlength=num_units).clamp_min(1).to(contrasts)
    sums = torch.zeros(num_units, contrasts.shape[1], dtype=contrasts.dtype).index_add_(0, owner, contrasts)
    means = (sums / counts[:, None]) @ whiten * counts.sqrt()[:, None]
    centred = means - means.mean(0)
    left, singular, _ = torch.linalg.svd(centred, full_matrices=False)
    return left[:, :dims] * singular[:dims]


def cluster(embedding: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    """(U,) long: k-means++ (ten starts, the best kept by inertia) of the units' embedding."""
    if num_experts == 1 or len(embedding) <= num_experts:
        return torch.arange(len(embedding)) % num_experts
    km = KMeans(num_experts, n_init=10, random_state=seed).fit(embedding.numpy())
    return torch.as_tensor(km.labels_, dtype=torch.long)


@dataclass
class Start:
    """Per latent unit (("user", id) or ("pair", index)) its cluster; the prior of the first ``steps`` E-steps."""

    clusters: dict[tuple[str, int], int]
    num_experts: int
    steps: int

    def weight(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.steps) if self.steps else 0.0

    def log_prior(self, keys: list | None, step: int, like: torch.Tensor) -> torch.Tensor | None:
        """(units, K) to add to the gate's logits in the E-step of ``step`` (None once the start is spent or the
        batch's units are unknown): weight * log of CONFIDENCE on the unit's cluster, the rest spread evenly."""
        weight = self.weight(step)
        if weight == 0 or keys is None or self.num_experts == 1:
            return None
        rest = (1 - CONFIDENCE) / (self.num_experts - 1)
        prior = torch.full((len(keys), self.num_experts), rest, dtype=like.dtype, device=like.device)
        for row, key in enumerate(keys):
            if key in self.clusters:
                prior[row, self.clusters[key]] = CONFIDENCE
            else:
                prior[row] = 1 / self.num_experts
        return weight * prior.log()

    def to_json(self) -> dict:
        """Plain JSON for a checkpoint's ``loop.json`` (a resumed run leans on the same clusters)."""
        rows = [[kind, unit, c] for (kind, unit), c in sorted(self.clusters.items())]
        return {"clusters": rows, "num_experts": self.num_experts, "steps": self.steps}

    @classmethod
    def from_json(cls, state: dict) -> Start:
        clusters = {(kind, unit): c for kind, unit, c in state["clusters"]}
        return cls(clusters, state["num_experts"], state["steps"])


def units(examples: list[dict], by_user: bool) -> tuple[list[tuple[str, int]], torch.Tensor]:
    """The latent units' keys (annotators when ``by_user``, else pairs) and each example's unit, (N,) long."""
    if by_user:
        ids = sorted({e["user"] for e in examples})
        position = {u: j for j, u in enumerate(ids)}
        return [("user", u) for u in ids], torch.tensor([position[e["user"]] for e in examples])
    return [("pair", e["index"]) for e in examples], torch.arange(len(examples))


def random_start(examples: list[dict], num_experts: int, by_user: bool, steps: int, seed: int) -> Start:
    """A random balanced partition of the units (``em.restarts``: a start that knows nothing of the data)."""
    keys, _ = units(examples, by_user)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed))
    labels = torch.empty(len(keys), dtype=torch.long)
    labels[order] = torch.arange(len(keys)) % num_experts
    return Start(dict(zip(keys, labels.tolist())), num_experts, steps)


def data_start(examples: list[dict], num_experts: int, by_user: bool, steps: int, seed: int) -> Start:
    """Cluster the training examples' units (annotators when ``by_user``, else pairs) from their contrasts."""
    keys, owner = units(examples, by_user)
    return clustered_start(token_contrasts(examples), keys, owner, num_experts, steps, seed)


def clustered_start(
    contrasts: torch.Tensor, keys: list, owner: torch.Tensor, num_experts: int, steps: int, seed: int
) -> Start:
    """The start from any contrasts (N, F) of N examples, ``owner`` (N,) the index of each one's unit in
    ``keys``: whitened unit means, their top components, k-means++."""
    embedding = unit_embedding(contrasts.double(), owner, len(keys), num_experts)
    labels = cluster(embedding, num_experts, seed)
    return Start(dict(zip(keys, labels.tolist())), num_experts, steps)


def ranking_contrasts(
    features: torch.Tensor, ranking: torch.Tensor, mask: torch.Tensor | None = None, ranked: torch.Tensor | None = None
) -> torch.Tensor:
    """A ranking's contrast (N, F) from its completions' features (N, M, F): the sum over the pairs it implies of
    better minus worse, which is each completion's features weighted by its wins minus its losses: n - 1 - 2j at
    place j of n real completions (Borda's count, centred), and -k for each completion of an unranked remainder
    below the first k = ``ranked`` places (it loses to those k, nothing else is known). For two completions:
    chosen minus rejected, as for pairs."""
    n = torch.tensor(ranking.shape[-1]) if mask is None else mask.sum(-1, keepdim=True)  # (N, 1) or M
    k = n - 1 if ranked is None else ranked.unsqueeze(-1)
    places = torch.arange(ranking.shape[-1], device=ranking.device).expand_as(ranking)
    weight = torch.where(places < k, n - 1 - 2 * places, -k).to(features.dtype)
    if mask is not None:
        weight = weight * mask
    zeros = torch.zeros(ranking.shape, dtype=features.dtype, device=features.device)
    per_completion = zeros.scatter_add(-1, ranking, weight)  # add: a padded place may repeat a real index
    return (per_completion.unsqueeze(-1) * features).sum(-2)
