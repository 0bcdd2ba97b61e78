"""Build the pieces of a run from its config: tokenizer and base model, data splits, expert bank, gate.

Shared by ``moedpo train``, ``moedpo eval`` and ``moedpo generate`` so all three see the same objects.
Library classes take plain arguments; only this module reads the config.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moedpo.config import Config, ConfigError
from moedpo.data.builtin import make_builtin_rows, tiny_causal_lm, train_tokenizer
from moedpo.data.encoder import encode_prompts, load_encoder
from moedpo.data.formats import PreferenceDataError, normalise_row
from moedpo.data.loading import load_preference_rows
from moedpo.data.tokenize import tokenize_rows
from moedpo.experts import HeadsBank, IndependentBank, LoRABank
from moedpo.models.bt import mixture_bt_model, user_bt_model
from moedpo.models.gates import FixedGate, MLPGate, Router, UserGate
from moedpo.models.guides import AmortizedGuide

DATA_FILE = "data.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: this torch build sees no CUDA device; use train.device=auto or cpu")
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
    if name == "scratch":  # no model at all: tokenizer, small Llama and SFT on the data (cached)
        from moedpo.sft import scratch_reference

        name = str(scratch_reference(config))
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
        _check_model_name(name)
        trust, local = config.model.trust_remote_code, _cached_or_local(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust, local_files_only=local)
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=DTYPES[config.model.dtype], trust_remote_code=trust, local_files_only=local
            )
        except OSError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"model.name_or_path={name!r}: could not load it ({first}). Use a local folder with config.json, "
                "or a hub name already in the cache with HF_HUB_OFFLINE=1 (no network here), or `builtin`"
            ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(DTYPES[config.model.dtype])


def _cached_or_local(name: str) -> bool:
    """Whether ``name`` loads without the network (a folder, or a hub name in the local cache). An uncached hub name
    with the hub unreachable fails at once (the hub client would retry for over a minute)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(name).expanduser().is_dir() or isinstance(try_to_load_from_cache(name, "config.json"), str):
        return True
    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise ConfigError(
            f"model.name_or_path={name!r}: not in the local cache and the hub is unreachable. Use a local folder "
            "with config.json, download it where there is network, or `builtin`"
        )
    return False


def hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_model_name(name: str) -> None:
    """A name that looks like a path must be an existing folder (else transformers reports a hub-name error)."""
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub names are org/name
    if (looks_local or path.exists()) and not path.is_dir():
        what = "a file, not a model folder" if path.exists() else "no such folder"
        raise ConfigError(f"model.name_or_path={name!r}: {what} (expected a folder with config.json, or a hub name)")


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    user_ids: list[str]
    num_truncated: int
    user_feature_dim: int
    num_dropped: int = 0  # rows TRL would drop too (prompt >= max_length under keep_start): counted, not fatal
    conversational: bool = False  # rows were chat messages: prompts at generation go through the chat template
    split: str = ""  # how the held-out pairs were chosen, in words (for the log and config.yaml)

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


def _rows(config: Config, source: str):
    if source.startswith("builtin"):
        raw = make_builtin_rows(
            config.data.annotators_per_type,
            config.data.pairs_per_annotator,
            domain_reveals_type=source == "builtin:domain",
            seed=config.train.seed,
        )
        return [normalise_row(r, source, i) for i, r in enumerate(raw)]
    if source == "reviews":
        from moedpo.data.reviews_world import annotated_rows

        return [normalise_row(r, source, i) for i, r in enumerate(annotated_rows(config))]
    return load_preference_rows(source, config.data.split)


def reference_rows(config: Config):
    """Rows a reference policy is fine-tuned on (``moedpo sft``, ``scratch``): the data's own, except in the
    reviews world, whose preference pairs are sampled from the reference (it learns from unlabelled reviews)."""
    if config.data.source == "reviews":
        from moedpo.data.reviews_world import pretraining_rows

        return [normalise_row(r, "reviews", i) for i, r in enumerate(pretraining_rows(config))]
    return _rows(config, config.data.source)


