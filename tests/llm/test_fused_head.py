"""The fused output head (hand-written backward) against autograd through the head module itself, in float64
(tolerance 1e-10) and float32 (1e-5): values and the gradients of every operand, one chunk or several."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from moedpo.experts.fused_head import fused_head_log_softmax, head_parts

V, D, M = 37, 12, 23


class Head(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.lm_head = nn.Linear(D, V, bias=bias)

    def forward(self, x):
        return self.lm_head(x)


def _lora_head(adapters: int, dropout: float = 0.0, **options):
    torch.manual_seed(0)
    model = get_peft_model(
        Head(bias=True), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], lora_dropout=dropout, **options)
    )
    for k in range(1, adapters):
        model.add_adapter(f"extra_{k}", LoraConfig(r=3, lora_alpha=9, target_modules=["lm_head"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.3)  # B starts at zero: make the LoRA term count
    names = ["default", *(f"extra_{k}" for k in range(1, adapters))]
    model.base_model.set_adapter(names)  # several active adapters: their terms add up
    return model.base_model.model.lm_head


def _autograd(head, hidden, labels):
    return torch.log_softmax(head(hidden), -1).gather(-1, labels[:, None]).squeeze(-1)


def _values_and_grads(fn, head, hidden, weights):
    for p in head.parameters():
        p.grad = None
    x = hidden.clone().requires_grad_(True)
    out = fn(x)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _check(head, dtype, size, atol):
    head = head.to(dtype)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(M, D, generator=generator, dtype=dtype)
    labels = torch.randint(V, (M,), generator=generator)
    weights = torch.randn(M, generator=generator, dtype=dtype)  # d loss / d logp per position, signs mixed
    parts = head_parts(head)
    assert parts is not None
    got = _values_and_grads(lambda x: fused_head_log_softmax(parts, x, labels, size), head, hidden, weights)
    expected = _values_and_grads(lambda x: _autograd(head, x, labels), head, hidden, weights)
    assert torch.allclose(got[0], expected[0], atol=atol)
    assert torch.allclose(got[1], expected[1], atol=atol)
    assert got[2].keys() == expected[2].keys() and got[2]
    for name in expected[2]:
        assert torch.allclose(got[2][name], expected[2][name], atol=atol), name


@pytest.mark.parametrize("size", [M, 5], ids=["one-chunk", "chunks-of-5"])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_linear_head_with_bias_trained_in_full(size, dtype, atol):
    torch.manual_seed(0)
    _check(nn.Linear(D, V), dtype, size, atol)


@pytest.mark.parametrize("size", [M, 5], ids=["one-chunk", "chunks-of-5"])
@pytest.mark.parametrize("adapters", [1, 2])
def test_lora_head_one_or_two_active_adapters(size, adapters):
    head = _lora_head(adapters)
    assert len(head_parts(head).loras) == adapters
    _check(head, torch.float64, size, 1e-10)


def test_a_second_backward_through_a_kept_chunk_gives_the_same_gradients():
    """The kept log-probs are turned into the gradient in place: a retained graph must recompute, not reuse."""
    head = _lora_head(1).double()
    hidden = torch.randn(M, D, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(V, (M,))
    out = fused_head_log_softmax(head_parts(head), hidden, labels, M)
    out.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    hidden.grad = None
    out.sum().backward()
    assert torch.allclose(hidden.grad, first, atol=1e-12)


def test_half_precision_hidden_states_give_float32_log_probs():
    head = nn.Linear(D, V).bfloat16()
    hidden = torch.randn(M, D).bfloat16()
    labels = torch.randint(V, (M,))
    got = fused_head_log_softmax(head_parts(head), hidden, labels, 7)
    expected = torch.log_softmax(head(hidden).float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-5)


def test_heads_the_fused_path_does_not_reproduce_are_left_to_autograd():
    assert head_parts(_lora_head(1, dropout=0.1).train()) is None  # dropout on the LoRA input
    assert head_parts(_lora_head(1, dropout=0.1).eval()) is not None  # ... off in eval mode
    assert head_parts(_lora_head(1, use_dora=True)) is None
    assert head_parts(_lora_head(1, lora_bias=True)) is None
    assert head_parts(nn.Sequential(nn.Linear(D, V))) is None


def test_disabled_and_merged_adapters_leave_the_base_projection():
    head = _lora_head(1)
    with torch.no_grad():
        hidden, labels = torch.randn(M, D), torch.randint(V, (M,))
        head.enable_adapters(False)  # what PeftModel.disable_adapter() does to each layer
        parts = head_parts(head)
        assert parts.loras == () and parts.weight is head.base_layer.weight
        assert torch.allclose(fused_head_log_softmax(parts, hidden, labels, M), _autograd(head, hidden, labels))
        head.enable_adapters(True)
        head.merge()
        parts = head_parts(head)
        assert parts.loras == ()
        assert torch.allclose(fused_head_log_softmax(parts, hidden, labels, M), _autograd(head, hidden, labels))


def test_under_autocast_the_matmuls_run_in_half_precision_and_the_softmax_in_float32():
    """CPU autocast to bfloat16 (CUDA's takes the same path): float32 weights and hidden states, bfloat16 matmuls.
    Values and gradients match autograd through the head under the same autocast within bfloat16's rounding, and
    the gradients come back in float32."""
    head = _lora_head(1)
    generator = torch.Generator().manual_seed(2)
    hidden, labels = torch.randn(M, D, generator=generator), torch.randint(V, (M,), generator=generator)
    weights = torch.randn(M, generator=generator)
    parts = head_parts(head)

    def under_autocast(fn):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x).float()

        return run

    fused = under_autocast(lambda x: fused_head_log_softmax(parts, x, labels, 5))
    got = _values_and_grads(fused, head, hidden, weights)
    expected = _values_and_grads(under_autocast(lambda x: _autograd(head, x, labels)), head, hidden, weights)
    exact = _values_and_grads(lambda x: _autograd(head, x, labels), head, hidden, weights)
    assert got[1].dtype == torch.float32
    assert torch.allclose(got[0], expected[0], rtol=2e-2, atol=5e-2)
    assert not torch.allclose(got[0], exact[0], atol=1e-4)  # the matmuls did run in bfloat16
    for name, grad in expected[2].items():
        assert got[2][name].dtype == torch.float32
        assert (got[2][name] - grad).abs().max() <= 3e-2 * grad.abs().max(), name


def test_hooked_heads_are_left_to_autograd():
    """Pruning (a forward pre-hook recomputing the weight) and a replaced forward change what the head computes."""
    import torch.nn.utils.prune as prune

    pruned = nn.Linear(D, V)
    prune.l1_unstructured(pruned, "weight", amount=0.5)
    assert head_parts(pruned) is None
    replaced = nn.Linear(D, V)
    replaced.forward = lambda x: 2 * nn.functional.linear(x, replaced.weight, replaced.bias)
    assert head_parts(replaced) is None
    hooked = _lora_head(1)
    handle = hooked.lora_B["default"].register_forward_hook(lambda module, args, out: out * 2)
    assert head_parts(hooked) is None
    handle.remove()
    assert head_parts(hooked) is not None


def test_float64_under_autocast_stays_float64():
    head = nn.Linear(D, V).double()
    hidden, labels = torch.randn(M, D, dtype=torch.float64), torch.randint(V, (M,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_head_log_softmax(head_parts(head), hidden, labels, M)
    assert got.dtype == torch.float64
    assert torch.allclose(got, _autograd(head, hidden, labels), atol=1e-12)
