"""GPU check: bf16 autocast margins vs float32 on the same random model; the fused output head against autograd
through the head module, under bf16 autocast, values and gradients.

python benchmarks/gpu_check.py          # needs CUDA; prints max |delta| of log-probs, margins and head gradients
"""

from __future__ import annotations

import torch
from step_cost import random_batch  # noqa: E402  (run from benchmarks/)

from moedpo.data.builtin import tiny_causal_lm
from moedpo.experts import LoRABank


def fused_head_check(device: str = "cuda"):
    """Fused head (several chunks) vs autograd through the PEFT head, both under bf16 autocast, on a 32k vocabulary."""
    from moedpo.experts import logprobs

    torch.manual_seed(0)
    bank = LoRABank(tiny_causal_lm(32768, 1024, 1).to(device), 1, init_std=0.3)
    head = bank.model.get_base_model().get_output_embeddings()
    hidden = torch.randn(3000, 1024, device=device)
    labels = torch.randint(32768, (3000,), device=device)
    weights = torch.randn(3000, device=device)
    results = []
    for fused in (True, False):
        head.zero_grad()
        x = hidden.clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16):
            if fused:
                out = logprobs.head_log_softmax(head, x, labels, max_elements=2**25)  # 1024 rows a chunk: 3 chunks
            else:
                out = torch.log_softmax(head(x).float(), -1).gather(-1, labels[:, None]).squeeze(-1)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
        results.append((out.detach(), x.grad, grads))
    (value, d_hidden, grads), (value_ref, d_hidden_ref, grads_ref) = results
    delta, scale = (value - value_ref).abs().max(), value_ref.abs().mean()
    print(f"fused head: max |delta| log-probs {delta:.2e} (mean |x| {scale:.2f})")
    for name, ref in [("hidden", d_hidden_ref), *grads_ref.items()]:
        got = d_hidden if name == "hidden" else grads[name]
        print(f"  grad {name[-40:]}: max |delta| / max |x| {(got - ref).abs().max() / ref.abs().max():.2e}")


def main():
    torch.manual_seed(0)
    model = tiny_causal_lm(4096, 1024, 8).cuda()
    bank = LoRABank(model, 2)
    batch = random_batch(16, 256, 4096, "cuda", torch.Generator().manual_seed(0))
    fp32 = bank.margins(batch)
    bank._ref_cache.clear(), bank._feature_cache.clear()
    bank.autocast_dtype = torch.bfloat16
    bf16 = bank.margins(batch)
    for key in ("chosen_logps", "h"):
        delta = (bf16[key] - fp32[key]).abs()
        scale = fp32[key].abs().mean()
        print(
            f"{key}: float32 mean |x| {scale:.4f}, bf16 max |delta| {delta.max():.4f} "
            f"(relative to mean |x|: {delta.max() / scale:.2e})"
        )
    agree = ((bf16["h"] > 0) == (fp32["h"] > 0)).float().mean()
    print(f"sign agreement of margins bf16 vs float32: {agree:.3f}")


if __name__ == "__main__":
    main()
    fused_head_check()
