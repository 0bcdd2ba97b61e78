"""The run's data: rows of ``data.source`` (the reviews world's sampled from the reference), validated,
tokenized with the ``data.*`` options, split into training and held-out pairs, with sentence-encoder features
for the gate when ``gate.encoder`` is set."""

from __future__ import annotations

from moedpo.assembly.base import base_name
from moedpo.config import Config, ConfigError
from moedpo.data.encoder import encode_prompts, load_encoder
from moedpo.data.formats import PreferenceDataError, PreferenceRow
from moedpo.data.prepared import UNKNOWN_LIMIT, PreparedData, held_out_split, unknown_token_share, user_feature_width
from moedpo.data.ranking_rows import RankingRow
from moedpo.data.sources import SAMPLED_SOURCES, check_consistent, normalised, source_rows, tokenize_data
from moedpo.reference.reviews import annotated_rows


def load_rows(config: Config, source: str) -> list[PreferenceRow]:
    """``source``'s rows; ``reviews`` hands the run's reference to the annotation stage, which samples from it."""
    if source not in SAMPLED_SOURCES:
        return source_rows(config, source)
    if config.model.name_or_path == "builtin":
        raise ConfigError(
            "data.source=reviews needs a model that writes English, and the builtin one knows ~60 words: set "
            "model.name_or_path=scratch (pretrained here from the world's reviews), a local folder or a hub name"
        )
    return normalised(annotated_rows(config, base_name(config)), source)


def prepare_data(config: Config, tokenizer) -> PreparedData:
    """Load, validate and tokenize; split each annotator's pairs into train / held-out unless eval_source is set."""
    d = config.data
    rows = load_rows(config, d.source)
    check_consistent(rows, d.source)
    tokenized = tokenize_data(rows, tokenizer, d, source=d.source)
    _check_known_tokens(config, tokenizer, tokenized.examples)
    unit = "rankings" if isinstance(rows[0], RankingRow) else "pairs"
    if d.eval_source:
        held_rows = load_rows(config, d.eval_source)
        if isinstance(held_rows[0], RankingRow) != (unit == "rankings"):
            other = "pairs" if unit == "rankings" else "rankings"
            raise PreferenceDataError(
                d.eval_source, 0, "completions" if other == "rankings" else "chosen",
                f"holds {other}, while data.source={d.source} holds {unit}: give held-out {unit} "
                "(`moedpo eval RUN --data FILE` evaluates a run on the other kind)",
            )  # fmt: skip
        held = tokenize_data(held_rows, tokenizer, d, source=d.eval_source, user_ids=tokenized.user_ids)
        train, evaluation, users = tokenized.examples, held.examples, held.user_ids
        offset = 1 + max((e["index"] for e in train), default=-1)
        for e in evaluation:
            e["index"] += offset  # distinct cache keys
        truncated = tokenized.num_truncated + held.num_truncated
        dropped = tokenized.num_dropped + held.num_dropped
        split = f"held-out {unit}: {d.eval_source}"
    else:
        has_ids = any(not u.startswith("__row_") for u in tokenized.user_ids)
        if config.em.scope == "user" and not has_ids:
            raise ConfigError(
                f"{d.source}: no user_id column, but em.scope=user needs annotator ids (one latent type per "
                "annotator). Set em.scope=pair (one latent per comparison; gate.type=mlp routes by prompt) "
                "or add a user_id column"
            )
        train, evaluation = held_out_split(tokenized.examples, has_ids, d.eval_fraction, config.train.seed)
        users, truncated, dropped = tokenized.user_ids, tokenized.num_truncated, tokenized.num_dropped
        share = f"each annotator's {unit}" if has_ids else f"all {unit} (no user_id column)"
        split = f"held-out {unit}: {d.eval_fraction:.0%} of {share}, seed {config.train.seed}"
    if config.gate.encoder:
        attach_encoder_features(config.gate.encoder, train + evaluation)
    width = user_feature_width(train + evaluation)
    if config.gate.user_features and not width:
        raise ConfigError(_feature_problem(train + evaluation, d.source))
    return PreparedData(train, evaluation, users, truncated, width or 0, dropped, rows[0].conversational, split)


def _check_known_tokens(config: Config, tokenizer, examples: list[dict]) -> None:
    """Refuse data the tokenizer cannot read (the built-in world's 60-word tokenizer on a user's own text)."""
    share = unknown_token_share(examples, tokenizer.unk_token_id)
    if share > UNKNOWN_LIMIT and not config.data.allow_unknown_tokens:
        raise ConfigError(
            f"{config.data.source}: {share:.0%} of the tokens are {tokenizer.unk_token!r} (unknown) for the tokenizer "
            f"of model.name_or_path={config.model.name_or_path}: the model would learn from lengths, not words. Use "
            "model.name_or_path=scratch (a tokenizer and small model trained on your text), a local model folder or "
            "a hub name; or data.allow_unknown_tokens=true to train anyway"
        )


def _feature_problem(examples: list[dict], source: str) -> str:
    missing = next((e for e in examples if e["user_features"] is None), None)
    if missing is not None:
        where = f"row {missing['index'] + 1} has none" if any(e["user_features"] for e in examples) else "no row has it"
        return (f"gate.user_features=true reads the user_features column, but in {source} {where}: give every row "
                "a list of numbers of one length, or set gate.user_features=false")  # fmt: skip
    widths = [len(e["user_features"]) for e in examples]
    usual = max(set(widths), key=widths.count)
    odd = next(e for e, w in zip(examples, widths) if w != usual)
    return (f"gate.user_features=true: user_features in {source} have {sorted(set(widths))} numbers (row "
            f"{odd['index'] + 1} has {len(odd['user_features'])}, most rows {usual}); give every row a list of one "
            "length")  # fmt: skip


def attach_encoder_features(encoder_name: str, examples: list[dict]) -> int:
    """Store each example's sentence-encoder prompt embedding under "prompt_features"; returns its width."""
    features = encode_prompts(load_encoder(encoder_name), [e["prompt_text"] for e in examples])
    for e, row in zip(examples, features):
        e["prompt_features"] = row
    return features.shape[1]
