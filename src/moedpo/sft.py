"""A reference policy from the data: supervised fine-tuning on prompts and preferred completions.

The DPO paper's answer when no SFT model exists ("preferred-FT"): maximise log pi(y+ | x) over the preference
data, then use the result as pi_ref. ``moedpo sft --config FILE [key=value]`` fine-tunes ``model.name_or_path``
(builtin, a local folder or a hub name; full, or LoRA merged back with ``sft.use_peft``) on ``data.source`` and
writes a Hugging Face model folder (``config.json``, weights, tokenizer) that ``model.name_or_path`` accepts.
Sequences are tokenized exactly as DPO training tokenizes prompt + chosen (TRL 1.16), and the loss is on the
completion tokens (``sft.completion_only_loss``, TRL's default). Keys use TRL ``SFTConfig`` names where they
exist. Checkpoints every ``sft.save_steps`` make ``--resume`` continue a killed run.

``model.name_or_path: scratch`` is for people with no model at all (:func:`scratch_reference`): a byte-level BPE
tokenizer trained on the data's own texts, a small Llama built from a config, and this SFT (prompt tokens
included); the result is cached by a hash of the texts and settings, so a second run over the same data reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from moedpo.config import Config, ConfigError, load_config, save_config
from moedpo.progress import Progress
from moedpo.runs import CHECKPOINT, MetricsLogger, find_checkpoint, load_checkpoint, save_checkpoint
from moedpo.training import _lr_lambda

NO_GATE = torch.nn.Module()  # SFT checkpoints reuse the run directory's format, which has a gate slot
SPECIAL = ["<pad>", "<s>", "</s>"]


def _sequences(config: Config, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of prompt + chosen for every row, tokenized as DPO training tokenizes them."""
    from moedpo.builders import _check_consistent, reference_rows
    from moedpo.data.tokenize import tokenize_rows

    d = config.data
    rows = reference_rows(config)
    _check_consistent(rows, d.source)
    options = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length, truncation_mode=d.truncation_mode)
    examples = tokenize_rows(rows, tokenizer, source=d.source, **options).examples
    whole = not config.sft.completion_only_loss
    return [
        (
            e["prompt_chosen_ids"] + e["chosen_ids"],
            [int(whole)] * len(e["prompt_chosen_ids"]) + [1] * len(e["chosen_ids"]),
        )
        for e in examples
    ]


def _batch(pairs: list[tuple[list[int], list[int]]], pad: int, device) -> dict:
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    attention, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (seq, loss_mask) in enumerate(pairs):
        ids[i, : len(seq)], attention[i, : len(seq)], mask[i, : len(seq)] = (
            torch.tensor(seq),
            1,
            torch.tensor(loss_mask),
        )
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "loss_mask": mask.to(device)}


