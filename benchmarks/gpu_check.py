"""GPU check: bf16 autocast margins vs float32 on the same random model, and a built-in run under bf16.

python benchmarks/gpu_check.py          # needs CUDA; prints max |delta| of log-probs and margins
"""

from __future__ import annotations

import torch
from step_cost import random_batch  # noqa: E402  (run from benchmarks/)

from moedpo.data.builtin import tiny_causal_lm
from moedpo.experts import LoRABank


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
