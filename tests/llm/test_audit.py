"""Defects an audit found, each pinned by a test that failed before its fix (issue 16): personalize through the
run's own latent model, user features a gate cannot read, the scratch cache key, resuming with other settings,
personalization file names, RNG state on resume, and SFT learning the preferred answers."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.functional import log_softmax, logsigmoid
from transformers import AutoModelForCausalLM

from moedpo.assembly import build_base
from moedpo.cli import main
from moedpo.config import ConfigError, load_config
from moedpo.data.builtin import make_builtin_rows
from moedpo.data.sources import reference_rows
from moedpo.eval.evaluate import bank_margins
from moedpo.personalize import personalize, tokenize_for_run
from moedpo.reference import finetune, scratch
from moedpo.runs import Personalization, load_personalization, personalization_path
from moedpo.session import RunSession
from moedpo.training import train

SMALL = ["model.hidden_size=32", "data.annotators_per_type=3", "data.pairs_per_annotator=8", "train.eval_steps=0"]


def config(tmp_path, *overrides, name="run"):
    return load_config(overrides=[f"train.output_dir={tmp_path / name}", *SMALL, *overrides])


def new_user_rows(n: int = 6, seed: int = 7) -> list[dict]:
    rows = [r for r in make_builtin_rows(1, n, seed=seed) if r["group"] == "bright"]
    return [{**r, "user_id": "newcomer"} for r in rows]


def completion_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log pi(completion | prompt), float64, one sequence, by hand: the word-level tokenizer adds no special
    tokens, so the ids are the prompt's then the completion's (with its EOS, as TRL appends it)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(completion + tokenizer.eos_token)["input_ids"]
    with torch.no_grad():
        logps = log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logps[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids))))


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    return train(config(tmp, "train.max_steps=8", "experts.init_std=0.3"))


def test_personalize_matches_margins_computed_without_moedpo(user_run):
    """The exact posterior of a new annotator from the experts' own log-probs, computed here with the PEFT model
    directly (no moedpo tokenization or log-prob code): q_k ∝ w_k prod_i sigmoid(beta h_ik). Swapping chosen and
    rejected anywhere in personalize flips every h and fails this."""
    rows = new_user_rows()
    result = personalize(user_run, rows, save=False)
    session = RunSession(user_run)
    peft, tokenizer, beta = session.bank.model, session.tokenizer, session.config.em.beta
    session.bank.eval_mode()

    def logp(k, text, prompt):
        if k is None:
            with peft.disable_adapter():
                return completion_logp(peft, tokenizer, prompt, text)
        peft.set_adapter(f"expert_{k}")
        return completion_logp(peft, tokenizer, prompt, text)

    h = torch.tensor(
        [
            [
                (logp(k, r["chosen"], r["prompt"]) - logp(None, r["chosen"], r["prompt"]))
                - (logp(k, r["rejected"], r["prompt"]) - logp(None, r["rejected"], r["prompt"]))
                for k in range(2)
            ]
            for r in rows
        ],
        dtype=torch.float64,
    )
    prior = torch.tensor(result.prior, dtype=torch.float64)
    expected = torch.softmax(prior.log() + logsigmoid(beta * h).sum(0), -1)
    assert torch.allclose(torch.tensor(result.exact, dtype=torch.float64), expected, atol=1e-4)
    assert abs(float(expected[0]) - 0.5) > 1e-3  # the experts disagree on these pairs: the check has teeth


def test_personalize_uses_the_runs_own_latent_model(tmp_path, monkeypatch):
    """A hierarchical run (examples/hierarchical_model.py, stickiness 0.9): a new annotator of type g labels pair i
    with expert k with probability T[g, k], so P(D | g) = prod_i sum_k T[g, k] sigmoid(beta h_ik), and the posterior
    is w_g P(D | g) normalised. The built-in user model would give prod_i sigmoid(beta h_ig) instead."""
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])  # em.model is imported from the working directory
    hierarchical = ["em.model=examples.hierarchical_model:hierarchical_bt_model", "experts.init_std=0.3"]
    run_dir = train(config(tmp_path, "train.max_steps=4", *hierarchical))
    rows = new_user_rows(8)
    result = personalize(run_dir, rows, save=False)
    session = RunSession(run_dir)
    h = bank_margins(session.bank, tokenize_for_run(session, rows, "<rows>"), session.tokenizer.pad_token_id)["h"]
    h, beta = h.double(), session.config.em.beta
    transition = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)  # (g, k)
    likelihood = torch.sigmoid(beta * h)  # (N, k)
    log_evidence = torch.log(likelihood @ transition.T).sum(0)  # (g,): sum_i log sum_k T[g, k] sigmoid
    expected = torch.softmax(torch.tensor(result.prior, dtype=torch.float64).log() + log_evidence, -1)
    assert torch.allclose(torch.tensor(result.exact, dtype=torch.float64), expected, atol=1e-5)
    shared = torch.softmax(torch.tensor(result.prior).double().log() + logsigmoid(beta * h).sum(0), -1)
    assert not torch.allclose(expected, shared, atol=1e-3)  # the two models disagree here


def test_personalize_refuses_a_pair_scope_run(tmp_path):
    run_dir = train(config(tmp_path, "train.max_steps=2", "em.scope=pair"))
    with pytest.raises(ConfigError, match="em.scope=pair"):
        personalize(run_dir, new_user_rows(), save=False)


@pytest.mark.parametrize("problem", ["none", "some", "ragged"])
def test_user_features_the_gate_cannot_read_are_refused(tmp_path, capsys, problem):
    """gate.user_features=true used to build a gate without its feature network, and train on, when the data had
    no user_features (or some rows lacked them, or their widths differed)."""
    rows = make_builtin_rows(2, 4)
    if problem != "none":
        for i, r in enumerate(rows):
            r["user_features"] = [0.5, 1.0] if i != 3 or problem == "some" else [0.5, 1.0, 2.0]
        if problem == "some":
            del rows[3]["user_features"]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", f"data.source={path}", "gate.type=user", "gate.user_features=true", *SMALL]
    assert main([*args, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "gate.user_features=true" in err and not (tmp_path / "run").exists()
    assert ("row 4" in err) if problem != "none" else ("no row has it" in err)


@pytest.mark.parametrize(
    "change",
    [
        "sft.lr_scheduler_type=linear",
        "sft.warmup_steps=3",
        "sft.weight_decay=0.1",
        "data.max_prompt_length=4",
        "data.truncation_mode=keep_end",
    ],
)
def test_scratch_cache_key_covers_every_setting_that_shapes_the_build(tmp_path, monkeypatch, change):
    """A changed setting builds a new scratch reference instead of reusing a stale one; where it is written and how
    often it logs do not."""
    monkeypatch.setenv("MOEDPO_CACHE", str(tmp_path / "cache"))
    built = []

    def fake_build(cfg, rows, texts, folder):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        built.append(folder)

    monkeypatch.setattr(scratch, "_build", fake_build)
    base = ["model.name_or_path=scratch", *SMALL]
    first = load_config(overrides=base)
    folder = scratch.scratch_reference(first, reference_rows(first))
    unchanged = ["sft.output_dir=elsewhere", "sft.logging_steps=3", "sft.save_steps=7"]
    unchanged.append("sft.completion_only_loss=false")  # a scratch build always learns the prompts too
    again = load_config(overrides=[*base, *unchanged])
    assert scratch.scratch_reference(again, reference_rows(again)) == folder and len(built) == 1
    changed = load_config(overrides=[*base, change])
    assert scratch.scratch_reference(changed, reference_rows(changed)) != folder and len(built) == 2


def test_resume_with_another_guide_says_what_differs(tmp_path, capsys):
    run_dir = train(config(tmp_path, "train.max_steps=3", "em.schedule=routed", "em.guide=amortized"))
    before = (run_dir / "checkpoint" / "params.safetensors").read_bytes()
    args = ["train", "--config", str(run_dir / "config.yaml"), "--resume", "train.max_steps=5"]
    assert main([*args, "em.schedule=em", "em.guide=null"]) == 2
    err = capsys.readouterr().err
    assert "has " in err and "guide." in err and "own config.yaml" in err
    assert (run_dir / "checkpoint" / "params.safetensors").read_bytes() == before  # nothing rewritten


def test_personalization_files_of_distinct_names_never_collide(tmp_path):
    for user, expert in (("team/a", 0), ("team_a", 1), ("..", 1)):
        Personalization(user, 3, [0.5, 0.5], [1.0 - expert, float(expert)]).save(tmp_path)
    paths = {personalization_path(tmp_path, u) for u in ("team/a", "team_a", "..")}
    assert len(paths) == 3 and all(p.parent == tmp_path / "personalized" for p in paths)
    assert load_personalization(tmp_path, "team/a").expert == 0 and load_personalization(tmp_path, "team_a").expert == 1
    assert load_personalization(tmp_path, "..").user == ".."


def test_gumbel_run_resumes_to_the_same_parameters(tmp_path, monkeypatch, at_step):
    """``gumbel`` draws each step's expert from the torch RNG: a resumed run matches only if the checkpoint's RNG
    state is restored (the kill -9 test runs ``em``, which draws nothing)."""
    steps = ["em.schedule=gumbel", "train.max_steps=6", "train.save_steps=3", "experts.init_std=0.3"]
    reference = train(config(tmp_path, *steps, name="whole"))
    at_step(4)  # a crash as step 5 begins
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, *steps, name="crashed"))
    monkeypatch.undo()
    resumed = train(config(tmp_path, *steps, name="crashed"), resume=True)
    expected, got = (load_file(r / "checkpoint/params.safetensors") for r in (reference, resumed))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_sft_learns_the_preferred_answers_not_the_rejected_ones(tmp_path):
    """After SFT on 12 rows, the fine-tuned model's log-prob of the rows' chosen completions rose by much more than
    that of their rejected ones (measured by hand, one sequence at a time); SFT on the rejected answers would
    reverse it."""
    sft = ["sft.max_steps=40", "sft.learning_rate=1e-2", f"sft.output_dir={tmp_path / 's'}"]
    cfg = load_config(overrides=[*SMALL, "data.annotators_per_type=1", "data.pairs_per_annotator=6", *sft])
    tokenizer, model = build_base(cfg)
    rows = reference_rows(cfg)
    before = [(completion_logp(model, tokenizer, r.prompt, r.chosen),
               completion_logp(model, tokenizer, r.prompt, r.rejected)) for r in rows]  # fmt: skip
    folder = finetune.fine_tune(cfg, tokenizer, model, rows, tmp_path / "s")
    tuned = AutoModelForCausalLM.from_pretrained(folder)
    gain_chosen = sum(completion_logp(tuned, tokenizer, r.prompt, r.chosen) - b[0] for r, b in zip(rows, before))
    gain_rejected = sum(completion_logp(tuned, tokenizer, r.prompt, r.rejected) - b[1] for r, b in zip(rows, before))
    assert gain_chosen / len(rows) > gain_rejected / len(rows) + math.log(2), (gain_chosen, gain_rejected)
