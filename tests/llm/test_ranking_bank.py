"""LLM expert banks on ranking batches (issue 20): each completion's log-prob per expert, the pushed backward
against autograd, and one EM step of a Plackett–Luce mixture against the closed form's gradient."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from moedpo.data.builtin import make_builtin_rows, tiny_causal_lm
from moedpo.data.formats import normalise_row
from moedpo.data.ranking_rows import RankingRow
from moedpo.data.tokenize import collate, collate_rankings, tokenize_rows
from moedpo.experts import HeadsBank, IndependentBank, LoRABank
from moedpo.inference import VariationalEM
from moedpo.losses import ranking_mixture_nll
from moedpo.models import mixture_pl_model

BANKS = [(LoRABank, {}), (HeadsBank, {"top_layers": 1}), (IndependentBank, {"init_std": 0.2})]


@pytest.fixture
def pairs():
    return [normalise_row(r, "builtin", i) for i, r in enumerate(make_builtin_rows(2, 3, seed=2))]


@pytest.fixture
def rankings(pairs, tokenizer):
    """Five rankings of 2 to 4 completions (unequal lengths in one batch), some observed only at the top."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i, n in enumerate([3, 2, 4, 3, 4]):
        completions = [pairs[i].chosen, pairs[i].rejected, pairs[i + 1].chosen, pairs[i + 1].rejected][:n]
        ranking = torch.randperm(n, generator=generator).tolist()
        rows.append(RankingRow(pairs[i].prompt, completions, ranking, ranked=[2, 1, 1, 2, 3][i]))
    examples = tokenize_rows(rows, tokenizer).examples
    return examples, collate_rankings(examples, tokenizer.pad_token_id)


def one_sequence(example, m):
    """The batch of completion m of one ranking alone (one row, no padding)."""
    ids = example["prompt_ids"][m] + example["completion_ids"][m]
    mask = [0] * len(example["prompt_ids"][m]) + [1] * len(example["completion_ids"][m])
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "completion_mask": torch.tensor([mask]),
        "index": torch.tensor([-1]),
    }


