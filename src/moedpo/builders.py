"""Build the pieces of a run from its config: tokenizer and base model, data splits, expert bank, gate.

Shared by ``moedpo train``, ``moedpo eval`` and ``moedpo generate`` so all three see the same objects.
Library classes take plain arguments; only this module reads the config.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from moedpo.config import Config
from moedpo.data.builtin import make_builtin_rows, tiny_causal_lm, train_tokenizer
from moedpo.data.encoder import encode_prompts, load_encoder
from moedpo.data.formats import normalise_row
from moedpo.data.loading import load_preference_rows
from moedpo.data.tokenize import tokenize_rows
from moedpo.experts import HeadsBank, IndependentBank, LoRABank
from moedpo.models.gates import FixedGate, MLPGate, UserGate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(config: Config, device: torch.device):
    wanted = str(config.train.bf16).lower()
    if wanted == "true" or (wanted == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_base(config: Config, saved_base: Path | None = None):
    """(tokenizer, causal LM). ``builtin`` trains a tokenizer locally and builds a tiny model from a config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(saved_base) if saved_base is not None else config.model.name_or_path
    if name == "builtin":
        tokenizer = train_tokenizer()
        model = tiny_causal_lm(
            len(tokenizer),
            config.model.hidden_size,
            config.model.num_layers,
            seed=config.train.seed,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        trust = config.model.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[config.model.dtype], trust_remote_code=trust)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(DTYPES[config.model.dtype])


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    user_ids: list[str]
    num_truncated: int
    user_feature_dim: int


def _rows(config: Config, source: str):
    if source.startswith("builtin"):
        raw = make_builtin_rows(
            config.data.annotators_per_type,
            config.data.pairs_per_annotator,
            domain_reveals_type=source == "builtin:domain",
            seed=config.train.seed,
        )
        return [normalise_row(r, source, i) for i, r in enumerate(raw)]
    return load_preference_rows(source, config.data.split)


def prepare_data(config: Config, tokenizer) -> PreparedData:
    """Load, validate and tokenize; split each annotator's pairs into train / held-out unless eval_source is set."""
    d = config.data
    options = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length, truncation_mode=d.truncation_mode)
    tokenized = tokenize_rows(_rows(config, d.source), tokenizer, source=d.source, **options)
    if d.eval_source:
        held = tokenize_rows(
            _rows(config, d.eval_source), tokenizer, source=d.eval_source, user_ids=tokenized.user_ids, **options
        )
        train, evaluation, users = tokenized.examples, held.examples, held.user_ids
        for e in evaluation:
            e["index"] += len(train)  # distinct cache keys
        truncated = tokenized.num_truncated + held.num_truncated
    else:
        by_user: dict[int, list[dict]] = {}
        for e in tokenized.examples:
            by_user.setdefault(e["user"], []).append(e)
        rng = random.Random(config.train.seed)
        train, evaluation = [], []
        for examples in by_user.values():
            rng.shuffle(examples)
            n_eval = int(round(d.eval_fraction * len(examples))) if len(examples) > 1 else 0
            evaluation += examples[:n_eval]
            train += examples[n_eval:]
        train.sort(key=lambda e: e["index"])
        evaluation.sort(key=lambda e: e["index"])
        users, truncated = tokenized.user_ids, tokenized.num_truncated
    if config.gate.encoder:
        attach_encoder_features(config.gate.encoder, train + evaluation)
    dims = {len(e["user_features"]) for e in train if e["user_features"] is not None}
    return PreparedData(train, evaluation, users, truncated, dims.pop() if len(dims) == 1 else 0)


def attach_encoder_features(encoder_name: str, examples: list[dict]) -> int:
    """Store each example's sentence-encoder prompt embedding under "prompt_features"; returns its width."""
    features = encode_prompts(load_encoder(encoder_name), [e["prompt_text"] for e in examples])
    for e, row in zip(examples, features):
        e["prompt_features"] = row
    return features.shape[1]


def gate_feature_dim(config: Config, base, data: PreparedData) -> int:
    if config.gate.encoder and data.train:
        return int(data.train[0]["prompt_features"].shape[0])
    return base.config.hidden_size


def build_bank(config: Config, model, device: torch.device):
    e = config.experts
    model = model.to(device)
    dtype = autocast_dtype(config, device)
    if e.mode == "independent":
        return IndependentBank(model, e.num_experts, init_std=e.init_std, seed=config.train.seed, autocast_dtype=dtype)
    lora = dict(
        r=e.lora_r,
        alpha=e.lora_alpha,
        dropout=e.lora_dropout,
        init_std=e.init_std,
        seed=config.train.seed,
        reference_adapters=e.reference_adapters,
        autocast_dtype=dtype,
    )
    if e.mode == "heads":
        if e.target_modules != "all-linear+head":
            lora["target_modules"] = e.target_modules
        return HeadsBank(model, e.num_experts, top_layers=e.top_layers, output_head=e.output_head, **lora)
    return LoRABank(model, e.num_experts, target_modules=e.target_modules, **lora)


def build_gate(config: Config, feature_dim: int, num_users: int, user_feature_dim: int) -> torch.nn.Module:
    g, k = config.gate, config.experts.num_experts
    if g.type == "fixed":
        return FixedGate(k, learnable=not g.closed_form)
    if g.type == "mlp":
        return MLPGate(feature_dim, k, hidden=g.hidden)
    return UserGate(
        k, num_users=num_users, user_feature_dim=user_feature_dim if g.user_features else 0, hidden=g.hidden
    )


def gate_logits(config: Config, gate, batch: dict, features: torch.Tensor):
    """Gate logits for a batch: (B, K) in pair scope; (U, K) and local user_index (B,) in user scope."""
    device = features.device
    if "prompt_features" in batch:  # a configured sentence encoder replaces the base's pooled features
        features = batch["prompt_features"].to(device)
    if config.em.scope == "pair":
        if config.gate.type == "fixed":
            return gate(features.shape[0]).to(device), None
        if config.gate.type == "mlp":
            return gate(features), None
        return _user_gate(config, gate, batch["user"].to(device), batch), None
    users, local = torch.unique(batch["user"].to(device), return_inverse=True)
    if config.gate.type == "fixed":
        return gate(users.numel()), local
    first = torch.zeros_like(users).scatter_(0, local, torch.arange(local.numel(), device=device))
    return _user_gate(config, gate, users, {k: v[first] for k, v in batch.items() if k == "user_features"}), local


def _user_gate(config, gate, user_ids, batch):
    features = batch.get("user_features") if config.gate.user_features else None
    return gate(user_ids=user_ids, user_features=None if features is None else features.to(user_ids.device))
