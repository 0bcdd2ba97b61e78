"""Typed run configuration: dataclasses, YAML files, ``section.key=value`` overrides; unknown keys fail.

moedpo train --config examples/configs/builtin_user_lora.yaml experts.num_experts=3 train.max_steps=100
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    name_or_path: str = "builtin"  # builtin (tiny Llama) | scratch (BPE + Llama + SFT on the data) | hub | folder
    hidden_size: int = 64  # builtin only
    num_layers: int = 2  # builtin only
    dtype: str = "float32"  # weights: float32 | bfloat16 | float16
    trust_remote_code: bool = False  # only if you trust the model repository's code


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin | builtin:domain | builtin:rankings | reviews | a local file | datasets name
    split: str = "train"  # datasets split (hub names and folders)
    eval_source: str | None = None  # held-out file; default: eval_fraction of each annotator's pairs
    eval_fraction: float = 0.25  # share of each annotator's pairs held out (of all pairs without user_id)
    max_length: int | None = 256  # tokens of prompt + completion (TRL); longer prompts are dropped under keep_start
    max_prompt_length: int | None = None  # keep the last N prompt tokens (moedpo only; TRL 1.16 has none)
    truncation_mode: str = "keep_start"  # keep_start | keep_end (TRL)
    annotators_per_type: int = 10  # built-in worlds (builtin, reviews)
    pairs_per_annotator: int = 40  # built-in worlds (30 train + 10 held-out pairs each with eval_fraction 0.25)
    rankings_per_annotator: int = 4  # builtin:rankings: rankings of four completions by each annotator
    objectives: list | None = None  # reviews: the annotator types (default: sentiment, informativeness, grammar)
    pretrain_reviews: int = 3000  # reviews: unlabelled reviews a scratch reference is pretrained on
    allow_unknown_tokens: bool = False  # train although over 2% of the tokens are the tokenizer's unknown token


@dataclass
class ExpertsConfig:
    mode: str = "lora"  # lora | heads | independent
    num_experts: Any = 2  # K: expert policies (latent annotator types) | auto (chosen by held-out NLL, 1..max_experts)
    max_experts: int = 4  # num_experts=auto: the largest K tried (at most the training annotators, user scope)
    lora_r: int = 8  # LoRA rank of each expert
    lora_alpha: int = 16  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input, in the update only
    target_modules: Any = "all-linear+head"  # PEFT names/regex; all-linear+head adds the output head
    output_head: bool = True  # heads mode: each expert also owns a LoRA on the output head
    top_layers: int = 1  # heads mode: decoder layers each expert owns
    init_std: float = 0.05  # distinct expert initialisation (LoRA B noise); larger collapses annotators with many pairs
    reference_adapters: list | None = None  # per-expert reference pi_ref(k): one PEFT adapter folder per expert
    reuse_graph: str = "auto"  # E-step on the update's forward: auto (K=1, heads K<=8, batched; not sparse)|true|false
    batched: str = "auto"  # K>1 LoRA experts' rows in one grouped pass (all K's activations at once) | true | false


@dataclass
class GateConfig:
    type: str = "fixed"  # fixed (Mix-DPO) | mlp (MoE-DPO on prompt features) | user (user-id embedding)
    closed_form: bool = True  # fixed gate: w = running mean of the responsibilities
    momentum: float = 0.9  # closed-form gate: w <- momentum * w + (1 - momentum) * mean posterior
    hidden: int = 64  # hidden width of the mlp / user gate network
    encoder: str | None = None  # prompt features from a sentence encoder (name/folder) instead of the base
    user_features: bool = False  # user gate: also read the user_features column


@dataclass
class EMConfig:
    schedule: str = "em"  # em (exact E-step) | svi (ELBO) | gumbel (sparse, exact draws) | routed (sparse, z ~ guide)
    scope: str = "user"  # user (one latent per annotator) | pair (one latent per comparison)
    model: str | None = None  # latent model: mixture | user | package.module:name (default: the scope's built-in)
    guide: str | None = None  # amortized (q(z | x, y+, y-); any schedule) | package.module:name (svi, routed)
    exact_every: int = 10  # routed: every N-th step is a dense exact EM step (keeps the guide honest; 0: never)
    exact_warmup: int = 20  # routed: the first N steps are dense exact EM steps (the experts separate first)
    beta: float = 0.5  # DPO beta: KL strength; reward difference = beta * margin
    label_smoothing: float = 0.0  # robust / conservative DPO link, in [0, 0.5)
    init: str = "auto"  # data (annotators clustered by their pairs' token contrasts) | symmetric | auto (user: data)
    init_steps: int = 30  # data init: E-steps whose prior leans on the clusters, with a weight falling to 0
    restarts: int = 1  # short runs from different starts (the em.init one, then random partitions); best continues
    restart_steps: int = 30  # steps of each restart and of each K under num_experts=auto (ranked by held-out NLL)
    m_steps: int = 1  # M-step updates per E-step (the learning-rate schedule counts EM steps)
    load_balance: float = 0.0  # weight of the Switch-style load-balancing term on the gate
    usage_entropy: float = 0.0  # weight of -H(mean gate weights): spreads use over experts


@dataclass
class TrainConfig:
    output_dir: str = "runs/moedpo-{time}"  # {time} becomes the start time, so reruns never collide
    overwrite: bool = False  # replace a non-empty train.output_dir
    seed: int = 0  # data split, batches, initialisation
    max_steps: int = 150  # EM steps (each: one E-step and em.m_steps updates)
    learning_rate: float = 1e-2  # AdamW learning rate (experts and gate)
    weight_decay: float = 0.0  # AdamW weight decay
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant (TRL's name; was lr_scheduler)
    warmup_steps: int = 10  # linear learning-rate warmup, in EM steps
    per_device_train_batch_size: int = 16  # pairs per step on each process (pair scope; TRL's name; was batch_size)
    users_per_batch: int = 2  # annotators per step over all processes, all their pairs (user scope)
    gradient_accumulation_steps: int = 1  # micro-batches per update (the loss is normalised globally)
    max_grad_norm: float | None = 1.0  # gradient clipping (empty: none)
    loss_type: str = "sigmoid"  # per-expert DPO loss (TRL names): sigmoid | ipo | hinge | robust
    disable_dropout: bool = True  # as TRL: zero the base model's dropout (experts.lora_dropout still applies)
    bf16: str = "auto"  # auto (bf16 autocast on CUDA) | true | false
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    num_threads: Any = "auto"  # PyTorch CPU threads: auto (the cores other work leaves free now) | N >= 1
    eval_steps: int = 50  # held-out evaluation every N steps (0: only at the end; TRL's name; was eval_every)
    save_steps: int = 25  # checkpoint for --resume every N steps (0: only at the end; was checkpoint_every)
    logging_steps: int = 1  # metrics.jsonl line every N steps (TRL's name; was logging_every)
    report_to: Any = "none"  # also log to: none | tensorboard | wandb | trackio | all (installed), or a list
    load_best_model_at_end: bool = False  # end with the parameters of the best held-out evaluation (RUN/best/)
    metric_for_best_model: str | None = None  # an eval/ metric of moedpo eval (prefix optional); empty: mixture_nll
    greater_is_better: bool | None = None  # empty: lower is better for names ending in loss or nll, else higher
    dpo_baseline: bool = False  # also train one DPO policy (K=1) on the same data, in RUN/dpo, for the report
    parallel: str = "auto"  # auto (DDP under torchrun) | ddp (also in one process: a group of one) | fsdp (FSDP2)
    ddp_timeout: int = 1800  # seconds a process waits in a collective (transformers' name), e.g. while rank 0 reports


@dataclass
class SFTConfig:
    output_dir: str = "runs/sft-{time}"  # moedpo sft: the model folder it writes (model.name_or_path accepts it)
    max_steps: int = 300  # optimizer steps (TRL name); -1: num_train_epochs passes over the data
    num_train_epochs: float = 3.0  # passes over the data when max_steps is -1
    learning_rate: float = 1e-3  # AdamW learning rate (1e-3 suits small models; ~2e-5 full-tuning a large one)
    per_device_train_batch_size: int = 16  # sequences per step
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10  # linear warmup, in steps
    weight_decay: float = 0.0  # AdamW weight decay
    use_peft: bool = False  # LoRA instead of a full fine-tune (merged into the saved model)
    lora_r: int = 16  # LoRA rank when use_peft
    lora_alpha: int = 32  # LoRA scaling numerator when use_peft
    completion_only_loss: bool = True  # loss on the preferred completion only (TRL's default); false: prompt too
    save_steps: int = 100  # checkpoint for --resume every N steps
    logging_steps: int = 10  # metrics.jsonl line every N steps
    scratch_vocab_size: int = 2048  # model.name_or_path=scratch: byte-level BPE vocabulary trained on the data
    scratch_hidden_size: int = 128  # model.name_or_path=scratch: width of the small Llama
    scratch_num_layers: int = 4  # model.name_or_path=scratch: its decoder layers


@dataclass
class ReportConfig:
    rewards: list | None = None  # reward functions for the report's table: reviews names or package.module:name
    num_prompts: int = 500  # held-out prompts the table's generations are sampled for (0: no table)
    max_new_tokens: int = 48  # tokens per sampled completion
    seed: int = 0  # sampling seed: the same run gives the same table


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    em: EMConfig = field(default_factory=EMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


TRACKERS = ("tensorboard", "wandb", "trackio")


def report_to_names(value) -> list[str]:
    """``train.report_to`` as a list: [] for none, ["all"], or tracker names (a list, or a comma-separated string)."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    names = [str(n).strip() for n in names if str(n).strip()] if all(isinstance(n, str) for n in names) else None
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return names
    if names is None or not set(names) <= set(TRACKERS):
        raise ConfigError(
            f"train.report_to={value!r}: expected none, all, or some of {', '.join(TRACKERS)} "
            "(a YAML list, or comma-separated: train.report_to=tensorboard,wandb)"
        )
    return list(dict.fromkeys(names))


