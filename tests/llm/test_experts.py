"""Expert banks: log-probs against a float64 twin, push() against autograd, caching, sparsity, errors."""

import pytest
import torch

from moedpo.data.builtin import make_builtin_rows
from moedpo.data.formats import normalise_row
from moedpo.data.tokenize import collate, tokenize_rows
from moedpo.experts import HeadsBank, IndependentBank, LoRABank, selective_log_softmax, sequence_logps


@pytest.fixture
def batch(tokenizer):
    rows = [normalise_row(r, "builtin", i) for i, r in enumerate(make_builtin_rows(2, 3, seed=2))]
    return collate(tokenize_rows(rows, tokenizer).examples[:6], tokenizer.pad_token_id)


def test_sequence_logps_match_float64_twin(tiny_model, batch):
    model = tiny_model.double()
    got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token = torch.log_softmax(logits, -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (token * batch["completion_mask"][:, 1:]).sum(-1)
    assert torch.allclose(got, expected, atol=1e-10)


def test_selective_log_softmax_bf16_rows_upcast():
    logits = torch.randn(3, 5, 11).bfloat16()
    labels = torch.randint(11, (3, 5))
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, labels), expected, atol=1e-6)


BANKS = [(LoRABank, {}), (HeadsBank, {"top_layers": 1}), (IndependentBank, {"init_std": 0.2})]


@pytest.mark.parametrize("cls, options", BANKS, ids=["lora", "heads", "independent"])
def test_backward_equals_autograd_and_experts_start_apart(cls, options, tiny_model, batch):
    bank = cls(tiny_model, 3, **options)
    out = bank.margins(batch)
    h = out["chosen_logps"] - out["rejected_logps"]
    assert h.shape == (6, 3) and out["features"].shape == (6, 32) and not h.requires_grad
    assert (h[:, 0] - h[:, 1]).abs().max() > 1e-4  # distinct initialisation
    grad_h = torch.randn(6, 3)
    bank.backward(batch, grad_h, -grad_h)
    pushed = {n: p.grad.clone() for n, p in bank.trainable_parameters().items() if p.grad is not None}
    for p in bank.trainable_parameters().values():
        p.grad = None
    total = 0
    for k in range(3):
        chosen, rejected = bank.expert_logps(k, batch).chunk(2)
        h = (chosen - out["ref_chosen_logps"]) - (rejected - out["ref_rejected_logps"])
        total = total + (h * grad_h[:, k]).sum()
    total.backward()
    autograd = {n: p.grad for n, p in bank.trainable_parameters().items() if p.grad is not None}
    assert pushed.keys() == autograd.keys() and pushed
    for name in pushed:
        assert torch.allclose(pushed[name], autograd[name], atol=1e-6), name


