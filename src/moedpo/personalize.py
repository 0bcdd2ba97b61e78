"""New annotators without retraining: their posterior over a trained run's experts from a few labelled pairs.

``moedpo personalize RUN_DIR --pairs new_user.jsonl`` (or :func:`personalize`) gives three distributions over
the K experts for an annotator the run has never seen:

- ``prior``: the gate's prior for a new annotator: Mix-DPO proportions, the mean of a user gate's learned user
  embeddings (plus its ``user_features`` network on the annotator's own features, which is how a user gate
  generalises to users it has never seen), or an MoE gate's weights averaged over the pairs' prompts;
- ``exact``: the exact posterior from the pairs under the run's own latent model (``em.model``; for the built-in
  user model q_k proportional to prior_k prod_i sigmoid(beta h_ik)), with the trained experts' margins (one
  expert forward per pair and expert), by the same E-step as training (:func:`moedpo.eval.evaluate.latent_posterior`);
- ``amortized``: the run's learned guide q_phi(z_u | the pairs) on the frozen base's features (no expert forward;
  runs trained with ``em.guide=amortized``).

Only user-scope runs have an annotator's latent type (``em.scope=user``); a pair-scope run routes by the prompt.
The result is written to ``RUN_DIR/personalized/<user>.json``; ``moedpo generate RUN_DIR --user <user>`` then
routes that annotator by its exact posterior.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moedpo.config import ConfigError
from moedpo.data.formats import PreferenceDataError
from moedpo.data.loading import load_preference_rows
from moedpo.data.prepared import UNKNOWN_LIMIT, unknown_token_share
from moedpo.data.ranking_rows import RankingRow
from moedpo.data.sources import normalised, tokenize_data
from moedpo.eval.evaluate import bank_margins, gate_batch, latent_posterior, observed
from moedpo.runs import Personalization
from moedpo.session import RunSession


@torch.no_grad()
def posteriors_from_examples(session: RunSession, examples: list[dict], user: str) -> Personalization:
    """The three distributions from tokenized examples (all taken as one annotator's pairs)."""
    run = session.run
    if session.config.em.scope != "user":
        raise ConfigError(
            f"personalize {user!r}: this run has em.scope=pair (one latent per comparison, no annotator type to "
            "infer); its gate routes each prompt (`moedpo generate` without --user). Train with em.scope=user to "
            "personalize annotators"
        )
    if not examples:
        raise ConfigError(f"personalize {user!r}: no pairs left to read (after dropping what TRL drops)")
    if ("completion_ids" in examples[0]) != run.data.rankings:  # examples given directly, not through personalize
        given, trained = ("rankings", "pairs") if "completion_ids" in examples[0] else ("pairs", "rankings")
        raise ConfigError(f"personalize {user!r}: the examples are {given}, and this run was trained on {trained}")
    fit = bank_margins(run.bank, examples, run.tokenizer.pad_token_id)
    prior_logits = run.gate.new_user_logits(gate_batch(examples), fit["features"].to(run.bank.device)).cpu()
    zeros = torch.zeros(len(examples), dtype=torch.long)  # one annotator: every pair is theirs
    exact = latent_posterior(run, fit["h"], prior_logits.unsqueeze(0), {"user_index": zeros}, observed(fit)).reshape(-1)
    amortized = None
    if hasattr(run.guide, "logits") and "guide_features" in fit:
        logits = run.guide.logits(fit["guide_features"].to(run.bank.device), prior_logits.unsqueeze(0).float(), zeros)
        amortized = torch.softmax(logits.reshape(-1).double(), -1).tolist()
    prior = torch.softmax(prior_logits.double(), -1).tolist()
    return Personalization(user, len(examples), prior, exact.tolist(), amortized)


def tokenize_for_run(session: RunSession, rows: list, source: str) -> list[dict]:
    """The run's own tokenization (TRL-exact, with its data.* options), as probes never cached with the run's."""
    examples = tokenize_data(rows, session.tokenizer, session.config.data, source=source).examples
    share = unknown_token_share(examples, session.tokenizer.unk_token_id)
    if share > UNKNOWN_LIMIT and not session.config.data.allow_unknown_tokens:  # as training refuses such data
        raise ConfigError(
            f"{source}: {share:.0%} of the tokens are {session.tokenizer.unk_token!r} (unknown) for this run's "
            f"tokenizer (model.name_or_path={session.config.model.name_or_path}): its experts cannot read the text, "
            "and a posterior from it would rest on lengths, not words. Personalize a run trained on text like this"
        )
    for e in examples:
        e["index"] = -1 - e["index"]
    return examples


def personalize(run_dir, pairs, user: str | None = None, save: bool = True) -> Personalization:
    """A new annotator's posterior over the experts of ``run_dir`` from ``pairs`` (a preference file, or a list of
    rows in TRL's formats), stored under ``run_dir/personalized/`` for ``moedpo generate --user``."""
    session = RunSession(run_dir)
    if isinstance(pairs, str | Path):
        source = str(pairs)
        rows = load_preference_rows(source, session.config.data.split)
    else:
        source = "<rows>"
        rows = normalised(pairs, source)
    if not rows:
        raise ConfigError(f"{source}: no pairs")
    named = {r.user_id for r in rows if r.user_id is not None}
    if user is None:
        if len(named) > 1:
            raise ConfigError(f"{source}: rows of {len(named)} annotators; pass --user NAME, or one annotator's file")
        user = named.pop() if named else (Path(source).stem if source != "<rows>" else "new_user")
    user = str(user)
    if user in session.user_ids:
        raise ConfigError(f"{user!r} is an annotator of this run already: its posterior comes from training")
    if isinstance(rows[0], RankingRow) != session.run.data.rankings:
        given, trained = ("rankings", "pairs") if isinstance(rows[0], RankingRow) else ("pairs", "rankings")
        raise ConfigError(f"{source}: holds {given}, and this run was trained on {trained}; give the annotator's "
                          f"{trained}")  # fmt: skip
    if named:  # a file of several annotators: only this one's rows
        if user not in named:
            raise ConfigError(f"--user {user!r}: no row of {source} has this user_id (it has {sorted(named)[:5]})")
        rows = [r for r in rows if r.user_id == user]
    try:
        result = posteriors_from_examples(session, tokenize_for_run(session, rows, source), user)
    except (ValueError, RuntimeError) as err:  # the gate cannot read these rows (missing or mis-sized features)
        if isinstance(err, ConfigError | PreferenceDataError):  # these name the file already
            raise
        raise ConfigError(f"{source}: {err}") from None
    if save:
        result.save(session.run_dir)
    return result
