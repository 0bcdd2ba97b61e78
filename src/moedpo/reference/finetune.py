"""A reference policy from the data: supervised fine-tuning on prompts and preferred completions.

The DPO paper's answer when no SFT model exists ("preferred-FT"): maximise log pi(y+ | x) over the preference
data, then use the result as pi_ref. :func:`fine_tune` trains a causal LM (full, or LoRA merged back with
``sft.use_peft``) and writes a Hugging Face model folder (``config.json``, weights, tokenizer) that
``model.name_or_path`` accepts. Sequences are tokenized exactly as DPO training tokenizes prompt + chosen
(:func:`moedpo.data.sources.tokenize_data`), and the loss is on the completion tokens
(``sft.completion_only_loss``, TRL's default). Keys use TRL ``SFTConfig`` names where they exist. Checkpoints every
``sft.save_steps`` make ``--resume`` continue a killed run.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.nn.utils.rnn import pad_sequence

from moedpo.config import Config, ConfigError
from moedpo.data.batching import BatchPlan
from moedpo.data.formats import PreferenceRow
from moedpo.data.sources import check_consistent, tokenize_data
from moedpo.experts.loading import resolve_device
from moedpo.experts.logprobs import selective_log_softmax
from moedpo.progress import Progress
from moedpo.runs import CHECKPOINT, find_checkpoint, load_checkpoint, lr_scheduler, save_checkpoint
from moedpo.tracking import MetricsLogger

NO_GATE = torch.nn.Module()  # SFT checkpoints reuse the run directory's format, which has a gate slot


def sequences(config: Config, tokenizer, rows: list[PreferenceRow]) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of prompt + chosen for every row (of a ranking: its best completion), tokenized as DPO
    training tokenizes them."""
    check_consistent(rows, config.data.source)
    examples = tokenize_data(rows, tokenizer, config.data, source=config.data.source).examples
    whole = not config.sft.completion_only_loss
    return [(prompt + ids, [int(whole)] * len(prompt) + [1] * len(ids)) for prompt, ids in map(_preferred, examples)]


def _preferred(example: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a pair's chosen completion or a ranking's best one."""
    if "completion_ids" in example:
        best = example["ranking"][0]
        return example["prompt_ids"][best], example["completion_ids"][best]
    return example["prompt_chosen_ids"], example["chosen_ids"]


def collate_sequences(pairs: list[tuple[list[int], list[int]]], pad: int, device) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` (N, T)."""
    ids = pad_sequence([torch.tensor(seq) for seq, _ in pairs], batch_first=True, padding_value=pad)
    attention = pad_sequence([torch.ones(len(seq), dtype=torch.long) for seq, _ in pairs], batch_first=True)
    mask = pad_sequence([torch.tensor(m, dtype=torch.long) for _, m in pairs], batch_first=True)
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "loss_mask": mask.to(device)}


def sft_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL over the loss-mask tokens, and the mean token accuracy (TRL's metric)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].float()
    nll = -selective_log_softmax(logits, labels)
    count = mask.sum().clamp_min(1.0)
    accuracy = ((logits.argmax(-1) == labels).float() * mask).sum() / count
    return (nll * mask).sum() / count, accuracy


def fine_tune(
    config: Config, tokenizer, model, rows: list[PreferenceRow], output_dir: Path, resume: bool = False, desc="sft"
) -> Path:
    """SFT ``model`` on ``rows``' prompts and preferred completions; writes a model folder to ``output_dir`` (and
    ``metrics.jsonl``); returns it."""
    s = config.sft
    data = sequences(config, tokenizer, rows)
    if not data:
        raise ConfigError(f"{config.data.source}: no rows left to fine-tune on")
    device = resolve_device(config.train.device)
    if s.use_peft:
        lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    model = model.to(device).train()
    plan = BatchPlan([[sequence] for sequence in data], s.per_device_train_batch_size, config.train.seed)
    total = s.max_steps if s.max_steps > 0 else max(1, math.ceil(s.num_train_epochs * plan.per_epoch))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=s.learning_rate, weight_decay=s.weight_decay)
    scheduler = lr_scheduler(optimizer, s.lr_scheduler_type, s.warmup_steps, total)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    if resume:
        checkpoint = find_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no SFT checkpoint in {output_dir}")
        start = load_checkpoint(checkpoint, trainable, NO_GATE, optimizer, scheduler)
    else:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    logger = MetricsLogger(output_dir, resume_step=start if resume else None)  # drops lines after the checkpoint
    progress = Progress(start, total, desc)
    for step in range(start, total):
        loss, accuracy = sft_loss(model, collate_sequences(plan(step), tokenizer.pad_token_id, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
        optimizer.step()
        scheduler.step()
        loss, accuracy = float(loss.detach()), float(accuracy)
        if (step + 1) % s.logging_steps == 0 or step + 1 == total:
            record = {"loss": loss, "mean_token_accuracy": accuracy, "learning_rate": scheduler.get_last_lr()[0]}
            logger.log(step + 1, {**record, "epoch": (step + 1) / plan.per_epoch})
        progress.update(step + 1, loss=loss, acc=accuracy)
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
