"""K LoRA experts in one grouped pass (issue 21, :mod:`moedpo.experts.grouped_lora`): each row's log-prob and
every adapter's gradient equal PEFT's forward with that row's expert active; EM steps of a batched bank equal
those of the same bank running its experts in turn (float32: log-probs within 1e-5, parameters after three AdamW
steps within 1e-5); where the grouped pass does not apply, the bank says why and runs experts in turn."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moedpo.assembly.components import build_bank
from moedpo.config import ConfigError, load_config
from moedpo.data.builtin import make_builtin_rows, tiny_causal_lm
from moedpo.data.formats import normalise_row
from moedpo.data.ranking_rows import RankingRow
from moedpo.data.tokenize import collate, collate_rankings, tokenize_rows
from moedpo.experts import HeadsBank, LoRABank, sequence_logps
from moedpo.experts.grouped_lora import grouped_sequence_logps
from moedpo.inference import VariationalEM
from moedpo.models import AmortizedGuide, FixedGate, mixture_pl_model

SEQUENCE_KEYS = ("input_ids", "attention_mask", "completion_mask")
BANKS = [(LoRABank, {}), (HeadsBank, {"top_layers": 1})]


@pytest.fixture
def rows():
    return [normalise_row(r, "builtin", i) for i, r in enumerate(make_builtin_rows(3, 3, seed=5))]


@pytest.fixture
def batch(rows, gpt2_tokenizer):
    """Seven pairs (14 sequence rows of unequal lengths) through a byte-level BPE tokenizer."""
    return collate(tokenize_rows(rows, gpt2_tokenizer).examples[:7], gpt2_tokenizer.eos_token_id)  # no pad: EOS


def _bank(cls, options, tokenizer, k, **extra):
    torch.manual_seed(0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = tiny_causal_lm(len(tokenizer), 32, 2, seed=0, pad_token_id=pad)
    return cls(model, k, init_std=0.3, **options, **extra)


def _grads(bank):
    out = {n: p.grad.clone() for n, p in bank.trainable_parameters().items() if p.grad is not None}
    for p in bank.trainable_parameters().values():
        p.grad = None
    return out


@pytest.mark.parametrize("cls, options", BANKS, ids=["lora", "heads"])
def test_each_row_equals_pefts_forward_with_its_expert_active(cls, options, gpt2_tokenizer, batch):
    """Rows in no order by expert, expert 3 with none: log-probs and every adapter's gradient of the grouped pass
    equal PEFT's, expert by expert on its own rows (expert 3: no gradient, as PEFT gives it)."""
    bank = _bank(cls, options, gpt2_tokenizer, 4)
    assert bank.grouped
    rows = torch.tensor([9, 0, 3, 13, 4, 1, 12, 5, 2, 7])  # a few of the 14 sequence rows
    experts = torch.tensor([2, 0, 2, 1, 0, 0, 1, 2, 2, 1])
    weights = torch.linspace(-1.0, 2.0, rows.numel())
    bank.train_mode()
    got = bank.grouped_logps(batch, rows, experts)
    (got * weights).sum().backward()
    grouped = _grads(bank)

    expected = torch.zeros(rows.numel())
    for k in range(3):
        at = torch.nonzero(experts == k).squeeze(-1)
        sub = {key: batch[key][rows[at]] for key in SEQUENCE_KEYS}
        bank.activate(k)
        if cls is HeadsBank:
            values = bank._top_logps(sub, bank.trunk(batch)[rows[at]])
        else:
            values = sequence_logps(bank.model, *(sub[key] for key in SEQUENCE_KEYS))
        (values * weights[at]).sum().backward()
        expected[at] = values.detach()
    per_expert = _grads(bank)
    assert torch.allclose(got.detach(), expected, atol=1e-5)
    assert grouped.keys() == per_expert.keys() and not any(".expert_3." in n for n in grouped)
    assert {n.split(".")[-2] for n in grouped} == {"expert_0", "expert_1", "expert_2"}
    for name in grouped:
        assert torch.allclose(grouped[name], per_expert[name], atol=1e-6), name


def test_the_head_under_a_global_hook_takes_pefts_forward_with_the_same_result(gpt2_tokenizer, batch):
    """A global module hook (here the FLOP counter's) turns the fused head off: each expert's head then runs
    through PEFT's forward with that expert's adapter, and the log-probs do not change."""
    bank = _bank(LoRABank, {}, gpt2_tokenizer, 3)
    experts = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    inputs = [batch[key][:7] for key in SEQUENCE_KEYS]
    with torch.no_grad():
        fused = grouped_sequence_logps(bank.model, bank.names, experts, *inputs)
        with FlopCounterMode(display=False):
            plain = grouped_sequence_logps(bank.model, bank.names, experts, *inputs)
    assert torch.allclose(fused, plain, atol=1e-5)


def _loop(bank, k, schedule):
    gate = FixedGate(k)
    guide = AmortizedGuide(3 * 32, k) if schedule == "routed" else None
    params = [*bank.trainable_parameters().values(), *gate.parameters(), *(guide.parameters() if guide else [])]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model = {"model": mixture_pl_model} if schedule == "rankings" else {}
    return VariationalEM(
        bank,
        lambda b, _: gate(b["index"].numel()),
        optimizer,
        beta=0.5,
        schedule="em" if schedule == "rankings" else schedule,
        guide=guide,
        **model,
    )


