"""The run's trainable pieces from its config: the expert bank on the base, the gate, the guide and the latent
preference model (built-in by short name, or a user's ``package.module:name``). Library classes take plain
arguments; only these builders read the config."""

from __future__ import annotations

import torch

from moedpo.config import Config, ConfigError
from moedpo.data.prepared import PreparedData
from moedpo.experts import HeadsBank, IndependentBank, LoRABank
from moedpo.experts.loading import autocast_dtype
from moedpo.inference.start import Start, data_start
from moedpo.models.bt import mixture_bt_model, user_bt_model
from moedpo.models.gates import FixedGate, MLPGate, Router, UserGate
from moedpo.models.guides import AmortizedGuide
from moedpo.models.pl import mixture_pl_model, user_pl_model
from moedpo.plugins import import_object

BUILTIN_MODELS = {"mixture": mixture_bt_model, "pair": mixture_bt_model, "user": user_bt_model}
RANKING_MODELS = {"mixture": mixture_pl_model, "pair": mixture_pl_model, "user": user_pl_model}  # Plackett–Luce


def build_start(config: Config, data: PreparedData) -> Start | None:
    """em.init=data: the annotators' (or pairs') clusters from the training pairs, the same on every process, on
    --resume and in the report (a function of the data and the seed). ``auto`` uses it in user scope only: one
    pair's contrast is too noisy to cluster (built-in domain world, pair scope: ARI 0.03 from the data start,
    0.92 without)."""
    by_user = config.em.scope == "user"
    if config.em.init == "symmetric" or (config.em.init == "auto" and not by_user) or config.experts.num_experts == 1:
        return None
    return data_start(data.train, config.experts.num_experts, by_user, config.em.init_steps, config.train.seed)


def check_rankings(config: Config) -> None:
    """What training on rankings does not take (each is a pairwise construction), named before anything trains."""
    em, t = config.em, config.train
    refused = [
        (em.schedule == "routed", "em.schedule=routed", "routes pairs by a guide; use em, gumbel or svi"),
        (bool(em.guide), f"em.guide={em.guide}", "reads a pair's features; leave it empty"),
        (t.loss_type != "sigmoid", f"train.loss_type={t.loss_type}", "is a pairwise loss; use sigmoid"),
        (bool(em.label_smoothing), f"em.label_smoothing={em.label_smoothing}", "has no Plackett–Luce link; use 0"),
    ]
    for bad, key, why in refused:
        if bad:
            raise ConfigError(f"{config.data.source} holds rankings, and {key} {why}")


def gate_feature_dim(config: Config, base, data: PreparedData) -> int:
    if config.gate.encoder and data.train:
        return int(data.train[0]["prompt_features"].shape[0])
    return base.config.hidden_size


def disable_dropout(model) -> None:
    """Set every dropout probability of the base to 0 (TRL's ``disable_dropout``); LoRA dropout is added later."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def reuse_graph_by_default(mode: str, num_experts: int, schedule: str, batched: bool = False) -> bool:
    """Whether the E-step reuses the update's forward: it then holds every expert's activations at once, so only
    for K = 1, heads mode (an expert's activations are its top layers) with K <= 8, or a ``batched`` bank, whose
    grouped update holds them all anyway; never for sparse updates (``gumbel`` and ``routed`` run only the drawn
    expert's forward and backward)."""
    if schedule in ("gumbel", "routed"):
        return False
    return num_experts == 1 or batched or (mode == "heads" and num_experts <= 8)


def build_bank(config: Config, model, device: torch.device):
    e = config.experts
    if config.train.disable_dropout:
        disable_dropout(model)
    model = model.to(device)
    dtype = autocast_dtype(config.train.bf16, device)
    if e.mode == "independent":
        bank = IndependentBank(model, e.num_experts, init_std=e.init_std, seed=config.train.seed, autocast_dtype=dtype)
    else:
        lora = dict(
            r=e.lora_r,
            alpha=e.lora_alpha,
            dropout=e.lora_dropout,
            init_std=e.init_std,
            seed=config.train.seed,
            reference_adapters=e.reference_adapters,
            autocast_dtype=dtype,
            batched={"auto": "auto", "true": True, "false": False}[e.batched],
        )
        if e.mode == "heads":
            if e.target_modules != "all-linear+head":
                lora["target_modules"] = e.target_modules
            bank = HeadsBank(model, e.num_experts, top_layers=e.top_layers, output_head=e.output_head, **lora)
        else:
            bank = LoRABank(model, e.num_experts, target_modules=e.target_modules, **lora)
    bank.reuse_graph = e.reuse_graph == "true" or (
        e.reuse_graph == "auto" and reuse_graph_by_default(e.mode, e.num_experts, config.em.schedule, bank.grouped)
    )
    return bank


def build_gate(config: Config, feature_dim: int, num_users: int, user_feature_dim: int) -> Router:
    """The run's gate network wrapped in a :class:`~moedpo.models.gates.Router` (reads batches, either scope)."""
    g, k = config.gate, config.experts.num_experts
    if g.type == "fixed":
        net = FixedGate(k, learnable=not g.closed_form)
    elif g.type == "mlp":
        net = MLPGate(feature_dim, k, hidden=g.hidden)
    else:
        net = UserGate(
            k, num_users=num_users, user_feature_dim=user_feature_dim if g.user_features else 0, hidden=g.hidden
        )
    return Router(net, g.type, config.em.scope, user_features=g.user_features)


def build_guide(config: Config, base):
    """``em.guide``: ``amortized`` (q_phi(z | x, y+, y-) on the frozen base's pooled prompt, chosen and rejected
    states), a user's ``package.module:name``, or None."""
    if not config.em.guide:
        return None
    if config.em.guide == "amortized":
        return AmortizedGuide(3 * base.config.hidden_size, config.experts.num_experts, hidden=config.gate.hidden)
    return import_object(config.em.guide, "em.guide")


def resolve_latent_model(config: Config, rankings: bool = False):
    """``em.model``: a built-in short name, ``package.module:name``, or empty for the scope's built-in model
    (for ranking data, the scope's Plackett–Luce model)."""
    spec = config.em.model or config.em.scope
    model = (RANKING_MODELS if rankings else BUILTIN_MODELS).get(spec) or import_object(spec, "em.model")
    if getattr(model, "max_plate_nesting", None) is None:
        raise ConfigError(
            f"em.model={spec!r}: set `{getattr(model, '__name__', 'model')}.max_plate_nesting = N` on the function "
            "(the number of nested plates its sample sites sit in)"
        )
    return model
