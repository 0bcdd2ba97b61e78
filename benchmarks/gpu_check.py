"""GPU check, asserted: bf16 autocast margins against float32 on the same random model, the fused output head
under bf16 autocast against autograd through the same head in float32 (log-probs and every gradient), with the
fused head's peak CUDA memory below autograd's under the same autocast, and K=4 LoRA experts in one grouped pass
under bf16 against the experts in turn (each row's log-prob and every adapter's gradient, against float32).

python benchmarks/gpu_check.py          # needs CUDA; exits non-zero (AssertionError) when a check fails

Tolerances come from bfloat16's rounding: 8 significant bits, unit roundoff u = 2^-8 (3.9e-3 relative). The
matmuls round their operands and their output (the logits) to bf16, so each logit is off by about u |logit|, and
a log-prob z_y - logsumexp(z) by at most about 2 u max |z|; every gradient is one more bf16 matmul of bf16
operands. Errors are measured as max |got - ref| / max |ref| (the largest entry sets the scale, as rounding does):
log-probs within LOGP_TOL = 4u, gradients within GRAD_TOL = 8u. A wrong term (a missing LoRA scale, a sign, a
chunk boundary) is off by O(1) in these units. Margins h are differences of sums over completion tokens, each
rounded, so pairs with |h| near zero may flip sign: at least SIGN_AGREEMENT of the (pair, expert) margins must
keep their float32 sign (a 1024-wide, 8-layer model measured 1.000 with mean |h| 4.6, max |delta h| 0.27).
"""

from __future__ import annotations

import contextlib

import torch
from step_cost import random_batch  # noqa: E402  (run from benchmarks/)

from moedpo.data.builtin import tiny_causal_lm
from moedpo.experts import LoRABank, logprobs, sequence_logps
from moedpo.experts.fused_head import head_parts
from moedpo.losses.dpo import margins

