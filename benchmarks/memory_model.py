"""Peak memory of one training step against the per-device model of docs/scaling.md, asserted within 15%.

    python benchmarks/memory_model.py            # CPU, float32: four shapes, about 4 minutes on 2 cores

Each shape builds a tiny Llama (``tiny_causal_lm``: intermediate 2 x hidden, 4 heads, 2 KV heads), a LoRA bank of K
experts (rank 8, all linear layers and the head), AdamW and the em loop, and takes two steps on B random pairs of T
tokens (half prompt, half completion), all inside ``torch.profiler`` with memory profiling; the peak is the most
bytes of CPU tensors alive at once (the profiler's memory timeline). The model (docs/scaling.md):

    peak = 4 * base + 16 * trainable + alive * tokens * (GAMMA * 4 * hidden * layers + ETA * 4 * vocab / 2)

with ``tokens`` = 2 B T sequence positions: float32 base weights; trainable LoRA weights with their gradient and
AdamW's two moments; the forwards kept for the backward: ``alive`` = 1 expert's when the bank backpropagates one
expert at a time (``--in-turn``), all K's in one grouped pass (the default for K > 1, ``experts.batched``), GAMMA
hidden-sized floats per token and layer, and ETA vocabulary-sized rows of logits per completion token in the fused
head (one chunk; chunks cap it at MAX_CHUNK_ELEMENTS for large shapes). GAMMA and ETA were fitted on the first two
shapes, experts in turn; the last two are the check (other depth, width, vocabulary, batch, K), and the grouped
pass is a check on all four.
"""

from __future__ import annotations

import argparse

import torch
from step_cost import random_batch  # noqa: E402  (run from benchmarks/)
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

from moedpo.data.builtin import tiny_causal_lm
from moedpo.experts import LoRABank
from moedpo.inference import VariationalEM
from moedpo.models import FixedGate

GAMMA = 15.4  # hidden-sized float32 tensors kept per token and decoder layer (LoRA on every linear, SDPA)
ETA = 1.125  # vocabulary-sized float32 rows of logits per completion token (the fused head's chunk)
TOLERANCE = 0.15
SHAPES = [  # hidden, layers, vocab, pairs, tokens, experts
    (256, 4, 4096, 8, 128, 2),  # fit
    (512, 2, 8192, 4, 256, 4),  # fit
    (128, 8, 2048, 16, 64, 1),  # check
    (256, 4, 4096, 16, 128, 2),  # check: twice the first batch
]


def peak_cpu_bytes(fn) -> int:
    """The most bytes of CPU tensors alive at once while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = top = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        top = max(top, live)
    return top


def measure(hidden, layers, vocab, pairs, tokens, experts, batched: bool) -> tuple[int, dict]:
    counts = {}

    def two_steps():
        torch.manual_seed(0)
        model = tiny_causal_lm(vocab, hidden, layers)
        bank = LoRABank(model, experts, batched="auto" if batched else False)
        bank.reuse_graph = bank.batched  # as experts.reuse_graph=auto under em
        counts["alive"] = experts if bank.batched else 1
        gate = FixedGate(experts)
        params = list(bank.trainable_parameters().values()) + list(gate.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        loop = VariationalEM(bank, lambda b, _: gate(b["index"].numel()), optimizer, beta=0.1)
        batch = random_batch(pairs, tokens, vocab, "cpu", torch.Generator().manual_seed(0))
        for _ in range(2):
            loop.step(batch)
        counts["trainable"] = sum(p.numel() for p in params)
        counts["base"] = sum(p.numel() for p in model.parameters()) - counts["trainable"]

    return peak_cpu_bytes(two_steps), counts


def predict(hidden, layers, vocab, pairs, tokens, counts) -> float:
    positions = 2 * pairs * tokens
    activations = counts["alive"] * positions * (GAMMA * 4 * hidden * layers + ETA * 4 * vocab / 2)
    return 4 * counts["base"] + 16 * counts["trainable"] + activations


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=int, nargs="*", help="indices into SHAPES (default: all)")
    parser.add_argument("--in-turn", action="store_true", help="experts.batched=false: one expert at a time")
    args = parser.parse_args()
    for i in args.shapes if args.shapes is not None else range(len(SHAPES)):
        hidden, layers, vocab, pairs, tokens, experts = SHAPES[i]
        measured, counts = measure(*SHAPES[i], batched=not args.in_turn)
        predicted = predict(hidden, layers, vocab, pairs, tokens, counts)
        error = predicted / measured - 1
        role = "fit" if i < 2 and args.in_turn else "check"
        print(
            f"hidden {hidden:4d} layers {layers} vocab {vocab:5d} pairs {pairs:2d} x {tokens:3d} tokens K={experts} "
            f"({role}): measured {measured / 2**20:6.1f} MiB, model {predicted / 2**20:6.1f} MiB ({error:+.1%})",
            flush=True,
        )
        assert abs(error) <= TOLERANCE, f"shape {SHAPES[i]}: the model is {error:+.1%} off the measured peak"


if __name__ == "__main__":
    main()
