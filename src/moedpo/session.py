"""A trained run, reopened: evaluate it (``moedpo eval``), route prompts and annotators to experts, and
generate (``moedpo generate``). The run comes from the one assembly (:func:`moedpo.assembly.open_run` for a
run directory, or the run still in memory at the end of training)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moedpo.assembly import Run, open_run
from moedpo.assembly.data import attach_encoder_features
from moedpo.config import ConfigError
from moedpo.data.batching import by_annotator
from moedpo.data.loading import load_preference_rows
from moedpo.data.sources import tokenize_data
from moedpo.data.tokenize import collate, prompt_input_ids
from moedpo.eval.evaluate import evaluate, user_posteriors
from moedpo.experts.generation import greedy_completion, policy
from moedpo.runs import MINMAX_FILE, load_personalization


class RunSession:
    """The trained experts and gate of a run directory, ready for evaluation or generation. ``run``: the run in
    memory (the end of training); otherwise it is rebuilt from ``run_dir`` and restored."""

    def __init__(self, run_dir: str | Path, run: Run | None = None):
        self.run_dir = Path(run_dir)
        self.run = run if run is not None else open_run(self.run_dir)
        self.config = self.run.config
        self.tokenizer, self.bank, self.gate = self.run.tokenizer, self.run.bank, self.run.gate
        self.user_ids = list(self.run.data.user_ids)

    def evaluate(self, data: str | None = None) -> dict:
        held_out = self.run.data.eval
        if data is None and not held_out:
            raise ConfigError(f"{self.run_dir}: this run held out no pairs (data.eval_fraction=0): pass --data FILE")
        if data is not None:
            rows = load_preference_rows(data, self.config.data.split)
            held_out = tokenize_data(rows, self.tokenizer, self.config.data, source=data, user_ids=self.user_ids)
            held_out = held_out.examples
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
            own = by_annotator(self.run.data.train).get(user_index)
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

    def generate(self, prompt: str, expert: int, max_new_tokens: int = 32) -> str:
        with policy(self.bank, expert) as model:
            return greedy_completion(model, self.tokenizer, self.as_prompt(prompt), max_new_tokens)


def evaluate_run(run_dir, data: str | None = None) -> dict:
    return RunSession(run_dir).evaluate(data)


def generate(
    run_dir, prompt: str, user: str | None, expert: str, max_new_tokens: int, serving: str = "gate", seed: int = 0
) -> tuple[int, str]:
    """Generate with one expert: ``--expert k``, the gate's top expert (``serving`` gate: for ``--user``, or the
    prompt), or one drawn from the report's min-max-regret serving weights (``serving`` minmax, seeded by ``seed``:
    the policy for an annotator whose type is unknown, :mod:`moedpo.eval.regret`)."""
    if not prompt.strip():
        raise ConfigError("--prompt is empty: give the text to continue, e.g. --prompt 'describe the garden :'")
    if serving not in ("gate", "minmax"):
        raise ConfigError(f"--policy {serving}: expected gate or minmax")
    if serving == "minmax" and (user is not None or expert != "auto"):
        raise ConfigError("--policy minmax serves an annotator of unknown type: leave out --user and --expert")
    session = RunSession(run_dir)
    num_experts = session.config.experts.num_experts
    if expert != "auto" and not (expert.isdigit() and int(expert) < num_experts):
        raise ConfigError(f"--expert {expert}: expected auto or an expert index 0..{num_experts - 1}")
    if serving == "minmax":
        k = int(torch.multinomial(minmax_weights(run_dir), 1, generator=torch.Generator().manual_seed(seed)))
    else:
        k = int(session.route(prompt, user).argmax()) if expert == "auto" else int(expert)
    return k, session.generate(prompt, k, max_new_tokens)


def minmax_weights(run_dir) -> torch.Tensor:
    """The min-max-regret serving weights (K,) that the run's report saved."""
    path = Path(run_dir) / MINMAX_FILE
    if not path.exists():
        raise ConfigError(
            f"{path}: no min-max serving weights. `moedpo report {run_dir}` writes them where the held-out data has "
            "a group column (the annotator types whose regrets they balance)"
        )
    return torch.tensor(json.loads(path.read_text())["weights"], dtype=torch.float64)
