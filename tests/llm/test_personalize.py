"""New annotators without retraining: `moedpo personalize` and `generate --user` for a user the run never saw."""

import json

import pytest
import torch
from torch.nn.functional import logsigmoid

from moedpo.cli import main
from moedpo.config import ConfigError, load_config
from moedpo.data.users_world import make_users_world
from moedpo.eval.evaluate import bank_margins, gate_batch
from moedpo.personalize import personalize
from moedpo.session import RunSession
from moedpo.training import train


@pytest.fixture(scope="module")
def users_run(tmp_path_factory):
    """A small users-world run: user gate on ids and user_features, the amortized guide trained alongside."""
    tmp = tmp_path_factory.mktemp("users")
    world = make_users_world(users_per_type=2, pairs_per_user=8, new_users_per_type=1, new_pairs=5, test_pairs=3)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in world["train"]))
    overrides = [
        f"data.source={data}",
        f"train.output_dir={tmp / 'run'}",
        "model.hidden_size=32",
        "experts.num_experts=3",
        "gate.type=user",
        "gate.user_features=true",
        "em.guide=amortized",
        "train.max_steps=12",
        "train.eval_steps=0",
    ]
    return train(load_config(overrides=overrides)), world["new"], tmp


def test_posteriors_of_a_new_annotator_match_a_hand_computation(users_run):
    run_dir, new, _ = users_run
    user, (rows, _) = next(iter(new.items()))
    result = personalize(run_dir, rows)
    assert result.user == user and result.num_pairs == 5  # the rows' own user_id names it
    session = RunSession(run_dir)
    from moedpo.personalize import tokenize_for_run  # the same tokenization as the command

    examples = tokenize_for_run(session, rows, "<rows>")
    fit = bank_margins(session.bank, examples, session.tokenizer.pad_token_id)
    gate = session.gate.net
    features = torch.tensor(rows[0]["user_features"]).unsqueeze(0)
    prior = torch.log_softmax(gate.embedding.weight.mean(0) + gate.net(features)[0], -1).double()  # new user
    beta = session.config.em.beta
    exact = torch.softmax(prior + logsigmoid(beta * fit["h"].double()).sum(0), -1)
    assert torch.allclose(torch.tensor(result.prior, dtype=torch.float64), prior.exp(), atol=1e-6)
    assert torch.allclose(torch.tensor(result.exact, dtype=torch.float64), exact, atol=1e-6)
    batch = gate_batch(examples)
    assert torch.allclose(session.gate.new_user_logits(batch, None).double(), prior, atol=1e-6)
    users = torch.zeros(len(examples), dtype=torch.long)
    q = torch.softmax(session.run.guide.logits(fit["guide_features"], prior.float().unsqueeze(0), users)[0], -1)
    assert torch.allclose(torch.tensor(result.amortized), q, atol=1e-6)


def test_user_gate_prior_follows_a_new_users_features(users_run):
    """Two new annotators whose feature columns code different types get different priors from the gate."""
    run_dir, new, _ = users_run
    (a, (rows_a, _)), (b, (rows_b, _)) = list(new.items())[:2]
    prior_a, prior_b = personalize(run_dir, rows_a).prior, personalize(run_dir, rows_b).prior
    assert max(abs(x - y) for x, y in zip(prior_a, prior_b)) > 1e-3


def test_cli_personalize_then_generate_routes_the_new_user(users_run, capsys):
    run_dir, new, tmp = users_run
    user, (rows, _) = list(new.items())[2]
    pairs = tmp / "new_user.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["generate", str(run_dir), "--user", user, "--prompt", "describe the garden :"]) == 2
    assert "moedpo personalize" in capsys.readouterr().err  # says what to do
    assert main(["personalize", str(run_dir), "--pairs", str(pairs)]) == 0
    assert json.loads(capsys.readouterr().out)["user"] == user
    saved = json.loads((run_dir / "personalized" / f"{user}.json").read_text())
    expert = max(range(3), key=lambda k: saved["exact"][k])
    assert main(["generate", str(run_dir), "--user", user, "--prompt", "describe the garden :"]) == 0
    assert capsys.readouterr().out.startswith(f"[expert {expert}]")


def test_bad_personalize_requests_fail_clearly(users_run, tmp_path):
    run_dir, new, _ = users_run
    _, (rows, _) = next(iter(new.items()))
    trained = RunSession(run_dir).user_ids[0]
    with pytest.raises(ConfigError, match="annotator of this run already"):
        personalize(run_dir, rows, user=trained)
    (_, (other, _)) = list(new.items())[1]
    with pytest.raises(ConfigError, match="rows of 2 annotators"):
        personalize(run_dir, rows + other)
    no_features = [{k: v for k, v in r.items() if k != "user_features"} for r in rows]
    with pytest.raises(ValueError, match="user_features"):
        personalize(run_dir, no_features)
    # the trial's M50b: English text through the built-in world's word-level tokenizer gave a confident posterior
    english = [{**r, "prompt": "Describe a rainy morning in the city:", "chosen": " Grey clouds drift over wet roofs.",
                "rejected": " Honestly, I cannot say much about it."} for r in rows]  # fmt: skip
    with pytest.raises(ConfigError, match=r"\d+% of the tokens are '<unk>' \(unknown\) for this run's tokenizer"):
        personalize(run_dir, english, save=False)


def test_user_picks_that_annotators_rows_from_a_shared_file(users_run, tmp_path):
    run_dir, new, _ = users_run
    (a, (rows_a, _)), (b, (rows_b, _)) = list(new.items())[:2]
    both = tmp_path / "both.jsonl"
    both.write_text("".join(json.dumps(r) + "\n" for r in rows_a + rows_b))
    only_a = personalize(run_dir, str(both), user=a)
    assert only_a.num_pairs == len(rows_a) and only_a.exact == personalize(run_dir, rows_a).exact
    with pytest.raises(ConfigError, match="no row of"):
        personalize(run_dir, str(both), user="zed")
    wide = [{**r, "user_features": [0.0] * 7} for r in rows_a]
    with pytest.raises(ConfigError, match="reads 4"):
        personalize(run_dir, wide)