@pytest.mark.parametrize("cls, options", BANKS, ids=["lora", "heads", "independent"])
def test_each_completions_log_prob_is_its_own_sequences(cls, options, tiny_model, rankings):
    """completion_logps[i, m, k] is expert k's log-prob of completion m of ranking i run alone (the batch's
    padding and the other rankings change nothing); a ranking's missing completions are 0."""
    examples, batch = rankings
    bank = cls(tiny_model, 2, **options)
    out = bank.margins(batch)
    assert out["completion_logps"].shape == (5, 4, 2) and out["ref_completion_logps"].shape == (5, 4)
    assert torch.equal(out["ranking"], batch["ranking"]) and torch.equal(out["ranked"], batch["ranked"])
    for i, example in enumerate(examples):
        n = len(example["completion_ids"])
        assert (out["completion_logps"][i, n:] == 0).all() and (out["ref_completion_logps"][i, n:] == 0).all()
        for m in range(n):
            alone = one_sequence(example, m)
            with torch.no_grad():
                expected = torch.stack([bank.expert_logps(k, alone)[0] for k in range(2)])
                reference, _ = bank.reference_pass(alone)
            torch.testing.assert_close(out["completion_logps"][i, m], expected, atol=2e-5, rtol=0)
            torch.testing.assert_close(out["ref_completion_logps"][i, m], reference[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("cls, options", BANKS, ids=["lora", "heads", "independent"])
def test_pushed_backward_on_rankings_equals_autograd(cls, options, tiny_model, rankings):
    """backward(batch, d completion_logps (B, M, K)) leaves the gradients autograd gives; an expert whose
    gradient is zero on a ranking does not run on it."""
    _, batch = rankings
    bank = cls(tiny_model, 2, **options)
    grad = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(1)) * batch["ranking_mask"].unsqueeze(-1)
    grad[1, :, 0] = 0  # ranking 1 routed away from expert 0
    grad[3, 0, 1] = 0  # ranking 3: no gradient on its first completion, some on the others
    bank.backward(batch, grad)
    pushed = {n: p.grad.clone() for n, p in bank.trainable_parameters().items() if p.grad is not None}
    for p in bank.trainable_parameters().values():
        p.grad = None
    total = sum(
        (bank.expert_logps(k, batch).reshape(4, 5).T * grad[..., k]).sum() for k in range(bank.num_experts)
    )  # (M * B,) rows in completion blocks -> (B, M)
    total.backward()
    autograd = {n: p.grad for n, p in bank.trainable_parameters().items() if p.grad is not None}
    assert pushed.keys() == autograd.keys() and pushed
    for name in pushed:
        torch.testing.assert_close(pushed[name], autograd[name], atol=1e-6, rtol=1e-5)


def test_one_em_step_on_llm_rankings_takes_the_marginal_nll_gradient(tiny_model, rankings):
    """Plackett–Luce mixture, K = 2 LoRA experts, fixed gate: the loop's loss is the closed-form mean NLL over the
    batch's rankings (top-k ones included) and its SGD step (lr 1) is minus that NLL's gradient."""
    _, batch = rankings
    bank = LoRABank(tiny_model, 2)
    params = bank.trainable_parameters()
    gate = torch.tensor([[0.3, -0.3]]).expand(5, 2)
    beta = 0.5
    with torch.no_grad():
        ref = bank.reference(batch)["ref_completion_logps"]
    h = torch.stack([bank.expert_logps(k, batch).reshape(4, 5).T for k in range(2)], -1) - ref.unsqueeze(-1)
    nll = ranking_mixture_nll(h, gate, beta, batch["ranking"], batch["ranking_mask"], ranked=batch["ranked"])
    grads = torch.autograd.grad(nll.mean(), list(params.values()))
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(list(params.values()), lr=1.0)
    loop = VariationalEM(bank, lambda _b, _o: gate, optimizer, beta=beta, model=mixture_pl_model)
    loss = loop.step(batch)
    assert loss == pytest.approx(float(nll.mean().detach()), abs=1e-5)
    for (name, p), grad in zip(params.items(), grads):
        torch.testing.assert_close(before[name] - p.detach(), grad, atol=1e-6, rtol=1e-4)
    assert 0 <= loop.metrics["rewards/accuracies"] <= 1 and "expert_1/rewards/margins" in loop.metrics


def test_rankings_of_two_are_the_pairs_log_probs(tiny_model, pairs, tokenizer):
    """A ranking [chosen, rejected] gives the pair batch's chosen and rejected log-probs, reference included."""
    rows = [RankingRow(p.prompt, [p.chosen, p.rejected], [0, 1], 1) for p in pairs[:4]]
    ranking_batch = collate_rankings(tokenize_rows(rows, tokenizer).examples, tokenizer.pad_token_id)
    pair_batch = collate(tokenize_rows(pairs[:4], tokenizer).examples, tokenizer.pad_token_id)
    bank = LoRABank(tiny_model, 2)
    ranked, paired = bank.margins(ranking_batch), bank.margins(pair_batch)
    torch.testing.assert_close(ranked["completion_logps"][:, 0], paired["chosen_logps"], atol=1e-6, rtol=0)
    torch.testing.assert_close(ranked["completion_logps"][:, 1], paired["rejected_logps"], atol=1e-6, rtol=0)
    torch.testing.assert_close(ranked["ref_completion_logps"][:, 1], paired["ref_rejected_logps"], atol=1e-6, rtol=0)
    torch.testing.assert_close(ranked["features"], paired["features"], atol=1e-6, rtol=0)


def test_the_reference_cache_of_rankings_saves_and_loads(tiny_model, rankings, tokenizer, tmp_path):
    """precompute_reference on ranking examples, saved through safetensors and loaded into a fresh bank, gives
    the same margins without running the reference again."""
    examples, batch = rankings
    bank = LoRABank(tiny_model, 2)
    bank.precompute_reference(examples, tokenizer.pad_token_id, batch_size=2)
    state = bank.reference_state()
    assert state["completion_counts"].tolist() == [3, 2, 4, 3, 4]
    save_file(state, tmp_path / "reference_logps.safetensors")
    model = tiny_causal_lm(len(tokenizer), hidden_size=32, num_layers=2, seed=0, pad_token_id=tokenizer.pad_token_id)
    fresh = LoRABank(model, 2)  # a second model: PEFT refuses to wrap one twice
    fresh.load_reference_state(load_file(tmp_path / "reference_logps.safetensors"))
    fresh.reference_pass = None  # any reference forward now would fail
    got, expected = fresh.reference(batch), bank.reference(batch)
    assert torch.equal(got["ref_completion_logps"], expected["ref_completion_logps"])
    assert torch.equal(got["features"], expected["features"])


def test_the_routed_schedule_refuses_a_ranking_batch(tiny_model, rankings):
    """A Python user's loop: routed draws z from a guide over pairs; a ranking batch is refused by name."""
    _, batch = rankings
    bank = LoRABank(tiny_model, 2)
    optimizer = torch.optim.SGD(list(bank.trainable_parameters().values()), lr=0.1)
    guide = torch.nn.Linear(1, 1)
    loop = VariationalEM(bank, lambda _b, _o: torch.zeros(5, 2), optimizer, beta=0.5, model=mixture_pl_model,
                         schedule="routed", guide=guide)  # fmt: skip
    with pytest.raises(ValueError, match="schedule='routed' takes pairs"):
        loop.step(batch)
