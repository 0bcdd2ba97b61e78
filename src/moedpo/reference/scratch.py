"""``model.name_or_path: scratch``, for people with no model at all: a byte-level BPE tokenizer trained on the
data's own texts, a small Llama built from a config, and SFT on the data (prompt tokens included,
:mod:`.finetune`). The result is cached by a hash of the texts and of every setting that shapes it, so a second
run over the same data reuses it and a changed setting builds anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moedpo.config import Config
from moedpo.data.formats import PreferenceRow
from moedpo.reference.finetune import fine_tune

SPECIAL = ["<pad>", "<s>", "</s>"]
# sft.* keys that do not change the model a build makes: where it is written, how often it logs or saves, and
# completion_only_loss (a scratch build always learns the prompts too)
NOT_IN_KEY = ("output_dir", "save_steps", "logging_steps", "completion_only_loss")


def cache_root() -> Path:
    """Where built references and sampled data are kept (``MOEDPO_CACHE``, default ~/.cache/moedpo)."""
    return Path(os.environ.get("MOEDPO_CACHE", Path.home() / ".cache" / "moedpo"))


def texts_of(rows: list[PreferenceRow]) -> list[str]:
    """Every prompt, chosen and rejected text (a ranking's completions; message contents of chat rows), in order."""
    texts = []
    for row in rows:
        completions = row.completions if hasattr(row, "completions") else (row.chosen, row.rejected)
        parts = (row.prompt, *completions)
        for part in parts:
            if isinstance(part, list):
                texts += [m["content"] for m in part]
            elif part:
                texts.append(part)
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts`` (no BOS; EOS ``</s>``, pad ``<pad>``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast


def small_llama(config: Config, tokenizer) -> LlamaForCausalLM:
    s, hidden = config.sft, config.sft.scratch_hidden_size
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=int(2.75 * hidden),
            num_hidden_layers=s.scratch_num_layers,
            num_attention_heads=max(1, hidden // 32),
            num_key_value_heads=max(1, hidden // 64),
            max_position_embeddings=max(512, config.data.max_length or 0),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
    )


def scratch_key(config: Config, texts: list[str]) -> str:
    """The cache key: the texts, every sft.* setting that shapes the build, the data.* tokenization and the seed."""
    settings = {k: v for k, v in dataclasses.asdict(config.sft).items() if k not in NOT_IN_KEY}
    d = config.data
    settings.update(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation_mode=d.truncation_mode,
        seed=config.train.seed,
    )
    return hashlib.sha256(json.dumps([texts, settings], sort_keys=True).encode()).hexdigest()[:16]


def _build(config: Config, rows: list[PreferenceRow], texts: list[str], folder: Path) -> None:
    print(
        f"moedpo: no model given (scratch): BPE tokenizer on {len(texts)} texts, small Llama, SFT on the data",
        file=sys.stderr,
    )
    torch.manual_seed(config.train.seed)
    tokenizer = train_bpe_tokenizer(texts, config.sft.scratch_vocab_size)
    model = small_llama(config, tokenizer)
    # a model from nothing learns the prompts' language too, not only the completions'
    pretrain = dataclasses.replace(config, sft=dataclasses.replace(config.sft, completion_only_loss=False))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fine_tune(pretrain, tokenizer, model, rows, tmp, desc="scratch reference")
    if folder.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)


def scratch_reference(config: Config, rows: list[PreferenceRow]) -> Path:
    """The cached scratch reference for ``rows`` (the reference rows) and these settings: built on first use."""
    texts = texts_of(rows)
    folder = cache_root() / "scratch" / scratch_key(config, texts)
    if (folder / "config.json").exists():
        print(f"moedpo: scratch reference from the cache: {folder}", file=sys.stderr)
        return folder
    with torch.random.fork_rng(devices=[]):  # building it must not change what the run draws after it
        _build(config, rows, texts, folder)
    return folder