def _check_consistent(rows: list, source: str) -> None:
    """One format per file, and annotator ids on every row or none (a blank id would be an annotator of its own)."""
    odd = next((i for i, r in enumerate(rows) if r.conversational != rows[0].conversational), None)
    if odd is not None:
        kinds = ("plain text", "chat messages") if rows[0].conversational is False else ("chat messages", "plain text")
        problem = f"{kinds[1]}, while row 1 is {kinds[0]}: use one format per file"
        raise PreferenceDataError(source, odd, "chosen", problem)
    blank = next((i for i, r in enumerate(rows) if r.user_id is None), None)
    if blank is not None and any(r.user_id is not None for r in rows):
        raise PreferenceDataError(
            source, blank, "user_id", "missing while other rows have one: fill it in or drop the row"
        )


def prepare_data(config: Config, tokenizer) -> PreparedData:
    """Load, validate and tokenize; split each annotator's pairs into train / held-out unless eval_source is set."""
    d = config.data
    options = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length, truncation_mode=d.truncation_mode)
    rows = _rows(config, d.source)
    _check_consistent(rows, d.source)
    tokenized = tokenize_rows(rows, tokenizer, source=d.source, **options)
    if d.eval_source:
        held = tokenize_rows(
            _rows(config, d.eval_source), tokenizer, source=d.eval_source, user_ids=tokenized.user_ids, **options
        )
        train, evaluation, users = tokenized.examples, held.examples, held.user_ids
        offset = 1 + max((e["index"] for e in train), default=-1)
        for e in evaluation:
            e["index"] += offset  # distinct cache keys
        truncated = tokenized.num_truncated + held.num_truncated
        dropped = tokenized.num_dropped + held.num_dropped
        split = f"held-out pairs: {d.eval_source}"
    else:
        has_ids = any(not u.startswith("__row_") for u in tokenized.user_ids)
        if config.em.scope == "user" and not has_ids:
            raise ConfigError(
                f"{d.source}: no user_id column, but em.scope=user needs annotator ids (one latent type per "
                "annotator). Set em.scope=pair (one latent per comparison; gate.type=mlp routes by prompt) "
                "or add a user_id column"
            )
        by_user: dict[int, list[dict]] = {}
        for e in tokenized.examples:  # held-out pairs: a share of each annotator's, or of all pairs without ids
            by_user.setdefault(e["user"] if has_ids else 0, []).append(e)
        rng = random.Random(config.train.seed)
        train, evaluation = [], []
        for examples in by_user.values():
            rng.shuffle(examples)
            n_eval = int(round(d.eval_fraction * len(examples))) if len(examples) > 1 else 0
            evaluation += examples[:n_eval]
            train += examples[n_eval:]
        train.sort(key=lambda e: e["index"])
        evaluation.sort(key=lambda e: e["index"])
        users, truncated, dropped = tokenized.user_ids, tokenized.num_truncated, tokenized.num_dropped
        share = "each annotator's pairs" if has_ids else "all pairs (no user_id column)"
        split = f"held-out pairs: {d.eval_fraction:.0%} of {share}, seed {config.train.seed}"
    if config.gate.encoder:
        attach_encoder_features(config.gate.encoder, train + evaluation)
    dims = {len(e["user_features"]) for e in train if e["user_features"] is not None}
    feature_dim = dims.pop() if len(dims) == 1 else 0
    return PreparedData(train, evaluation, users, truncated, feature_dim, dropped, rows[0].conversational, split)


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


