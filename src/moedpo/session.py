"""Reopen a finished run directory: rebuild the run from ``config.yaml`` (the same builder as training) and the
final checkpoint, then evaluate (``moedpo eval``) or route and generate (``moedpo generate``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from moedpo.builders import attach_encoder_features, build_run, resolve_device
from moedpo.config import ConfigError, load_config
from moedpo.data.loading import load_preference_rows
from moedpo.data.tokenize import collate, prompt_input_ids, tokenize_rows
from moedpo.eval.evaluate import evaluate, user_posteriors
from moedpo.personalize import load_personalization
from moedpo.runs import find_checkpoint, restore_parameters
from moedpo.training import GUIDE_FILE, REFERENCE_FILE


class RunSession:
    """The trained experts and gate of a run directory, ready for evaluation or generation."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"{self.run_dir}: not a moedpo run directory (no config.yaml)")
        if not (self.run_dir / "gate.safetensors").exists():
            raise FileNotFoundError(
                f"{self.run_dir}: training did not finish (no gate.safetensors); continue it with "
                f"`moedpo train --config {self.run_dir / 'config.yaml'} --resume`"
            )
        self.config = load_config(self.run_dir / "config.yaml")
        self.run = build_run(self.config, resolve_device(self.config.train.device), saved=self.run_dir)
        self.tokenizer, self.bank, self.gate = self.run.tokenizer, self.run.bank, self.run.gate
        self.user_ids = json.loads((self.run_dir / "users.json").read_text())
        checkpoint = find_checkpoint(self.run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{self.run_dir}: no complete checkpoint")
        restore_parameters(checkpoint, self.bank.trainable_parameters())
        self.gate.load_state_dict(load_file(self.run_dir / "gate.safetensors"))
        if isinstance(self.run.guide, torch.nn.Module) and (self.run_dir / GUIDE_FILE).exists():
            self.run.guide.load_state_dict(load_file(self.run_dir / GUIDE_FILE))
        reference = self.run_dir / REFERENCE_FILE
        if reference.exists():  # the run's own examples need no reference pass
            self.bank.load_reference_state(load_file(reference))

    @classmethod
    def from_run(cls, run_dir: str | Path, run) -> RunSession:
        """A session over a run still in memory (the end of training): nothing is rebuilt or reloaded."""
        self = cls.__new__(cls)
        self.run_dir, self.config, self.run = Path(run_dir), run.config, run
        self.tokenizer, self.bank, self.gate = run.tokenizer, run.bank, run.gate
        self.user_ids = list(run.data.user_ids)
        return self

    def evaluate(self, data: str | None = None) -> dict:
        held_out = self.run.data.eval
        if data is None and not held_out:
            raise ConfigError(f"{self.run_dir}: this run held out no pairs (data.eval_fraction=0): pass --data FILE")
        if data is not None:
            d = self.config.data
            held_out = tokenize_rows(
                load_preference_rows(data, d.split),
                self.tokenizer,
                source=data,
                max_length=d.max_length,
                max_prompt_length=d.max_prompt_length,
                truncation_mode=d.truncation_mode,
                user_ids=self.user_ids,
            ).examples
            offset = 1 + max(e["index"] for e in self.run.data.train + self.run.data.eval)
            for e in held_out:
                e["index"] += offset  # keep reference-cache keys apart from the run's own examples
        metrics, details = evaluate(self.run, self.run.data.train, held_out)
        metrics["eval/mean_weights"] = details["weights"].mean(0).tolist()
        return metrics

    @torch.no_grad()
    def route(self, prompt: str, user: str | None = None) -> torch.Tensor:
        """Expert weights (K,) for a prompt: the annotator's posterior (user scope, or a personalized new
        annotator's, see :mod:`moedpo.personalize`), else the gate's prior."""
        if user is not None and user not in self.user_ids:
            personal = load_personalization(self.run_dir, user)
            if personal is not None:
                return torch.tensor(personal.exact)
            raise ConfigError(
                f"--user {user!r}: not an annotator of this run (e.g. {self.user_ids[:3]}), and not personalized: "
                f"run `moedpo personalize {self.run_dir} --pairs FILE --user {user}` first"
            )
        if self.config.gate.type == "user" and user is None:
            raise ConfigError(f"this run's gate is user-conditioned: pass --user (one of {self.user_ids[:5]}...)")
        user_index = self.user_ids.index(user) if user is not None else 0
        if self.config.em.scope == "user" and user is not None:
            own = [e for e in self.run.data.train if e["user"] == user_index]
            if own:
                ids, q = user_posteriors(self.run, own)
                return q[0]
        ids = prompt_input_ids(self.tokenizer, self.as_prompt(prompt))
        example = {
            "index": -1,  # a probe: never cached
            "prompt_chosen_ids": ids,
            "prompt_rejected_ids": ids,
            "chosen_ids": [ids[-1]],
            "rejected_ids": [ids[-1]],
            "user": user_index,
            "group": None,
            "user_features": None,
            "prompt_text": prompt,
        }
        if self.config.gate.encoder:
            attach_encoder_features(self.config.gate.encoder, [example])
        batch = self.bank.to_device(collate([example], self.tokenizer.pad_token_id))
        features = self.bank.reference(batch)["features"]
        return self.gate.pair_weights(batch, features)[0].cpu()

    def as_prompt(self, prompt: str):
        """A conversational run was trained on chat-templated prompts: a plain prompt becomes one user turn."""
        return [{"role": "user", "content": prompt}] if self.run.data.conversational else prompt

    @torch.no_grad()
    def generate(self, prompt: str, expert: int, max_new_tokens: int = 32) -> str:
        model = self.bank.experts[expert] if hasattr(self.bank, "experts") else self.bank.model
        if hasattr(self.bank, "activate"):
            self.bank.activate(expert)
        self.bank.eval_mode()
        ids = torch.tensor([prompt_input_ids(self.tokenizer, self.as_prompt(prompt))], device=self.bank.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def evaluate_run(run_dir, data: str | None = None) -> dict:
    return RunSession(run_dir).evaluate(data)


def generate(run_dir, prompt: str, user: str | None, expert: str, max_new_tokens: int) -> tuple[int, str]:
    session = RunSession(run_dir)
    num_experts = session.config.experts.num_experts
    if expert != "auto" and not (expert.isdigit() and int(expert) < num_experts):
        raise ConfigError(f"--expert {expert}: expected auto or an expert index 0..{num_experts - 1}")
    k = int(session.route(prompt, user).argmax()) if expert == "auto" else int(expert)
    return k, session.generate(prompt, k, max_new_tokens)