def test_reference_is_computed_once_per_example(tiny_model, batch):
    bank = LoRABank(tiny_model, 2)
    calls = []
    original = bank.reference_pass
    bank.reference_pass = lambda b: calls.append(1) or original(b)
    first = bank.margins(batch)
    second = bank.margins(batch)
    assert len(calls) == 1 and torch.equal(first["ref_chosen_logps"], second["ref_chosen_logps"])
    with bank.model.disable_adapter():  # the reference is the base with adapters disabled
        ref = sequence_logps(bank.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert torch.allclose(first["ref_chosen_logps"], ref.chunk(2)[0])


@pytest.mark.parametrize("batched", [False, True], ids=["expert-after-expert", "grouped"])
def test_sparse_backward_runs_only_routed_pairs(tiny_model, batch, batched):
    bank = LoRABank(tiny_model, 3, batched=batched)
    bank.margins(batch)
    sizes = []
    original, grouped = bank.expert_logps, bank.grouped_logps
    bank.expert_logps = lambda k, b: sizes.append((k, b["index"].numel())) or original(k, b)
    bank.grouped_logps = lambda b, rows, experts: sizes.append(experts.tolist()) or grouped(b, rows, experts)
    grad_h = torch.zeros(6, 3)
    grad_h[[0, 1], 0] = 1.0  # two pairs routed to expert 0, one to expert 2, none to expert 1
    grad_h[4, 2] = -1.0
    bank.backward(batch, grad_h, -grad_h)
    # grouped: one pass of the pairs' chosen and rejected rows, by expert
    assert sizes == ([[0, 0, 0, 0, 2, 2]] if batched else [(0, 2), (2, 1)])


def test_caches_hold_small_cpu_copies_not_views_of_batches(tiny_model, batch):
    """Cached reference log-probs and features are CPU tensors owning their own (tiny) storage: a view would pin
    the whole batch tensor it was cut from, on the device, for the whole run."""
    bank = LoRABank(tiny_model, 2)
    bank.margins(batch)
    for chosen, _ in bank._ref_cache.values():
        assert chosen.device.type == "cpu" and chosen.untyped_storage().nbytes() == chosen.element_size()
    for features in bank._feature_cache.values():
        assert features.untyped_storage().nbytes() == features.numel() * features.element_size()
    probe = {**batch, "index": -1 - batch["index"]}  # routing probes (negative index) are never cached
    bank.margins(probe)
    assert len(bank._ref_cache) == batch["index"].numel()


def test_dropout_is_off_for_the_e_step_and_on_for_the_update(tiny_model, batch):
    """lora_dropout acts in the update's forward only; the no-grad E-step pass is deterministic (eval mode)."""
    bank = LoRABank(tiny_model, 1, dropout=0.5, init_std=0.5)
    first, second = bank.margins(batch)["chosen_logps"], bank.margins(batch)["chosen_logps"]
    assert torch.equal(first, second) and not bank.model.training
    modes = []
    original = bank.expert_logps
    bank.expert_logps = lambda k, b: modes.append(bank.model.training) or original(k, b)
    bank.backward(batch, torch.ones(6, 1), -torch.ones(6, 1))
    assert modes == [True]
    bank.expert_logps = original  # after an update (train mode), the next E-step pass is deterministic again
    again = bank.margins(batch)["chosen_logps"]
    assert torch.equal(again, bank.margins(batch)["chosen_logps"]) and not bank.model.training


def test_heads_trunk_runs_once_and_matches_full_forward(tiny_model, batch):
    bank = HeadsBank(tiny_model, 2, top_layers=1)
    with bank.model.disable_adapter():
        full = sequence_logps(bank.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        split = bank._top_logps(batch)
    assert torch.allclose(full, split, atol=1e-5)
    trunk = bank.trunk(batch)
    assert bank.trunk(batch) is trunk  # cached for every expert of this batch


def test_heads_mode_refuses_models_without_a_layer_stack(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="use experts.mode=lora"):
        HeadsBank(model, 2)


def test_lora_experts_save_as_standard_peft_folders(tiny_model, batch, tmp_path):
    from peft import PeftModel

    from moedpo.data.builtin import tiny_causal_lm

    bank = LoRABank(tiny_model, 2)
    logps = bank.margins(batch)["chosen_logps"]  # (B, K)
    bank.save_experts(tmp_path)
    for k in range(2):
        base = tiny_causal_lm(tiny_model.config.vocab_size, 32, 2, pad_token_id=tiny_model.config.pad_token_id)
        plain = PeftModel.from_pretrained(base, str(tmp_path / f"expert_{k}"))
        got = sequence_logps(plain, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        assert torch.allclose(got.detach().chunk(2)[0], logps[:, k], atol=1e-5)


def _probe(generator, vocab_size: int) -> dict:
    """A new user's probe batch: 2 pairs (4 sequences of 10 tokens, the last 4 the completion), index -1, -2."""
    return {
        "input_ids": torch.randint(3, vocab_size, (4, 10), generator=generator),
        "attention_mask": torch.ones(4, 10, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(4, 6), torch.ones(4, 4)], 1).long(),
        "index": torch.tensor([-1, -2]),
    }


def _full_forward_logps(bank, batch) -> torch.Tensor:
    """Each expert's log-probs (2B, K) through the whole model, no trunk split, no cache: expert k's adapters sit
    on the top layers only, so this is what trunk + top layers must give."""
    with torch.no_grad():
        columns = []
        for k in range(bank.num_experts):
            bank.activate(k)
            ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            columns.append(sequence_logps(bank.model, ids, mask, completion, fused=False))
        return torch.stack(columns, -1)


def test_heads_trunk_cache_never_serves_another_batch(tiny_model):
    """The trunk cache was keyed by (data_ptr, shape, index): a probe batch written into the same memory (here the
    very tensor, overwritten in place: what address reuse does to freed probe batches) got the old batch's trunk."""
    bank = HeadsBank(tiny_model, 2, top_layers=1)
    generator = torch.Generator().manual_seed(0)
    vocab = tiny_model.config.vocab_size
    probe = _probe(generator, vocab)
    bank.margins(probe)
    probe["input_ids"].copy_(torch.randint(3, vocab, (4, 10), generator=generator))  # same tensor, shape, index
    got = bank.margins(probe)
    expected = _full_forward_logps(bank, probe)
    assert torch.allclose(torch.cat([got["chosen_logps"], got["rejected_logps"]]), expected, atol=1e-5)


def test_heads_margins_of_consecutive_probe_batches_are_their_own(tiny_model):
    """New users' probe batches all have index -1..-n and one shape; each must get its own trunk. Each batch here
    is a new tensor at the address of the last one (``set_`` on one storage), as an allocator reusing freed
    memory places it, so the test does not depend on the allocator's luck."""
    bank = HeadsBank(tiny_model, 2, top_layers=1)
    generator = torch.Generator().manual_seed(1)
    memory = torch.empty(4 * 10, dtype=torch.long).untyped_storage()
    for _ in range(6):
        probe = _probe(generator, tiny_model.config.vocab_size)
        ids = torch.tensor([], dtype=torch.long).set_(memory, 0, (4, 10))
        probe["input_ids"] = ids.copy_(probe["input_ids"])
        got = bank.margins(probe)
        expected = _full_forward_logps(bank, probe)
        assert torch.allclose(torch.cat([got["chosen_logps"], got["rejected_logps"]]), expected, atol=1e-5)


@pytest.mark.parametrize("batched", [False, True], ids=["expert-after-expert", "grouped"])
def test_heads_trunk_is_reused_by_margins_and_backward_of_one_batch(tiny_model, batch, batched):
    """The training case keeps its cache: margins() and backward() of one batch run the trunk once."""
    bank = HeadsBank(tiny_model, 2, top_layers=1, batched=batched)
    calls = []
    original = bank.decoder.forward
    bank.decoder.forward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    bank.margins(batch)
    trunk_runs = len(calls)  # the reference pass runs the whole model, which also goes through the decoder
    bank.backward(batch, torch.ones(6, 2), -torch.ones(6, 2))
    # backward: each expert's top layers (grouped: both in one pass), no new trunk
    assert trunk_runs >= 1 and len(calls) == trunk_runs + (1 if batched else 2)
