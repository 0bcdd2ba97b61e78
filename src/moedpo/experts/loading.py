"""Load a base causal LM and its tokenizer: the built-in tiny Llama, a local folder or a hub name; devices.

Hub names load only from the local cache when the hub is unreachable (an uncached name fails at once instead of
retrying for a minute); ``trust_remote_code`` is off unless the caller turns it on.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from moedpo.config import ConfigError
from moedpo.data.builtin import tiny_causal_lm, train_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: this torch build sees no CUDA device; use train.device=auto or cpu")
    return torch.device(name)


def autocast_dtype(bf16: str, device: torch.device):
    """``train.bf16``: bfloat16 autocast when true, or on CUDA when auto."""
    wanted = str(bf16).lower()
    if wanted == "true" or (wanted == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def builtin_base(hidden_size: int, num_layers: int, seed: int):
    """(tokenizer, causal LM) of the built-in world: a locally trained tokenizer and a tiny Llama from a config."""
    tokenizer = train_tokenizer()
    model = tiny_causal_lm(len(tokenizer), hidden_size, num_layers, seed=seed, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, model


def load_pretrained(name: str, dtype: str = "float32", trust_remote_code: bool = False):
    """(tokenizer, causal LM) from a local folder or a hub name; a clear error when it cannot be loaded."""
    check_model_name(name)
    local = cached_or_local(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, local_files_only=local
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.name_or_path={name!r}: could not load it ({first}). Use a local folder with config.json, "
            "or a hub name already in the cache with HF_HUB_OFFLINE=1 (no network here), or `builtin`"
        ) from None
    return with_pad_token(tokenizer), model


def with_pad_token(tokenizer):
    """A tokenizer without a pad token pads with EOS (TRL's habit)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def cached_or_local(name: str) -> bool:
    """Whether ``name`` loads without the network (a folder, or a hub name in the local cache). An uncached hub name
    with the hub unreachable fails at once (the hub client would retry for over a minute)."""
    if Path(name).expanduser().is_dir() or isinstance(try_to_load_from_cache(name, "config.json"), str):
        return True
    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise ConfigError(
            f"model.name_or_path={name!r}: not in the local cache and the hub is unreachable. Use a local folder "
            "with config.json, download it where there is network, or `builtin`"
        )
    return False


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model_name(name: str) -> None:
    """A name that looks like a path must be an existing folder (else transformers reports a hub-name error)."""
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub names are org/name
    if (looks_local or path.exists()) and not path.is_dir():
        what = "a file, not a model folder" if path.exists() else "no such folder"
        raise ConfigError(f"model.name_or_path={name!r}: {what} (expected a folder with config.json, or a hub name)")
    if path.is_dir() and (path / "config.yaml").exists() and not (path / "config.json").exists():
        base = f"{path / 'base'}" if (path / "base").exists() else "the model.name_or_path in its config.yaml"
        raise ConfigError(
            f"model.name_or_path={name!r}: a moedpo run directory, not a model folder. Its base model is {base}; "
            f"continue the run with `moedpo train --config {path / 'config.yaml'} --resume`"
        )
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        raise ConfigError(
            f"model.name_or_path={name!r}: a PEFT adapter folder (one expert), not a model. Its base model is "
            f"{adapter_base(path)!r}; to start from this expert, merge it into a standalone model first: "
            "`moedpo export RUN --merged` writes RUN/merged/expert_N, which model.name_or_path accepts"
        )


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model of a PEFT adapter folder: its ``base_model_name_or_path``, a relative path taken from the
    adapter folder (moedpo writes ``../../base`` for a run's own base, so a moved run directory still works; PEFT's
    ``AutoPeftModel*`` would read it from the working directory), else as written (a hub name or absolute folder)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}: records no base_model_name_or_path; the base model it was trained on is unknown")
    local = Path(adapter_dir) / base
    return str(local.resolve()) if not Path(base).is_absolute() and local.is_dir() else base
