"""Each fast path gives the losses and gradients of the plain path (float32, tolerance 1e-5 unless stated):
the fused chunked output head, the E-step on the update's own graph, reference log-probs computed once."""

import pytest
import torch
from transformers import LlamaForCausalLM

from moedpo.config import load_config
from moedpo.data.builtin import make_builtin_rows, tiny_causal_lm
from moedpo.data.formats import normalise_row
from moedpo.data.tokenize import collate, tokenize_rows
from moedpo.experts import HeadsBank, LoRABank
from moedpo.experts import logprobs as lp
from moedpo.inference import VariationalEM
from moedpo.models import FixedGate
from moedpo.runs import REFERENCE_FILE
from moedpo.training import train


@pytest.fixture
def batch(tokenizer):
    rows = [normalise_row(r, "builtin", i) for i, r in enumerate(make_builtin_rows(2, 4, seed=4))]
    return collate(tokenize_rows(rows, tokenizer).examples[:6], tokenizer.pad_token_id)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [lp.MAX_CHUNK_ELEMENTS, 3], ids=["one-chunk", "3-positions"])
def test_fused_head_matches_the_plain_forward(tokenizer, batch, monkeypatch, chunk):
    bank = LoRABank(tiny_causal_lm(len(tokenizer), 32, 2, pad_token_id=tokenizer.pad_token_id), 1, init_std=0.3)
    vocab = bank.model.get_base_model().get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(lp, "MAX_CHUNK_ELEMENTS", chunk * vocab if chunk == 3 else chunk)
    sizes = []
    fused_head = lp.fused_head_log_softmax
    monkeypatch.setattr(lp, "fused_head_log_softmax", lambda *a: sizes.append(a[3]) or fused_head(*a))
    values, grads = [], []
    for fused in (False, True):
        bank.model.zero_grad()
        logps = lp.sequence_logps(
            bank.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], fused=fused
        )
        (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
        values.append(logps.detach())
        grads.append(_grads(bank.model))
    assert torch.allclose(values[0], values[1], atol=1e-5)
    assert sizes == [min(chunk, lp.MAX_CHUNK_ELEMENTS // vocab)]  # the patched budget reached the fused head
    assert grads[0].keys() == grads[1].keys() and any("lm_head" in n for n in grads[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


class ScaledHead(LlamaForCausalLM):
    """A model whose forward does more than head(hidden) (like logit soft-capping or scaling)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2 * out.logits
        return out


def _tiny(config_class, **extra):
    from transformers import AutoModelForCausalLM

    sizes = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_class(**sizes, num_key_value_heads=2, **extra))


def test_logit_soft_capping_and_scaling_in_the_config_use_the_plain_path():
    """Gemma 2 soft-caps (c tanh(logits / c)), Cohere scales: on a random model the probe alone would miss the
    soft-capping (~1e-5 relative), so the config decides."""
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert not lp.fusable(_tiny(Gemma2Config, head_dim=8))
    assert not lp.fusable(_tiny(CohereConfig))
    assert not lp.fusable(_tiny(GraniteConfig, logits_scaling=1.05))
    assert lp.fusable(_tiny(GraniteConfig, logits_scaling=1.0)) and lp.fusable(_tiny(LlamaConfig))


def test_the_probe_runs_without_dropout_and_leaves_train_mode_as_it_was():
    """A model in train mode with dropout: the probe's two passes would draw different masks and cache False."""
    from transformers import Qwen2Config

    model = _tiny(Qwen2Config, attention_dropout=0.5).train()
    state = torch.random.get_rng_state()
    assert lp.fusable(model)
    assert all(module.training for module in model.modules())
    assert torch.equal(torch.random.get_rng_state(), state)  # no random numbers used


def test_forward_arguments_other_than_inputs_embeds_take_the_plain_path(tokenizer, batch):
    model = tiny_causal_lm(len(tokenizer), 32, 2, pad_token_id=tokenizer.pad_token_id)
    args = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    positions = torch.arange(batch["input_ids"].shape[1]).remainder(4).expand_as(batch["input_ids"])
    got = lp.sequence_logps(model, *args, position_ids=positions)
    assert torch.equal(got, lp.sequence_logps(model, *args, position_ids=positions, fused=False))
    assert not torch.allclose(got, lp.sequence_logps(model, *args), atol=1e-3)  # the positions did matter
    with pytest.raises(ValueError, match="position_ids"):
        lp.sequence_logps(model, *args, position_ids=positions, fused=True)


def test_models_whose_logits_are_not_head_of_hidden_use_the_plain_path(tokenizer, batch):
    plain = tiny_causal_lm(len(tokenizer), 32, 2, pad_token_id=tokenizer.pad_token_id)
    scaled = ScaledHead(plain.config)
    scaled.load_state_dict(plain.state_dict())
    assert lp.fusable(plain) and not lp.fusable(scaled)
    got = lp.sequence_logps(scaled, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    expected = lp.sequence_logps(
        scaled, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], fused=False
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("cls, k", [(LoRABank, 1), (LoRABank, 3), (HeadsBank, 2)], ids=["lora-1", "lora-3", "heads-2"])
def test_e_step_on_the_updates_graph_equals_the_second_forward(tokenizer, batch, cls, k):
    """One EM step (SGD, lr 0): gradients with the graph reused equal those of the no-grad pass + per-expert
    forward/backward, and every expert runs once instead of twice."""
    grads, calls = [], []
    for reuse in (False, True):
        torch.manual_seed(0)
        model = tiny_causal_lm(len(tokenizer), 32, 2, pad_token_id=tokenizer.pad_token_id)
        bank = cls(model, k, init_std=0.3, reuse_graph=reuse, batched=False)  # counts per-expert passes
        count = []
        original = bank.expert_logps
        bank.expert_logps = lambda j, b, original=original, count=count: count.append(j) or original(j, b)
        gate = FixedGate(k)
        optimizer = torch.optim.SGD([*bank.trainable_parameters().values(), *gate.parameters()], lr=0.0)
        loop = VariationalEM(bank, lambda b, _, gate=gate: gate(b["index"].numel()), optimizer, beta=0.5)
        loop.step(batch)
        grads.append({n: p.grad.clone() for n, p in bank.trainable_parameters().items() if p.grad is not None})
        calls.append(len(count))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name
    assert calls == [2 * k, k]


def test_reference_log_probs_are_computed_once_and_kept_with_the_run(tmp_path, monkeypatch):
    overrides = [
        f"train.output_dir={tmp_path / 'run'}",
        "model.hidden_size=32",
        "data.annotators_per_type=2",
        "data.pairs_per_annotator=8",
        "train.max_steps=4",
        "train.save_steps=2",
        "train.eval_steps=2",
    ]
    calls = []
    original = LoRABank.reference_pass
    monkeypatch.setattr(
        LoRABank, "reference_pass", lambda self, b: calls.append(b["index"].numel()) or original(self, b)
    )
    run = train(load_config(overrides=overrides))
    assert sum(calls) == 32  # every training and held-out example once, then never again (4 steps, 2 evals)
    assert (run / REFERENCE_FILE).exists()
    calls.clear()
    train(load_config(overrides=[*overrides, "train.max_steps=6"]), resume=True)
    assert calls == []  # --resume reads them from the run directory


@pytest.mark.parametrize("cls", [LoRABank, HeadsBank], ids=["lora", "heads"])
def test_routed_margins_run_each_pair_through_its_expert_only(tokenizer, batch, cls):
    """margins(route=z): each pair's routed entry equals the dense pass, with the same gradient (pushed by the
    plain per-expert backward); other entries are zero and constant; each expert runs once, on its own pairs
    (heads: the trunk once per batch)."""
    torch.manual_seed(0)
    model = tiny_causal_lm(len(tokenizer), 32, 2, pad_token_id=tokenizer.pad_token_id)
    bank = cls(model, 3, init_std=0.3, batched=False)  # the grouped pass: tests/llm/test_grouped_lora.py
    route = torch.tensor([2, 0, 2, 2, 0, 2])  # expert 1 gets no pair
    weights = torch.linspace(-1, 1, 12).reshape(2, 6)
    dense = bank.margins(batch)  # no graph: the E-step pass
    picked = torch.nn.functional.one_hot(route, 3).float()
    bank.backward(batch, weights[0, :, None] * picked, weights[1, :, None] * picked)
    expected = {n: p.grad.clone() for n, p in bank.trainable_parameters().items() if p.grad is not None}
    for p in bank.trainable_parameters().values():
        p.grad = None

    rows_seen = []
    original = bank.rows_logps
    bank.rows_logps = lambda k, b, rows: rows_seen.append((k, rows.tolist())) or original(k, b, rows)
    trunk_calls = []
    if cls is HeadsBank:
        trunk = bank.trunk
        bank.trunk = lambda b: trunk_calls.append(1) or trunk(b)
    routed = bank.margins(batch, route=route)
    for key in ("chosen_logps", "rejected_logps"):
        assert torch.allclose(routed[key] * picked, dense[key] * picked, atol=1e-5)
        assert torch.equal(routed[key] * (1 - picked), torch.zeros_like(picked))
    (
        (routed["chosen_logps"] * weights[0, :, None]).sum() + (routed["rejected_logps"] * weights[1, :, None]).sum()
    ).backward()
    got = {n: p.grad for n, p in bank.trainable_parameters().items() if p.grad is not None}
    assert got.keys() == expected.keys() and not any(".expert_1." in n for n in got)
    for name in got:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    assert rows_seen == [(0, [1, 4]), (2, [0, 2, 3, 5])]
    if cls is HeadsBank:
        assert len(trunk_calls) == 2  # one trunk for the batch, sliced per expert (the trunk is cached per batch)