def disable_dropout(model) -> None:
    """Set every dropout probability of the base to 0 (TRL's ``disable_dropout``); LoRA dropout is added later."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def reuse_graph_by_default(mode: str, num_experts: int, schedule: str) -> bool:
    """Whether the E-step reuses the update's forward: it then holds every expert's activations at once, so only
    for K = 1, or heads mode (an expert's activations are its top layers) with K <= 8; never for sparse updates
    (``gumbel`` and ``routed`` run only the drawn expert's forward and backward)."""
    if schedule in ("gumbel", "routed"):
        return False
    return num_experts == 1 or (mode == "heads" and num_experts <= 8)


def build_bank(config: Config, model, device: torch.device):
    e = config.experts
    if config.train.disable_dropout:
        disable_dropout(model)
    model = model.to(device)
    dtype = autocast_dtype(config, device)
    reuse = e.reuse_graph == "true" or (
        e.reuse_graph == "auto" and reuse_graph_by_default(e.mode, e.num_experts, config.em.schedule)
    )
    if e.mode == "independent":
        return IndependentBank(
            model, e.num_experts, init_std=e.init_std, seed=config.train.seed, autocast_dtype=dtype, reuse_graph=reuse
        )
    lora = dict(
        r=e.lora_r,
        alpha=e.lora_alpha,
        dropout=e.lora_dropout,
        init_std=e.init_std,
        seed=config.train.seed,
        reference_adapters=e.reference_adapters,
        autocast_dtype=dtype,
        reuse_graph=reuse,
    )
    if e.mode == "heads":
        if e.target_modules != "all-linear+head":
            lora["target_modules"] = e.target_modules
        return HeadsBank(model, e.num_experts, top_layers=e.top_layers, output_head=e.output_head, **lora)
    return LoRABank(model, e.num_experts, target_modules=e.target_modules, **lora)


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


BUILTIN_MODELS = {"mixture": mixture_bt_model, "pair": mixture_bt_model, "user": user_bt_model}


def resolve_latent_model(config: Config):
    """``em.model``: a built-in short name, ``package.module:name``, or empty for the scope's built-in model."""
    spec = config.em.model or config.em.scope
    model = BUILTIN_MODELS.get(spec) or import_object(spec, "em.model")
    if getattr(model, "max_plate_nesting", None) is None:
        raise ConfigError(
            f"em.model={spec!r}: set `{getattr(model, '__name__', 'model')}.max_plate_nesting = N` on the function "
            "(the number of nested plates its sample sites sit in)"
        )
    return model


def import_object(spec: str, key: str):
    """``package.module:name`` -> the object (the working directory is importable, like ``python -m``)."""
    if ":" not in spec:
        raise ConfigError(f"{key}={spec!r}: expected a built-in name or package.module:name")
    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}={spec!r}: cannot import {module_name!r} ({err})") from None
    if not hasattr(module, name):
        raise ConfigError(f"{key}={spec!r}: module {module_name!r} has no attribute {name!r}")
    return getattr(module, name)


@dataclass
class Run:
    """Everything ``train``, ``eval`` and ``generate`` share: built once, from one config, by :func:`build_run`."""

    config: Config
    tokenizer: object
    base: object
    data: PreparedData
    bank: object
    gate: Router
    model: object  # the latent preference model (a Pyro function)
    guide: object = None  # em.guide: a Pyro guide (an nn.Module's parameters train with the rest)


def build_run(config: Config, device: torch.device, saved: Path | None = None) -> Run:
    """Tokenizer and base model, validated and tokenized data, expert bank, gate and latent model.

    ``saved``: a run directory; its ``base/`` and ``data.json`` replace the config's model and data sources.
    """
    model = resolve_latent_model(config)
    saved_base = saved / "base" if saved is not None and (saved / "base").exists() else None
    tokenizer, base = build_base(config, saved_base)
    if saved is not None and (saved / DATA_FILE).exists():
        data = PreparedData.load(saved / DATA_FILE)
    else:
        data = prepare_data(config, tokenizer)  # validates every row first: errors leave nothing behind
    bank = build_bank(config, base, device)
    gate = build_gate(config, gate_feature_dim(config, base, data), len(data.user_ids), data.user_feature_dim)
    guide = build_guide(config, base)
    if isinstance(guide, torch.nn.Module):
        guide = guide.to(bank.device)
    return Run(config, tokenizer, base, data, bank, gate.to(bank.device), model, guide)