U_BF16 = 2.0**-8  # bfloat16 unit roundoff
LOGP_TOL = 4 * U_BF16
GRAD_TOL = 8 * U_BF16
SIGN_AGREEMENT = 0.9


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _head_pass(head, hidden, labels, weights, *, fused: bool, dtype, max_elements: int):
    """One forward+backward of sum(weights * log softmax(head(hidden))[labels]): (log-probs (M,), {"hidden": d
    hidden (M, D), parameter name: its gradient}, peak CUDA bytes above what was allocated before the pass, or None
    on CPU). ``dtype`` None: float32."""
    head.zero_grad(set_to_none=True)
    x = hidden.clone().requires_grad_(True)
    cuda = hidden.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()  # earlier passes' results stay alive: count only this pass
    autocast = torch.autocast(hidden.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        if fused:
            out = logprobs.head_log_softmax(head, x, labels, max_elements=max_elements)
        else:
            out = torch.log_softmax(head(x).float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    (out * weights).sum().backward()
    peak = torch.cuda.max_memory_allocated() - start if cuda else None
    grads = {"hidden": x.grad, **{n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}}
    return out.detach(), grads, peak


def fused_head_check(device="cuda", vocab_size=32768, hidden_size=1024, rows=3000, chunks=3, dtype=torch.bfloat16):
    """Fused head (``chunks`` chunks) under ``dtype`` autocast vs autograd through the same PEFT LoRA head in
    float32: log-probs and the gradients of the hidden states, the head weight and the LoRA factors. Returns the
    relative errors, the number of chunks and the fused pass's peak bytes (None on CPU: no memory assert there)."""
    torch.manual_seed(0)
    bank = LoRABank(tiny_causal_lm(vocab_size, hidden_size, 1).to(device), 1, init_std=0.3)
    head = bank.model.get_base_model().get_output_embeddings()
    head.base_layer.weight.requires_grad_(True)  # its gradient is checked too (the bank keeps it frozen)
    assert head_parts(head) is not None, "the head does not take the fused path; nothing would be checked"
    hidden = torch.randn(rows, hidden_size, device=device)
    labels = torch.randint(vocab_size, (rows,), device=device)
    weights = torch.randn(rows, device=device)
    per_chunk = -(-rows // chunks)
    run = lambda **kw: _head_pass(head, hidden, labels, weights, max_elements=per_chunk * vocab_size, **kw)  # noqa: E731
    value, grads, peak = run(fused=True, dtype=dtype)
    value_ref, grads_ref, _ = run(fused=False, dtype=None)  # the reference: float32 autograd
    *_, peak_autograd = run(fused=False, dtype=dtype)  # autograd under the same autocast, for memory
    assert grads.keys() == grads_ref.keys(), f"gradients of {sorted(grads)} vs autograd's {sorted(grads_ref)}"
    result = {"logps": _relative_error(value, value_ref), "chunks": -(-rows // per_chunk), "peak_bytes": peak}
    result["grads"] = {name: _relative_error(grads[name], ref) for name, ref in grads_ref.items()}
    print(f"fused head ({result['chunks']} chunks, {dtype}): log-probs max |delta| / max |ref| {result['logps']:.2e}")
    for name, error in result["grads"].items():
        print(f"  grad {name[-40:]}: max |delta| / max |ref| {error:.2e}")
    assert result["logps"] <= LOGP_TOL, f"fused head log-probs off by {result['logps']:.2e} > {LOGP_TOL:.2e}"
    for name, error in result["grads"].items():
        assert error <= GRAD_TOL, f"fused head gradient of {name} off by {error:.2e} > {GRAD_TOL:.2e}"
    if peak is not None:
        print(f"  peak CUDA memory: fused {peak / 2**20:.0f} MiB, autograd {peak_autograd / 2**20:.0f} MiB")
        assert peak < peak_autograd, f"fused head peak {peak} bytes >= autograd's {peak_autograd}"
    return result


def margins_check(device="cuda", vocab_size=4096, hidden_size=1024, num_layers=8, batch=16, seq=256):
    """Margins h (B, K) of a 2-expert LoRA bank under bf16 autocast vs float32; returns their sign agreement."""
    torch.manual_seed(0)
    bank = LoRABank(tiny_causal_lm(vocab_size, hidden_size, num_layers).to(device), 2)
    data = random_batch(batch, seq, vocab_size, device, torch.Generator().manual_seed(0))
    runs = {}
    for name, dtype in (("float32", None), ("bf16", torch.bfloat16)):
        bank._ref_cache.clear(), bank._feature_cache.clear(), bank._completion_cache.clear()
        # what the bank's autocast_dtype does on CUDA (reference and experts under autocast), also on CPU
        with torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext():
            out = bank.margins(data)
        h = margins(out["chosen_logps"], out["rejected_logps"], out["ref_chosen_logps"], out["ref_rejected_logps"])
        runs[name] = {"chosen_logps": out["chosen_logps"], "h": h}
    for key in ("chosen_logps", "h"):
        delta, scale = (runs["bf16"][key] - runs["float32"][key]).abs(), runs["float32"][key].abs().mean()
        print(f"{key}: float32 mean |x| {scale:.4f}, bf16 max |delta| {delta.max():.4f} ({delta.max() / scale:.2e})")
    agreement = ((runs["bf16"]["h"] > 0) == (runs["float32"]["h"] > 0)).float().mean().item()
    print(f"sign agreement of margins bf16 vs float32: {agreement:.3f}")
    assert agreement >= SIGN_AGREEMENT, f"bf16 margins keep the float32 sign in {agreement:.3f} < {SIGN_AGREEMENT}"
    return agreement


def _rows_pass(bank, data, rows, experts, weights, *, grouped: bool, dtype):
    """Each row's log-prob under its expert, (R,), and every adapter's gradient of sum(weights * log-probs): one
    grouped pass, or expert after expert through PEFT with that expert active."""
    for param in bank.trainable_parameters().values():
        param.grad = None
    autocast = torch.autocast(bank.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        if grouped:
            logps = bank.grouped_logps(data, rows, experts).float()
        else:
            logps = torch.zeros(rows.numel(), device=bank.device)
            for k in range(bank.num_experts):
                at = torch.nonzero(experts == k).squeeze(-1)
                bank.activate(k)
                sub = [data[key][rows[at]] for key in ("input_ids", "attention_mask", "completion_mask")]
                logps = logps.index_put((at,), sequence_logps(bank.model, *sub).float())
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in bank.trainable_parameters().items() if p.grad is not None}


def grouped_check(
    device="cuda", vocab_size=4096, hidden_size=1024, num_layers=4, batch=8, seq=256, dtype=torch.bfloat16
):
    """K=4 LoRA experts in one grouped pass under ``dtype`` autocast vs expert after expert, both against expert
    after expert in float32. The two bf16 paths run the same matmuls on differently composed batches, so their
    rounding is alike: the grouped pass's errors may be at most twice the per-expert path's, plus u (a wrong term
    is off by O(1) relative). Returns the relative errors {"grouped"/"in_turn": {"logps": .., grad name: ..}}."""
    torch.manual_seed(0)
    bank = LoRABank(tiny_causal_lm(vocab_size, hidden_size, num_layers).to(device), 4, init_std=0.3)
    assert bank.grouped, f"the grouped pass does not apply: {bank.grouped_reason}"
    bank.train_mode()
    data = random_batch(batch, seq, vocab_size, device, torch.Generator().manual_seed(0))
    rows = torch.arange(2 * batch, device=device)
    experts, weights = rows % 4, torch.randn(2 * batch, device=device)
    ref_logps, ref_grads = _rows_pass(bank, data, rows, experts, weights, grouped=False, dtype=None)
    errors = {}
    for name, grouped in (("in_turn", False), ("grouped", True)):
        logps, grads = _rows_pass(bank, data, rows, experts, weights, grouped=grouped, dtype=dtype)
        assert grads.keys() == ref_grads.keys(), f"{name}: gradients of {len(grads)} tensors vs {len(ref_grads)}"
        errors[name] = {"logps": _relative_error(logps, ref_logps)}
        errors[name].update({n: _relative_error(grads[n], ref) for n, ref in ref_grads.items()})
    for key in ("logps", max(ref_grads, key=lambda n: errors["grouped"][n])):
        got, bound = errors["grouped"][key], 2 * errors["in_turn"][key] + U_BF16
        print(
            f"grouped {dtype} {key[-48:]}: {got:.2e} (experts in turn {errors['in_turn'][key]:.2e}, bound {bound:.2e})"
        )
    for key, got in errors["grouped"].items():
        bound = 2 * errors["in_turn"][key] + U_BF16
        assert got <= bound, (
            f"grouped pass {key} off by {got:.2e} > {bound:.2e} (experts in turn: {errors['in_turn'][key]:.2e})"
        )
    return errors


def main():
    margins_check()
    fused_head_check()
    grouped_check()


if __name__ == "__main__":
    main()