def _loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL over the loss-mask tokens, and the mean token accuracy (TRL's metric)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    count = mask.sum().clamp_min(1.0)
    accuracy = ((logits.argmax(-1) == labels).float() * mask).sum() / count
    return (nll * mask).sum() / count, accuracy


def fine_tune(config: Config, tokenizer, model, output_dir: Path, resume: bool = False, desc: str = "sft") -> Path:
    """SFT ``model`` on ``config.data``'s prompts and preferred completions; writes a model folder to
    ``output_dir`` (and ``metrics.jsonl``); returns it."""
    s = config.sft
    sequences = _sequences(config, tokenizer)
    if not sequences:
        raise ConfigError(f"{config.data.source}: no rows left to fine-tune on")
    device = torch.device("cuda" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu")
    if s.use_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    model = model.to(device).train()
    per_epoch = math.ceil(len(sequences) / s.per_device_train_batch_size)
    total = s.max_steps if s.max_steps > 0 else max(1, math.ceil(s.num_train_epochs * per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(s.lr_scheduler_type, s.warmup_steps, total))
    output_dir.mkdir(parents=True, exist_ok=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = 0
    if resume:
        checkpoint = find_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no SFT checkpoint in {output_dir}")
        start = load_checkpoint(checkpoint, trainable, NO_GATE, optimizer, scheduler)
    if not resume:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    logger = MetricsLogger(output_dir, resume_step=start if resume else None)  # drops lines after the checkpoint
    progress = Progress(start, total, desc)
    pad = tokenizer.pad_token_id
    for step in range(start, total):
        epoch, position = divmod(step, per_epoch)
        order = list(range(len(sequences)))
        random.Random(config.train.seed * 100_003 + epoch).shuffle(order)
        chosen = order[position * s.per_device_train_batch_size : (position + 1) * s.per_device_train_batch_size]
        loss, accuracy = _loss(model, _batch([sequences[i] for i in chosen], pad, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        loss, accuracy = loss.detach(), accuracy.detach()
        if (step + 1) % s.logging_steps == 0 or step + 1 == total:
            record = {"loss": float(loss), "mean_token_accuracy": float(accuracy)}
            record.update({"learning_rate": scheduler.get_last_lr()[0], "epoch": (step + 1) / per_epoch})
            logger.log(step + 1, record)
        progress.update(step + 1, loss=float(loss), acc=float(accuracy))
        if s.save_steps and (step + 1) % s.save_steps == 0 and step + 1 < total:
            save_checkpoint(output_dir, step + 1, trainable, {}, optimizer, scheduler)
    progress.close()
    logger.close()
    if s.use_peft:
        model = model.merge_and_unload()
    model.eval().to("cpu").save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    shutil.rmtree(output_dir / CHECKPOINT, ignore_errors=True)  # the model folder is the result
    return output_dir


def sft(config: Config | str | Path | None = None, resume: bool = False) -> Path:
    """``moedpo sft``: fine-tune ``model.name_or_path`` on the data's preferred completions; returns the folder."""
    from moedpo.builders import build_base

    if not isinstance(config, Config):
        config = load_config(config)
    out = config.sft.output_dir
    if "{time}" in out:
        if resume:
            raise FileNotFoundError("--resume needs the run's own sft.output_dir")
        out = out.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    output_dir = Path(out)
    if output_dir.exists() and any(output_dir.iterdir()) and not resume:
        raise FileExistsError(f"{output_dir} exists and is not empty: pass --resume, or another sft.output_dir")
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    tokenizer, model = build_base(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "sft_config.yaml")
    print(f"moedpo sft: {config.model.name_or_path} on {config.data.source} -> {output_dir}", file=sys.stderr)
    return fine_tune(config, tokenizer, model, output_dir, resume=resume)


# -- model.name_or_path: scratch -------------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("MOEDPO_CACHE", Path.home() / ".cache" / "moedpo")) / "scratch"


def _texts(config: Config) -> list[str]:
    from moedpo.builders import reference_rows

    texts = []
    for row in reference_rows(config):
        for part in (row.prompt, row.chosen, row.rejected):
            if isinstance(part, list):
                texts += [m["content"] for m in part]
            elif part:
                texts.append(part)
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts`` (no BOS; EOS ``</s>``, pad ``<pad>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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


def _build_scratch(config: Config, texts: list[str], folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = config.sft
    print(
        f"moedpo: no model given (scratch): BPE tokenizer on {len(texts)} texts, small Llama, SFT on the data",
        file=sys.stderr,
    )
    torch.manual_seed(config.train.seed)
    tokenizer = train_bpe_tokenizer(texts, s.scratch_vocab_size)
    hidden = s.scratch_hidden_size
    model = LlamaForCausalLM(
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
    pretrain = dataclasses.replace(config, sft=dataclasses.replace(s, completion_only_loss=False))
    # (a model from nothing learns the prompts' language too, not only the completions')
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fine_tune(pretrain, tokenizer, model, tmp, desc="scratch reference")
    if folder.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)


def scratch_reference(config: Config) -> Path:
    """The cached scratch reference for this data and these settings: built on first use (tokenizer, model, SFT)."""
    s, texts = config.sft, _texts(config)
    settings = {k: getattr(s, k) for k in ("scratch_vocab_size", "scratch_hidden_size", "scratch_num_layers")}
    settings.update(
        max_steps=s.max_steps,
        num_train_epochs=s.num_train_epochs,
        learning_rate=s.learning_rate,
        batch=s.per_device_train_batch_size,
        seed=config.train.seed,
        max_length=config.data.max_length,
    )
    key = hashlib.sha256(json.dumps([texts, settings]).encode()).hexdigest()[:16]
    folder = cache_root() / key
    if (folder / "config.json").exists():
        print(f"moedpo: scratch reference from the cache: {folder}", file=sys.stderr)
        return folder
    with torch.random.fork_rng(devices=[]):  # building it must not change what the run draws after it
        _build_scratch(config, texts, folder)
    return folder
