"""Gates w(x, u) on the K-simplex, as plain ``nn.Module``s returning logits (B, K).

- :class:`FixedGate` — Mix-DPO: global proportions w (learned, or frozen when given).
- :class:`MLPGate` — MoE-DPO: w(x) from prompt features.
- :class:`UserGate` — personalised w(x, u): a user embedding and/or user feature columns, optionally with
  prompt features.
- :func:`top1_route` — sparse routing: the one-hot top-1 choice of a gate.
"""

from __future__ import annotations

import torch
from torch import nn

from moedpo.models.bt import first_pairs


class FixedGate(nn.Module):
    """Global mixture weights, independent of the input. ``weights`` given and ``learnable=False`` freezes them."""

    def __init__(self, num_experts: int, weights: torch.Tensor | None = None, learnable: bool = True):
        super().__init__()
        init = torch.zeros(num_experts) if weights is None else torch.log(torch.as_tensor(weights).float())
        if init.shape != (num_experts,):
            raise ValueError(f"FixedGate weights must have shape ({num_experts},), got {tuple(init.shape)}")
        self.logits = nn.Parameter(init, requires_grad=learnable)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.logits.expand(batch_size, -1)  # (B, K)

    @torch.no_grad()
    def set_proportions(self, q: torch.Tensor) -> None:
        """Closed-form M-step: w = mean of the responsibilities q (N, K)."""
        self.logits.copy_(torch.log(q.mean(0).clamp_min(1e-12)))


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))


class MLPGate(nn.Module):
    """MoE-DPO gate: prompt features (B, D) -> logits (B, K)."""

    def __init__(self, in_dim: int, num_experts: int, hidden: int = 64):
        super().__init__()
        self.net = _mlp(in_dim, hidden, num_experts)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class UserGate(nn.Module):
    """Personalised gate: logits from a user-id embedding, user features and/or prompt features.

    ``forward(user_ids=None, user_features=None, features=None)`` adds the parts that are configured.
    """

    def __init__(
        self,
        num_experts: int,
        num_users: int = 0,
        user_feature_dim: int = 0,
        prompt_feature_dim: int = 0,
        hidden: int = 64,
    ):
        super().__init__()
        if not (num_users or user_feature_dim):
            raise ValueError("UserGate needs num_users (an id embedding) or user_feature_dim (feature columns)")
        self.embedding = nn.Embedding(num_users, num_experts) if num_users else None
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, std=0.01)
        in_dim = user_feature_dim + prompt_feature_dim
        self.net = _mlp(in_dim, hidden, num_experts) if in_dim else None

    def forward(self, user_ids=None, user_features=None, features=None) -> torch.Tensor:
        logits = 0
        if self.embedding is not None:
            if user_ids is None:
                raise ValueError("this UserGate has a user embedding: pass user_ids")
            logits = logits + self.embedding(user_ids)
        if self.net is not None:
            parts = [t for t in (user_features, features) if t is not None]
            if not parts:
                raise ValueError("this UserGate reads feature columns: pass user_features and/or features")
            logits = logits + self.net(torch.cat(parts, -1))
        return logits


def top1_route(gate_logits: torch.Tensor) -> torch.Tensor:
    """Hard top-1 assignment (B, K) -> one-hot (B, K): which expert a sparse MoE runs for each input."""
    return nn.functional.one_hot(gate_logits.argmax(-1), gate_logits.shape[-1]).to(gate_logits.dtype)


class Router(nn.Module):
    """A run's gate, read from a collated batch: the one place a batch becomes gate logits.

    ``net`` is a :class:`FixedGate`, :class:`MLPGate` or :class:`UserGate` (``kind`` says which). Pair scope gives
    logits (B, K); user scope gives one row per annotator in the batch, (U, K), and ``user_index`` (B,) into them.
    Prompt features are the batch's sentence-encoder ``prompt_features`` when present, else the experts' pooled
    base states.
    """

    def __init__(self, net: nn.Module, kind: str, scope: str, user_features: bool = False):
        super().__init__()
        self.net, self.kind, self.scope, self.user_features = net, kind, scope, user_features

    def forward(self, batch: dict, margins: dict) -> tuple[torch.Tensor, dict]:
        """The EM loop's gate: (logits, latent-model keyword arguments)."""
        return self.logits(batch, margins.get("features"))

    def logits(self, batch: dict, features: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        device = next(self.parameters()).device
        if "prompt_features" in batch:
            features = batch["prompt_features"]
        users = batch["user"].to(device)
        if self.scope == "pair":
            return self._rows(users, batch.get("user_features"), features), {}
        ids, local = torch.unique(users, return_inverse=True)
        first = first_pairs(local, ids.numel())  # each annotator's features, read from its first pair
        user_features = batch.get("user_features")
        return self._rows(ids, None if user_features is None else user_features[first.cpu()], None), {
            "user_index": local
        }

    def _rows(self, users: torch.Tensor, user_features, features) -> torch.Tensor:
        device = users.device
        if self.kind == "fixed":
            return self.net(users.numel())
        if self.kind == "mlp":
            return self.net(features.to(device).float())
        wanted = user_features.to(device) if self.user_features and user_features is not None else None
        return self.net(user_ids=users, user_features=wanted)

    @torch.no_grad()
    def new_user_logits(self, batch: dict, features: torch.Tensor | None) -> torch.Tensor:
        """The gate's prior logits (K,) for an annotator it has never seen, whose pairs are ``batch``: the Mix-DPO
        proportions; a user gate's mean user embedding plus its feature network on the annotator's
        ``user_features`` (how a user gate generalises to new users); an MoE gate's weights averaged over the
        pairs' prompts."""
        device = next(self.parameters()).device
        if self.kind == "fixed":
            return torch.log_softmax(self.net(1)[0], -1)
        if self.kind == "mlp":
            prompts = batch["prompt_features"] if "prompt_features" in batch else features
            weights = torch.softmax(self.net(prompts.to(device).float()), -1).mean(0)
            return weights.clamp_min(1e-30).log()
        gate = self.net
        logits = 0.0
        if gate.embedding is not None:
            logits = gate.embedding.weight.mean(0)  # the population's average annotator
        if gate.net is not None:
            user_features = batch.get("user_features")
            if user_features is None:
                raise ValueError("this run's user gate reads user_features: the new annotator's rows need them")
            width = gate.net[0].in_features
            if user_features.shape[-1] != width:
                raise ValueError(f"user_features has {user_features.shape[-1]} numbers; this run's gate reads {width}")
            logits = logits + gate.net(user_features[:1].to(device).float())[0]
        return torch.log_softmax(logits, -1)

    @torch.no_grad()
    def pair_weights(self, batch: dict, features: torch.Tensor | None) -> torch.Tensor:
        """The gate's prior w(x, u) for each pair: (B, K)."""
        logits, extra = self.logits(batch, features)
        weights = torch.softmax(logits, -1)
        return weights[extra["user_index"]] if "user_index" in extra else weights
