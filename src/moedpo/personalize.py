"""New annotators without retraining: their posterior over a trained run's experts from a few labelled pairs.

``moedpo personalize RUN_DIR --pairs new_user.jsonl`` (or :func:`personalize`) gives three distributions over
the K experts for an annotator the run has never seen:

- ``prior``: the gate's prior for a new annotator: Mix-DPO proportions, the mean of a user gate's learned user
  embeddings (plus its ``user_features`` network on the annotator's own features, which is how a user gate
  generalises to users it has never seen), or an MoE gate's weights averaged over the pairs' prompts;
- ``exact``: the exact posterior from the pairs, one latent type shared by them, with the trained experts'
  margins: q_k proportional to prior_k prod_i sigmoid(beta h_ik) (one expert forward per pair and expert);
- ``amortized``: the run's learned guide q_phi(z_u | the pairs) on the frozen base's features (no expert forward;
  runs trained with ``em.guide=amortized``).

The result is written to ``RUN_DIR/personalized/<user>.json``; ``moedpo generate RUN_DIR --user <user>`` then
routes that annotator by its exact posterior.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moedpo.config import ConfigError
from moedpo.data.formats import PreferenceRow, normalise_row
from moedpo.data.loading import load_preference_rows
from moedpo.data.tokenize import tokenize_rows
from moedpo.eval.evaluate import bank_margins, gate_batch
from moedpo.inference import e_step
from moedpo.models.bt import user_bt_model

FOLDER = "personalized"


@dataclass
class Personalization:
    """A new annotator's distributions over the run's experts (lists of K floats)."""

    user: str
    num_pairs: int
    prior: list[float]
    exact: list[float]
    amortized: list[float] | None = None

    @property
    def expert(self) -> int:
        """The expert that generation routes this annotator to: the exact posterior's top one."""
        return max(range(len(self.exact)), key=self.exact.__getitem__)

    def save(self, run_dir: Path) -> Path:
        path = personalization_path(run_dir, self.user)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path


def personalization_path(run_dir: Path, user: str) -> Path:
    return Path(run_dir) / FOLDER / f"{re.sub(r'[^A-Za-z0-9._-]', '_', user)}.json"


def load_personalization(run_dir: Path, user: str) -> Personalization | None:
    path = personalization_path(run_dir, user)
    if not path.exists():
        return None
    return Personalization(**json.loads(path.read_text()))


@torch.no_grad()
def posteriors_from_examples(session, examples: list[dict], user: str) -> Personalization:
    """The three distributions from tokenized examples (all taken as one annotator's pairs)."""
    run, config = session.run, session.config
    if not examples:
        raise ConfigError(f"personalize {user!r}: no pairs left to read (after dropping what TRL drops)")
    fit = bank_margins(run.bank, examples, run.tokenizer.pad_token_id)
    prior_logits = run.gate.new_user_logits(gate_batch(examples), fit["features"].to(run.bank.device)).cpu().double()
    h = fit["h"].double()
    zeros = torch.zeros(h.shape[0], dtype=torch.long)
    args = (h, prior_logits.unsqueeze(0), config.em.beta, torch.ones(h.shape[0], dtype=h.dtype))
    kwargs = {"label_smoothing": config.em.label_smoothing, "user_index": zeros}
    exact = e_step(user_bt_model, args, kwargs, config.em.beta, config.em.label_smoothing, 2).gate_q.reshape(-1)
    amortized = None
    if hasattr(run.guide, "logits") and "guide_features" in fit:
        logits = run.guide.logits(fit["guide_features"].to(run.bank.device), prior_logits.unsqueeze(0).float(), zeros)
        amortized = torch.softmax(logits.reshape(-1).double(), -1).tolist()
    prior = torch.softmax(prior_logits, -1).tolist()
    return Personalization(user, len(examples), prior, exact.tolist(), amortized)


def tokenize_for_run(session, rows: list, source: str) -> list[dict]:
    """The run's own tokenization (TRL-exact, with its data.* options), as probes never cached with the run's."""
    d = session.config.data
    rows = [r if isinstance(r, PreferenceRow) else normalise_row(r, source, i) for i, r in enumerate(rows)]
    examples = tokenize_rows(
        rows,
        session.tokenizer,
        source=source,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation_mode=d.truncation_mode,
    ).examples
    for e in examples:
        e["index"] = -1 - e["index"]
    return examples


def personalize(run_dir, pairs, user: str | None = None, save: bool = True) -> Personalization:
    """A new annotator's posterior over the experts of ``run_dir`` from ``pairs`` (a preference file, or a list of
    rows in TRL's formats), stored under ``run_dir/personalized/`` for ``moedpo generate --user``."""
    from moedpo.session import RunSession

    session = RunSession(run_dir)
    if isinstance(pairs, str | Path):
        source = str(pairs)
        rows = load_preference_rows(source, session.config.data.split)
    else:
        source = "<rows>"
        rows = [r if isinstance(r, PreferenceRow) else normalise_row(r, source, i) for i, r in enumerate(pairs)]
    if not rows:
        raise ConfigError(f"{source}: no pairs")
    named = {r.user_id for r in rows if getattr(r, "user_id", None) is not None}
    if user is None:
        if len(named) > 1:
            raise ConfigError(f"{source}: rows of {len(named)} annotators; pass --user NAME, or one annotator's file")
        user = named.pop() if named else (Path(source).stem if source != "<rows>" else "new_user")
    user = str(user)
    if user in session.user_ids:
        raise ConfigError(f"{user!r} is an annotator of this run already: its posterior comes from training")
    if named:  # a file of several annotators: only this one's rows
        if user not in named:
            raise ConfigError(f"--user {user!r}: no row of {source} has this user_id (it has {sorted(named)[:5]})")
        rows = [r for r in rows if r.user_id == user]
    try:
        result = posteriors_from_examples(session, tokenize_for_run(session, rows, source), user)
    except (ValueError, RuntimeError) as err:  # the gate cannot read these rows (missing or mis-sized features)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {err}") from None
    if save:
        result.save(session.run_dir)
    return result
