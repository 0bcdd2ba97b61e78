"""Reopen a finished run directory: rebuild base, bank and gate from ``config.yaml`` and the final checkpoint,
then evaluate (``moedpo eval``) or route and generate (``moedpo generate``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from moedpo.builders import (
    attach_encoder_features,
    build_bank,
    build_base,
    build_gate,
    gate_feature_dim,
    gate_logits,
    prepare_data,
    resolve_device,
)
from moedpo.config import load_config
from moedpo.data.loading import load_preference_rows
from moedpo.data.tokenize import collate, tokenize_rows
from moedpo.eval.evaluate import bank_margins, evaluate
from moedpo.losses import user_responsibilities
from moedpo.runs import find_checkpoint, restore_parameters


class RunSession:
    """The trained experts and gate of a run directory, ready for evaluation or generation."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"{self.run_dir}: not a moedpo run directory (no config.yaml)")
        self.config = load_config(self.run_dir / "config.yaml")
        saved_base = self.run_dir / "base" if (self.run_dir / "base").exists() else None
        self.tokenizer, base = build_base(self.config, saved_base)
        self.user_ids = json.loads((self.run_dir / "users.json").read_text())
        device = resolve_device(self.config.train.device)
        self.bank = build_bank(self.config, base, device)
        self.data = prepare_data(self.config, self.tokenizer)
        feature_dim = gate_feature_dim(self.config, base, self.data)
        self.gate = build_gate(self.config, feature_dim, len(self.user_ids), self.data.user_feature_dim).to(device)
        checkpoint = find_checkpoint(self.run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{self.run_dir}: no complete checkpoint")
        restore_parameters(checkpoint, self.bank.trainable_parameters())
        self.gate.load_state_dict(load_file(self.run_dir / "gate.safetensors"))

    def evaluate(self, data: str | None = None) -> dict:
        held_out = self.data.eval
        if data is not None:
            d = self.config.data
            rows = load_preference_rows(data, d.split)
            held_out = tokenize_rows(
                rows,
                self.tokenizer,
                source=data,
                max_length=d.max_length,
                max_prompt_length=d.max_prompt_length,
                truncation_mode=d.truncation_mode,
                user_ids=self.user_ids,
            ).examples
            for e in held_out:
                e["index"] += 10**9  # keep reference-cache keys apart from training examples
        metrics, details = evaluate(
            self.config, self.bank, self.gate, self.data.train, held_out, self.tokenizer.pad_token_id
        )
        metrics["eval/mean_weights"] = details["weights"].mean(0).tolist()
        return metrics

    @torch.no_grad()
    def route(self, prompt: str, user: str | None = None) -> torch.Tensor:
        """Gate weights (K,) for a prompt (and annotator)."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        user_index = self.user_ids.index(user) if user in self.user_ids else None
        if self.config.gate.type == "user" and user_index is None:
            raise ValueError(f"this run's gate is user-conditioned: pass --user (one of {self.user_ids[:5]}...)")
        example = {
            "index": -1,
            "prompt_chosen_ids": ids,
            "prompt_rejected_ids": ids,
            "chosen_ids": [ids[-1]],
            "rejected_ids": [ids[-1]],
            "user": user_index or 0,
            "group": None,
            "user_features": None,
            "prompt_text": prompt,
        }
        if self.config.gate.encoder:
            attach_encoder_features(self.config.gate.encoder, [example])
        batch = self.bank.to_device(collate([example], self.tokenizer.pad_token_id))
        with self.bank.autocast():  # the base's pooled prompt features, without touching the per-example cache
            _, features = self.bank.reference_pass(batch)
        logits, _ = gate_logits(self.config, self.gate, batch, features[:1].float())
        if self.config.em.scope == "user" and user_index is not None:  # the annotator's posterior (E-step)
            own = [e for e in self.data.train if e["user"] == user_index]
            h = bank_margins(self.bank, own, self.tokenizer.pad_token_id)["h"]
            return user_responsibilities(h, logits[:1].cpu(), self.config.em.beta, torch.zeros(len(own)).long())[0]
        return torch.softmax(logits[0], -1)

    @torch.no_grad()
    def generate(self, prompt: str, expert: int, max_new_tokens: int = 32) -> str:
        model = self.bank.experts[expert] if hasattr(self.bank, "experts") else self.bank.model
        if hasattr(self.bank, "activate"):
            self.bank.activate(expert)
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.bank.device)
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate_run(run_dir, data: str | None = None) -> dict:
    return RunSession(run_dir).evaluate(data)


def generate(run_dir, prompt: str, user: str | None, expert: str, max_new_tokens: int) -> tuple[int, str]:
    session = RunSession(run_dir)
    k = int(session.route(prompt, user).argmax()) if expert == "auto" else int(expert)
    if not 0 <= k < session.config.experts.num_experts:
        raise ValueError(f"--expert {expert}: expected auto or 0..{session.config.experts.num_experts - 1}")
    return k, session.generate(prompt, k, max_new_tokens)