@pytest.fixture
def rankings(rows, gpt2_tokenizer):
    """Five rankings of 2 to 4 completions (unequal lengths in one batch)."""
    out = []
    for i, n in enumerate([3, 2, 4, 3, 4]):
        completions = [rows[i].chosen, rows[i].rejected, rows[i + 1].chosen, rows[i + 1].rejected][:n]
        out.append(RankingRow(rows[i].prompt, completions, list(range(n))[::-1], ranked=n))
    return collate_rankings(tokenize_rows(out, gpt2_tokenizer).examples, gpt2_tokenizer.eos_token_id)


@pytest.mark.parametrize("schedule", ["em", "gumbel", "routed", "rankings"])
@pytest.mark.parametrize("cls, options", BANKS, ids=["lora", "heads"])
def test_batched_em_steps_equal_the_experts_in_turn(cls, options, schedule, gpt2_tokenizer, batch, rankings):
    """Three EM steps (AdamW, lr 1e-2) of a batched bank and of the same bank with experts in turn (E-step on
    the update's graph or not, as ``experts.reuse_graph=auto`` picks): the same losses and parameters."""
    data = rankings if schedule == "rankings" else batch
    losses, params = [], []
    for batched in (True, False):
        bank = _bank(cls, options, gpt2_tokenizer, 3, batched=batched)
        bank.reuse_graph = batched and schedule in ("em", "rankings")
        start = {n: p.detach().clone() for n, p in bank.trainable_parameters().items()}
        torch.manual_seed(1)
        loop = _loop(bank, 3, schedule)
        losses.append([loop.step(data) for _ in range(3)])
        params.append({n: p.detach().clone() for n, p in bank.trainable_parameters().items()})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert sum(not torch.equal(start[n], params[1][n]) for n in start) > len(start) // 2  # the steps trained
    for name in params[0]:
        assert torch.allclose(params[0][name], params[1][name], atol=1e-5), name


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning")  # PEFT, on GPT-2's Conv1D
def test_where_the_grouped_pass_does_not_apply_the_bank_says_why(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False)
        return GPT2LMHeadModel(config)

    assert LoRABank(gpt2(), 2).batched  # all-linear+head: only its nn.Linear head has LoRA
    bank = LoRABank(gpt2(), 2, target_modules=["c_attn"])  # GPT-2's attention is a Conv1D
    assert not bank.grouped and not bank.batched and "Conv1D" in bank.grouped_reason
    with pytest.raises(ValueError, match="experts.batched=true.*Conv1D"):
        LoRABank(gpt2(), 2, target_modules=["c_attn"], batched=True)
    one = LoRABank(tiny_causal_lm(len(tokenizer), 32, 2, pad_token_id=tokenizer.pad_token_id), 1, batched=True)
    assert not one.grouped and "one expert" in one.grouped_reason  # not an error: num_experts=auto fits K=1 too
    assert one.pass_note() == ""
    two = LoRABank(tiny_causal_lm(len(tokenizer), 32, 2, pad_token_id=tokenizer.pad_token_id), 2)
    assert two.batched and two.pass_note() == "2 experts in one grouped pass (experts.batched)"
    assert two.pass_note(sharded=True) == "experts in turn (train.parallel=fsdp)"  # the run's log, before sharding
    two.lockstep = object()  # train.parallel=fsdp: sharded layers run one expert per forward
    assert two.grouped and not two.batched and two.pass_note() == "experts in turn (train.parallel=fsdp)"
    assert "in turn (LoRA on Conv1D" in bank.pass_note()


def test_the_run_config_picks_the_grouped_pass_and_the_e_step_on_its_graph():
    config = load_config(overrides=["model.hidden_size=32", "experts.num_experts=3"])
    model = tiny_causal_lm(64, 32, 2, pad_token_id=0)
    bank = build_bank(config, model, torch.device("cpu"))
    assert bank.batched and bank.reuse_graph  # the grouped update holds every expert's activations anyway
    config = load_config(overrides=["experts.num_experts=3", "experts.batched=false"])
    bank = build_bank(config, tiny_causal_lm(64, 32, 2, pad_token_id=0), torch.device("cpu"))
    assert not bank.batched and not bank.reuse_graph
    config = load_config(overrides=["experts.num_experts=3", "em.schedule=gumbel"])
    bank = build_bank(config, tiny_causal_lm(64, 32, 2, pad_token_id=0), torch.device("cpu"))
    assert bank.batched and not bank.reuse_graph  # sparse: only the drawn experts' rows, in one pass
    with pytest.raises(ConfigError, match="experts.batched=true"):
        load_config(overrides=["experts.mode=independent", "experts.batched=true"])


def test_lora_dropout_acts_in_the_grouped_update_only(tokenizer):
    """experts.lora_dropout: the grouped E-step pass is deterministic (eval mode); the update's pass draws."""
    rows = [normalise_row(r, "builtin", i) for i, r in enumerate(make_builtin_rows(2, 3, seed=0))]
    batch = collate(tokenize_rows(rows, tokenizer).examples[:4], tokenizer.pad_token_id)
    bank = _bank(LoRABank, {}, tokenizer, 2, dropout=0.5)
    first, second = bank.margins(batch)["chosen_logps"], bank.margins(batch)["chosen_logps"]
    assert bank.batched and torch.equal(first, second)
    bank.train_mode()
    every, experts = torch.arange(8), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    drawn = [bank.grouped_logps(batch, every, experts).detach() for _ in range(2)]
    assert not torch.equal(drawn[0], drawn[1])