def _accepted(section) -> str:
    return ", ".join(f.name for f in dataclasses.fields(section))


def _set(config: Config, dotted: str, value, origin: str) -> None:
    if "." not in dotted:
        raise ConfigError(f"{origin}: {dotted!r} is not of the form section.key; sections: {_accepted(config)}")
    section_name, key = dotted.split(".", 1)
    if section_name not in {f.name for f in dataclasses.fields(config)}:
        raise ConfigError(f"{origin}: unknown section {section_name!r}; accepted: {_accepted(config)}")
    section = getattr(config, section_name)
    if key not in {f.name for f in dataclasses.fields(section)}:
        raise ConfigError(f"{origin}: unknown key {dotted!r}; accepted {section_name}.*: {_accepted(section)}")
    setattr(section, key, _coerce(section, key, value, origin))


def _coerce(section, key, value, origin):
    """Check and convert a value to the field's declared type (YAML reads 2e-3 as a string, for one)."""
    kind = next(f.type for f in dataclasses.fields(section) if f.name == key)
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if value is None:
        if "None" in kind or kind == "Any":
            return None
        raise ConfigError(f"{origin}: {key} cannot be empty (expected {kind})")
    base = kind.split("|")[0].strip()
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        if base == "str":
            return str(value).lower() if isinstance(value, bool) else str(value)  # YAML reads `true` as a bool
        if base == "list" and isinstance(value, list):
            return value
        if base == "Any":
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(
        f"{origin}: {type(section).__name__.removesuffix('Config').lower()}.{key}={value!r}: expected {kind}"
    )


