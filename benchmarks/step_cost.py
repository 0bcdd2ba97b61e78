"""Cost of one EM step with K experts, as a ratio to K=1 (one DPO step) measured in the same process.

    python benchmarks/step_cost.py                         # CPU, tiny model
    python benchmarks/step_cost.py --device cuda --hidden 1024 --layers 8 --seq 256 --batch 16

For each mode (lora, heads) and K in --experts, runs warm-up steps then times --steps steps of the em schedule
(pair scope, random token batches), and prints seconds per step, the ratio to K=1 of the same mode, and peak
GPU memory. "Sparse" is the gumbel schedule with straight-through top-1 routing (each pair trains one expert).
"""

from __future__ import annotations

import argparse
import time

import torch

from moedpo.data.builtin import tiny_causal_lm
from moedpo.experts import HeadsBank, LoRABank
from moedpo.inference import VariationalEM
from moedpo.models import FixedGate


def random_batch(batch, seq, vocab, device, generator):
    ids = torch.randint(4, vocab, (2 * batch, seq), generator=generator).to(device)
    completion = torch.zeros(2 * batch, seq, dtype=torch.long, device=device)
    completion[:, seq // 2 :] = 1
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": completion,
        "index": torch.arange(batch, device=device),
    }


def time_steps(args, mode, k, schedule):
    torch.manual_seed(0)
    model = tiny_causal_lm(args.vocab, args.hidden, args.layers).to(args.device)
    bank_cls = HeadsBank if mode == "heads" else LoRABank
    options = {"top_layers": max(1, args.layers // 4)} if mode == "heads" else {}
    dtype = torch.bfloat16 if args.device.startswith("cuda") and not args.fp32 else None
    bank = bank_cls(model, k, autocast_dtype=dtype, **options)
    gate = FixedGate(k).to(args.device)
    params = list(bank.trainable_parameters().values()) + list(gate.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loop = VariationalEM(bank, lambda b, _: gate(b["index"].numel()), optimizer, beta=0.1, schedule=schedule)
    generator = torch.Generator().manual_seed(0)
    batch = random_batch(args.batch, args.seq, args.vocab, args.device, generator)
    for _ in range(args.warmup):
        loop.step(batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loop.step(batch)  # same batch: the reference log-probs are cached, as in a second epoch
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    return (time.perf_counter() - start) / args.steps, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    args = parser.parse_args()
    print(f"device={args.device} hidden={args.hidden} layers={args.layers} seq={args.seq} batch={args.batch} pairs")
    print(f"{'mode':<14}{'K':>3}{'s/step':>10}{'x K=1':>8}{'peak GiB':>10}")
    for mode, schedule in (("lora", "em"), ("heads", "em"), ("lora", "gumbel")):
        label = mode if schedule == "em" else f"{mode}-sparse"
        base = None
        for k in args.experts:
            seconds, peak = time_steps(args, mode, k, schedule)
            base = seconds if base is None else base
            print(f"{label:<14}{k:>3}{seconds:>10.4f}{seconds / base:>8.2f}{peak:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
