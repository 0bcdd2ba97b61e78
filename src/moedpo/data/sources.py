"""Rows of a data source, checked, and the one tokenization of rows with a run's ``data.*`` options.

Every route that turns rows into examples (training and its held-out file, ``moedpo eval --data``,
``moedpo personalize``, the SFT of a reference) calls :func:`tokenize_data`, so they all truncate, drop and
count as training does. ``data.source: reviews`` is not read here: its pairs are sampled from a reference
policy (:mod:`moedpo.reference.reviews`, which receives the reference); its unlabelled pretraining reviews are.
"""

from __future__ import annotations

from moedpo.config import Config, DataConfig
from moedpo.data import reviews_world
from moedpo.data.builtin import make_builtin_rows
from moedpo.data.builtin_rankings import make_builtin_ranking_rows
from moedpo.data.formats import PreferenceDataError, PreferenceRow
from moedpo.data.loading import load_preference_rows
from moedpo.data.ranking_rows import RankingRow, normalise_record
from moedpo.data.tokenize import Tokenized, tokenize_rows

SAMPLED_SOURCES = ("reviews",)  # pairs sampled from a reference policy: built by the reference stage


def source_rows(config: Config, source: str) -> list[PreferenceRow]:
    """The rows of ``source``: a built-in world, a local file or a ``datasets`` name (not a sampled source)."""
    if source in SAMPLED_SOURCES:
        raise ValueError(f"{source}: its pairs are sampled from a reference (moedpo.reference.reviews)")
    if source == "builtin:rankings":
        raw = make_builtin_ranking_rows(
            config.data.annotators_per_type, config.data.rankings_per_annotator, seed=config.train.seed
        )
        return normalised(raw, source)
    if source.startswith("builtin"):
        raw = make_builtin_rows(
            config.data.annotators_per_type,
            config.data.pairs_per_annotator,
            domain_reveals_type=source == "builtin:domain",
            seed=config.train.seed,
        )
        return normalised(raw, source)
    return load_preference_rows(source, config.data.split)


def normalised(records: list, source: str) -> list[PreferenceRow | RankingRow]:
    """Records in TRL's formats or rankings (or rows already read) as checked rows; errors name ``source``'s row."""
    rows = (PreferenceRow, RankingRow)
    return [r if isinstance(r, rows) else normalise_record(r, source, i) for i, r in enumerate(records)]


def reference_rows(config: Config) -> list[PreferenceRow]:
    """Rows a reference policy is fine-tuned on (``moedpo sft``, ``scratch``): the data's own, except in the
    reviews world, whose preference pairs are sampled from the reference (it learns from unlabelled reviews)."""
    if config.data.source == "reviews":
        return normalised(reviews_world.pretraining_rows(config), "reviews")
    return source_rows(config, config.data.source)


def check_consistent(rows: list[PreferenceRow], source: str) -> None:
    """One format per file, and annotator ids on every row or none (a blank id would be an annotator of its own)."""
    ranking = isinstance(rows[0], RankingRow)
    mixed = next((i for i, r in enumerate(rows) if isinstance(r, RankingRow) != ranking), None)
    if mixed is not None:
        kinds = ("a pair (chosen/rejected)", "a ranking (completions)")
        problem = f"{kinds[not ranking]}, while row 1 is {kinds[ranking]}: use one kind of row per file"
        raise PreferenceDataError(source, mixed, "completions" if not ranking else "chosen", problem)
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


def tokenize_data(
    rows: list, tokenizer, data: DataConfig, *, source: str, user_ids: list[str] | None = None
) -> Tokenized:
    """TRL-exact tokenization of ``rows`` (PreferenceRows, or records in TRL's formats) with the ``data.*``
    options: ``max_length``, ``max_prompt_length``, ``truncation_mode``."""
    return tokenize_rows(
        normalised(rows, source),
        tokenizer,
        source=source,
        max_length=data.max_length,
        max_prompt_length=data.max_prompt_length,
        truncation_mode=data.truncation_mode,
        user_ids=user_ids,
    )
