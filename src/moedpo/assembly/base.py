"""The run's base model and tokenizer: ``builtin``, ``scratch`` (built from the data by the reference stage), a
local folder or a hub name."""

from __future__ import annotations

from pathlib import Path

from moedpo.config import Config
from moedpo.data.sources import reference_rows
from moedpo.experts.loading import DTYPES, builtin_base, load_pretrained, with_pad_token
from moedpo.reference.scratch import scratch_reference


def base_name(config: Config) -> str:
    """The model folder or hub name the config names: ``scratch`` resolves to its cached (or new) build."""
    if config.model.name_or_path == "scratch":  # no model at all: tokenizer, small Llama and SFT on the data
        return str(scratch_reference(config, reference_rows(config)))
    return config.model.name_or_path


def build_base(config: Config, saved_base: Path | None = None):
    """(tokenizer, causal LM) in ``model.dtype``. ``saved_base``: a run's own ``base/`` folder instead."""
    name = str(saved_base) if saved_base is not None else base_name(config)
    if name == "builtin":
        m = config.model
        tokenizer, model = builtin_base(m.hidden_size, m.num_layers, config.train.seed)
        tokenizer = with_pad_token(tokenizer)
    else:
        tokenizer, model = load_pretrained(name, config.model.dtype, config.model.trust_remote_code)
    return tokenizer, model.to(DTYPES[config.model.dtype])
