"""DDP and FSDP2 (``train.parallel=ddp`` / ``fsdp``) in a process group of one against no parallelism, asserted, in
the same process: the same loss curve and parameters, and the step time as a ratio (what the engine costs where it
has nothing to reduce across; fsdp: its all-gathers, reduce-scatters and the lockstep protocol).

    python benchmarks/parallel_check.py                      # CPU (gloo), tiny model
    python benchmarks/parallel_check.py --device cuda --hidden 1024 --layers 8 --seq 256 --batch 16   # NCCL

For each mode (lora, heads) and schedule (em, gumbel: sparse, draws keyed per pair), both runs start from the same
parameters and see the same batches. A sum over one process returns each gradient as it was, so losses must
agree within LOSS_TOL and parameters within PARAM_TOL (AdamW on equal gradients; any slack is the bucket copy).
"""

from __future__ import annotations

import argparse
import time

import torch
from step_cost import random_batch  # noqa: E402  (run from benchmarks/)

from moedpo.data.builtin import tiny_causal_lm
from moedpo.distributed import DataParallel
from moedpo.experts import HeadsBank, LoRABank
from moedpo.inference import VariationalEM
from moedpo.models import FixedGate

LOSS_TOL = 1e-6
PARAM_TOL = 1e-6


def run(args, mode, schedule, sync):
    """(losses per step, final parameters, seconds per timed step)."""
    torch.manual_seed(0)
    model = tiny_causal_lm(args.vocab, args.hidden, args.layers).to(args.device)
    bank_cls = HeadsBank if mode == "heads" else LoRABank
    options = {"top_layers": max(1, args.layers // 4)} if mode == "heads" else {}
    dtype = torch.bfloat16 if args.device.startswith("cuda") and not args.fp32 else None
    bank = bank_cls(model, args.experts, autocast_dtype=dtype, init_std=0.3, **options)
    if sync is not None:
        sync.shard_experts(bank)  # fsdp: the decoder layers sharded (over one process); ddp: nothing
    gate = FixedGate(args.experts).to(args.device)
    params = list(bank.trainable_parameters().values()) + list(gate.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    gate_logits = lambda b, _: gate(b["index"].numel())  # noqa: E731
    loop = VariationalEM(bank, gate_logits, optimizer, beta=0.1, schedule=schedule, sync=sync, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(args.batch, args.seq, args.vocab, args.device, generator) for _ in range(2)]
    batches[1]["index"] = batches[1]["index"] + args.batch  # other pairs: their own reference cache and draws
    losses = [loop.step(batches[i % 2]) for i in range(args.warmup)]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses += [loop.step(batches[i % 2]) for i in range(args.steps)]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    whole = sync.full_tensors(dict(enumerate(params))).values() if sync is not None else params
    return losses, [p.detach().float().clone() for p in whole], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    args = parser.parse_args()
    ddp = DataParallel("ddp")  # a process group of one (gloo on CPU, NCCL on CUDA)
    engines = {"ddp": ddp, "fsdp": DataParallel("fsdp")}  # the second in the group the first started
    shape = f"{args.layers} layers x {args.hidden}, {args.batch} pairs x {args.seq}"
    print(f"device {args.device}, K={args.experts}, {shape}")
    for mode in ("lora", "heads"):
        for schedule in ("em", "gumbel"):
            plain_losses, plain_params, plain_time = run(args, mode, schedule, None)
            for name, engine in engines.items():
                losses, params, seconds = run(args, mode, schedule, engine)
                loss_gap = max(abs(a - b) for a, b in zip(plain_losses, losses))
                param_gap = max((a - b).abs().max().item() for a, b in zip(plain_params, params))
                print(
                    f"{mode:5s} {schedule:6s}: step {plain_time * 1e3:7.1f} ms plain, "
                    f"{seconds * 1e3:7.1f} ms {name:4s} (x{seconds / plain_time:.2f}); "
                    f"loss gap {loss_gap:.1e}, parameter gap {param_gap:.1e}"
                )
                assert loss_gap <= LOSS_TOL, f"{mode} {schedule}: {name}'s loss curve is {loss_gap:.2e} off"
                assert param_gap <= PARAM_TOL, f"{mode} {schedule}: {name}'s parameters are {param_gap:.2e} off"
    engines["fsdp"].close()
    ddp.close()


if __name__ == "__main__":
    main()