# Old names of the keys TRL's DPOConfig also has: accepted, with one FutureWarning, for one release (0.1 -> 0.2).
RENAMED = {
    "train.batch_size": "train.per_device_train_batch_size",
    "train.eval_every": "train.eval_steps",
    "train.checkpoint_every": "train.save_steps",
    "train.logging_every": "train.logging_steps",
    "train.lr_scheduler": "train.lr_scheduler_type",
}


def _file_entries(path: str | Path) -> list[tuple[str, Any]]:
    """(section.key, value) of a YAML config file, in its order."""
    if not Path(path).is_file():
        what = "a directory" if Path(path).is_dir() else "not found"
        raise ConfigError(f"--config {path}: {what}; expected a YAML file (see examples/configs/)")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable YAML file ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    entries = []
    for section_name, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section_name!r} must be a mapping; sections: {_accepted(Config())}")
        entries += [(f"{section_name}.{key}", value) for key, value in values.items()]
    return entries


def _override_entries(overrides) -> list[tuple[str, Any]]:
    entries = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.max_steps=50")
        key, raw = item.split("=", 1)
        entries.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return entries


def _renamed(entries: list[tuple[str, Any]], origin: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """(entries with TRL's key names, the old names they used); one source naming a key both ways is refused."""
    given = {key for key, _ in entries}
    for old, new in RENAMED.items():
        if old in given and new in given:
            raise ConfigError(f"{origin}: both {old} (its old name) and {new} are given; keep only {new}")
    return [(RENAMED.get(key, key), value) for key, value in entries], [key for key in given if key in RENAMED]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as YAML scalars). The old
    names of keys TRL has (:data:`RENAMED`) still load, with one FutureWarning naming the new ones."""
    config, old = Config(), {}
    sources = [(str(path), _file_entries(path))] if path is not None else []
    for origin, entries in [*sources, ("override", _override_entries(overrides))]:
        entries, used = _renamed(entries, origin)
        old.update({key: origin for key in sorted(used) if key not in old})
        for key, value in entries:
            _set(config, key, value, origin)
    if old:
        warnings.warn(
            f"{', '.join(f'{k} ({where})' for k, where in old.items())}: old name(s), accepted until the next release;"
            f" use {', '.join(RENAMED[k] for k in old)} (TRL's names). A run's saved config.yaml is rewritten with the"
            " new names by --resume; any other file: moedpo config --config OLD.yaml > NEW.yaml",
            FutureWarning,
            stacklevel=2,
        )
    validate(config)
    return config


CHOICES = {
    ("experts", "mode"): ("lora", "heads", "independent"),
    ("gate", "type"): ("fixed", "mlp", "user"),
    ("em", "schedule"): ("em", "svi", "gumbel", "routed"),
    ("em", "scope"): ("user", "pair"),
    ("em", "init"): ("auto", "data", "symmetric"),
    ("train", "lr_scheduler_type"): ("cosine", "linear", "constant"),
    ("data", "truncation_mode"): ("keep_start", "keep_end"),
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("train", "loss_type"): ("sigmoid", "ipo", "hinge", "robust"),
    ("experts", "reuse_graph"): ("auto", "true", "false"),
    ("experts", "batched"): ("auto", "true", "false"),
    ("train", "bf16"): ("auto", "true", "false"),
    ("sft", "lr_scheduler_type"): ("cosine", "linear", "constant"),
    ("train", "parallel"): ("auto", "ddp", "fsdp"),
}


def _validate_auto_k(config: Config) -> None:
    e, k = config.experts, config.experts.num_experts
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"experts.num_experts={k!r}: expected an integer >= 1, or auto")
    if k != "auto":
        return
    problems = [
        (e.max_experts >= 2, f"experts.max_experts={e.max_experts!r}: expected an integer >= 2"),
        (1 <= config.em.restart_steps < config.train.max_steps,
         f"em.restart_steps={config.em.restart_steps!r}: each K runs that many steps; expected [1, train.max_steps)"),
        (bool(config.data.eval_fraction or config.data.eval_source),
         "it compares K on held-out pairs: set data.eval_fraction > 0 or data.eval_source"),
        (not e.reference_adapters, "experts.reference_adapters names one adapter per expert: set num_experts"),
    ]  # fmt: skip
    for ok, problem in problems:
        if not ok:
            raise ConfigError(f"experts.num_experts=auto: {problem}")


def validate(config: Config) -> None:
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}={value!r}: expected one of {choices}")
    _validate_auto_k(config)
    checks = [
        (config.em.m_steps >= 1, "em.m_steps", "an integer >= 1"),
        (config.em.init_steps >= 0, "em.init_steps", "an integer >= 0"),
        (config.em.restarts >= 1, "em.restarts", "an integer >= 1 (1: no restarts)"),
        (
            config.em.restarts == 1 or 1 <= config.em.restart_steps < config.train.max_steps,
            "em.restart_steps",
            "an integer in [1, train.max_steps) when em.restarts > 1",
        ),
        (config.em.beta > 0, "em.beta", "a number > 0 (the KL strength; DPO papers use 0.1-0.5)"),
        (0 <= config.em.label_smoothing < 0.5, "em.label_smoothing", "a number in [0, 0.5)"),
        (0 <= config.data.eval_fraction < 1, "data.eval_fraction", "a number in [0, 1)"),
        (0 <= config.experts.lora_dropout < 1, "experts.lora_dropout", "a number in [0, 1)"),
        (config.train.max_steps >= 1, "train.max_steps", "an integer >= 1"),
        (config.train.ddp_timeout > 0, "train.ddp_timeout", "seconds > 0"),
        (config.train.learning_rate >= 0, "train.learning_rate", "a number >= 0"),
        (config.train.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "an integer >= 1"),
        (config.train.per_device_train_batch_size >= 1, "train.per_device_train_batch_size", "an integer >= 1"),
        (config.train.users_per_batch >= 1, "train.users_per_batch", "an integer >= 1"),
        (config.train.logging_steps >= 1, "train.logging_steps", "an integer >= 1"),
        (config.train.eval_steps >= 0, "train.eval_steps", "an integer >= 0 (0: only at the end)"),
        (config.train.save_steps >= 0, "train.save_steps", "an integer >= 0 (0: only at the end)"),
        (config.sft.max_steps == -1 or config.sft.max_steps >= 1, "sft.max_steps", "an integer >= 1, or -1"),
        (config.sft.per_device_train_batch_size >= 1, "sft.per_device_train_batch_size", "an integer >= 1"),
        (config.report.num_prompts >= 0, "report.num_prompts", "an integer >= 0"),
        (config.data.pretrain_reviews >= 1, "data.pretrain_reviews", "an integer >= 1"),
        (config.sft.scratch_vocab_size >= 300, "sft.scratch_vocab_size", "an integer >= 300 (256 bytes + merges)"),
    ]
    for ok, key, expected in checks:
        if not ok:
            value = getattr(getattr(config, key.split(".")[0]), key.split(".")[1])
            raise ConfigError(f"{key}={value!r}: expected {expected}")
    report_to_names(config.train.report_to)
    threads = config.train.num_threads
    if threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"train.num_threads={threads!r}: expected auto or an integer >= 1")
    if config.experts.batched == "true" and config.experts.mode == "independent":
        raise ConfigError("experts.batched=true groups LoRA experts (lora, heads); independent experts are K models")
    if config.train.load_best_model_at_end and config.train.parallel == "fsdp":
        raise ConfigError(
            "train.load_best_model_at_end=true with train.parallel=fsdp: not supported yet (it keeps the best step's "
            "whole parameters); use train.parallel=auto or ddp, or compare the saved checkpoints"
        )
    if config.train.load_best_model_at_end and not config.train.eval_steps:
        raise ConfigError("train.load_best_model_at_end=true compares held-out evaluations: set train.eval_steps > 0")
    if config.train.load_best_model_at_end and not (config.data.eval_fraction or config.data.eval_source):
        raise ConfigError(
            "train.load_best_model_at_end=true needs held-out pairs: data.eval_fraction > 0 or data.eval_source"
        )
    if config.train.loss_type != "sigmoid" and config.em.schedule != "em":
        raise ConfigError(f"train.loss_type={config.train.loss_type!r} needs em.schedule=em (the q-weighted TRL loss)")
    em = config.em
    if em.schedule == "routed" and not em.guide:
        raise ConfigError("em.schedule=routed draws each unit's expert from a guide: set em.guide=amortized")
    if em.guide and em.guide != "amortized" and ":" not in em.guide:
        raise ConfigError(f"em.guide={em.guide!r}: expected amortized, or your own guide as package.module:name")
    if em.guide and em.guide != "amortized" and em.schedule not in ("svi", "routed"):
        raise ConfigError(
            f"em.guide={em.guide!r}: a Pyro guide of your own is used by em.schedule=svi or routed (em and gumbel "
            "use the exact posterior; em.guide=amortized trains alongside any schedule)"
        )
    if em.guide == "amortized" and em.model not in (None, "", "mixture", "pair", "user"):
        raise ConfigError(
            f"em.guide=amortized fits the built-in models' one latent site z; em.model={em.model!r} is your own: "
            "pass your own guide as em.guide=package.module:name"
        )
    for key in ("exact_every", "exact_warmup"):
        if getattr(em, key) < 0:
            raise ConfigError(f"em.{key}={getattr(em, key)!r}: expected an integer >= 0")
    if config.em.scope == "user" and config.gate.type == "mlp":
        raise ConfigError(
            "gate.type=mlp reads prompt features, which differ between one annotator's pairs; "
            "with em.scope=user use gate.type=fixed or gate.type=user"
        )


def save_config(config: Config, path: Path, notes: tuple[str, ...] = ()) -> None:
    header = f"# resolved moedpo config; rerun with: moedpo train --config {path}\n"
    header += "".join(f"# {note}\n" for note in notes)
    path.write_text(header + yaml.safe_dump(config.to_dict(), sort_keys=False))


def _field_help(section_cls) -> dict[str, str]:
    """One-line meanings of a section's keys: the comments beside the fields in this file (one source)."""
    import inspect
    import re

    helps = {}
    for line in inspect.getsource(section_cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if match:
            helps[match.group(1)] = match.group(2)
    return helps


def describe(config: Config) -> str:
    """Every key as commented YAML: value (the resolved one), type and meaning; loadable as a config file."""
    lines = ["# moedpo config: every key, its value, type and meaning (save it and pass it with --config)"]
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        helps = _field_help(type(values))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(values):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            value = yaml.safe_dump(getattr(values, f.name), default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {f.name}: {value}  # {kind}; {helps.get(f.name, '')}".rstrip("; "))
    return "\n".join(lines) + "\n"
