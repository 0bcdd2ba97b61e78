"""One moedpo EM step against one TRL DPOTrainer step, every row in one process, as ratios.

    python benchmarks/vs_trl.py --shape small                    # CPU: Llama-style 4 x 256, vocab 8192
    python benchmarks/vs_trl.py --shape llama-1b --device cuda   # Llama-3.2-1B shape, random bf16 weights

Batch: 8 pairs x (prompt + completion) random tokens (small: 32 + 96; llama-1b: 128 + 384). Baselines: TRL 1.16
DPOTrainer, full fine-tune and LoRA r=16 on all linear layers (its reference forward every step). moedpo's banks
run through ``VariationalEM``, LoRA r=16, reference log-probs cached (computed once per dataset). Prints
seconds per step, ratios to both baselines, each row's matmul and attention FLOPs (forward and backward, counted
by ``torch.utils.flop_counter``: the ratio a step would have at equal efficiency) and peak memory, then one JSON
line; writes ``benchmarks/results/vs_trl_<shape>_<device>.json``. On CPU every row is timed in each of
``--rounds`` rounds, round-robin, so that a slow spell of the machine hits every row; ratios are of medians over
all timed steps ("best x FT": of fastest steps). With glibc's allocator as it comes (``--malloc default``), TRL's
full fine-tune step varied from 1.0 to 2.1 s within one process on the 2-core CPU machine (see
:func:`keep_freed_memory`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

SHAPES = {
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, mlp=688, vocab=8192, prompt=32, completion=96),
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, mlp=8192, vocab=128256, prompt=128, completion=384),
}
PAIRS = 8


def build_model(shape: dict, device: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def random_batch(shape: dict, device: str) -> dict:
    """[chosen; rejected] (2B, T) right-padded: completions of unequal lengths (3/4 to all of the budget)."""
    generator = torch.Generator().manual_seed(0)
    prompt, completion = shape["prompt"], shape["completion"]
    total = prompt + completion
    ids = torch.randint(3, shape["vocab"], (2 * PAIRS, total), generator=generator)
    lengths = torch.randint(3 * completion // 4, completion + 1, (2 * PAIRS,), generator=generator)
    positions = torch.arange(total)
    attention = (positions < prompt + lengths.unsqueeze(1)).long()
    completion_mask = attention * (positions >= prompt).long()
    ids = ids * attention
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion_mask}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["index"] = torch.arange(PAIRS, device=device)
    batch["user"] = torch.zeros(PAIRS, dtype=torch.long, device=device)
    return batch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(step, device: str, warmup: int, steps: int) -> tuple[list[float], float]:
    """(seconds of each step, peak GiB) after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return seconds, peak


def count_flops(step) -> float:
    """Matmul and attention FLOPs of one step, forward and backward (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def keep_freed_memory() -> bool:
    """glibc: keep freed buffers in the process instead of unmapping them, as jemalloc and tcmalloc do. With the
    default, every buffer over 32 MiB (TRL's full-vocabulary logits) is mapped afresh and page-faulted each step:
    measured, TRL's full fine-tune step 1.0-2.1 s with it, 0.6 s without; moedpo heads K=4 0.75-0.78 s either way."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        trim, mmap = (
            libc.mallopt(-1, ctypes.c_int(2**30)),
            libc.mallopt(-3, ctypes.c_int(2**30)),
        )  # M_TRIM/M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
    return bool(trim and mmap)


def trl_row(shape, device, dtype, lora: bool):
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from moedpo.data.builtin import make_builtin_rows, train_tokenizer

    tokenizer = train_tokenizer()
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_builtin_rows(1, 4)]
    model = build_model(shape, device, dtype)
    options = dict(output_dir="/tmp/moedpo-bench-trl", report_to=[], per_device_train_batch_size=PAIRS, beta=0.1)
    options.update(use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, max_length=None, learning_rate=1e-5)
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    reference = None if lora else copy.deepcopy(model)
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=reference,
        args=trl.DPOConfig(**options),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call training_step directly
    batch = {
        k: v for k, v in random_batch(shape, device).items() if k in ("input_ids", "attention_mask", "completion_mask")
    }

    def step():
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return step


def moedpo_row(shape, device, dtype, mode: str, k: int, schedule: str, batched: bool | str = "auto"):
    from moedpo.assembly.components import reuse_graph_by_default
    from moedpo.experts import HeadsBank, LoRABank
    from moedpo.inference import VariationalEM
    from moedpo.models import AmortizedGuide, FixedGate

    model = build_model(shape, device, dtype)
    autocast = torch.bfloat16 if device.startswith("cuda") else None
    options = dict(r=16, alpha=32, init_std=0.01, autocast_dtype=autocast, batched=batched)
    bank = HeadsBank(model, k, top_layers=2, **options) if mode == "heads" else LoRABank(model, k, **options)
    bank.reuse_graph = reuse_graph_by_default(mode, k, schedule, bank.grouped)  # as experts.reuse_graph=auto
    gate = FixedGate(k).to(device)
    guide = AmortizedGuide(3 * model.config.hidden_size, k).to(device) if schedule == "routed" else None
    params = [*bank.trainable_parameters().values(), *gate.parameters(), *(guide.parameters() if guide else [])]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    loop = VariationalEM(
        bank, lambda b, _: gate(b["index"].numel()), optimizer, beta=0.1, schedule=schedule, guide=guide
    )  # routed: no exact steps, the steady state (with em.exact_every=10, one step in ten costs a dense em step)
    batch = random_batch(shape, device)
    bank.reference(batch)  # cached reference log-probs: computed once per dataset, as in training
    return lambda: loop.step(batch)


ROWS = [  # label, kind, TRL LoRA, K, schedule, experts.batched (auto: one grouped pass for K > 1; False: in turn)
    ("TRL DPOTrainer, full fine-tune", "trl", False, 0, "", None),
    ("TRL DPOTrainer, LoRA all linear", "trl", True, 0, "", None),
    ("moedpo lora K=1", "lora", None, 1, "em", "auto"),
    ("moedpo lora K=4", "lora", None, 4, "em", "auto"),
    ("moedpo lora K=4, experts in turn", "lora", None, 4, "em", False),
    ("moedpo lora K=4, sparse (gumbel)", "lora", None, 4, "gumbel", "auto"),
    ("moedpo lora K=4, sparse, experts in turn", "lora", None, 4, "gumbel", False),
    ("moedpo heads top_layers=2, K=1", "heads", None, 1, "em", "auto"),
    ("moedpo heads top_layers=2, K=4", "heads", None, 4, "em", "auto"),
    ("moedpo heads top_layers=2, K=4, experts in turn", "heads", None, 4, "em", False),
    ("moedpo heads top_layers=2, K=4, sparse", "heads", None, 4, "gumbel", "auto"),
    ("moedpo heads top_layers=2, K=4, sparse, in turn", "heads", None, 4, "gumbel", False),
    ("moedpo heads top_layers=2, K=8", "heads", None, 8, "em", "auto"),
    ("moedpo lora K=4, guide-routed", "lora", None, 4, "routed", "auto"),
    ("moedpo lora K=4, guide-routed, in turn", "lora", None, 4, "routed", False),
    ("moedpo heads top_layers=2, K=4, guide-routed", "heads", None, 4, "routed", "auto"),
    ("moedpo heads top_layers=2, K=4, guide-routed, in turn", "heads", None, 4, "routed", False),
]


def result(label: str, timings: dict, rows: list, flops: dict) -> dict:
    """A row's median and fastest step over all rounds, with their ratios to both TRL baselines (timed in the same
    process). The median is what a run sees; the fastest, what the machine can do when nothing interferes."""
    seconds = sorted(t for times, _ in timings[label] for t in times)
    median, best = statistics.median(seconds), seconds[0]
    peak = max(p for _, p in timings[label])
    out = {"s_per_step": median, "best_s_per_step": best, "peak_gib": peak, "steps_s": seconds}
    for key, i in (("x_trl_full_ft", 0), ("x_trl_lora", 1)):
        base = rows[i][0] if len(rows) > i and rows[i][1] == "trl" else None
        base_times = [t for times, _ in timings.get(base, []) for t in times]
        out[key] = median / statistics.median(base_times) if base_times else None
        out[f"best_{key}"] = best / min(base_times) if base_times else None
    out["gflop"] = flops[label] / 1e9
    out["flops_x_trl_full_ft"] = flops[label] / flops[rows[0][0]] if rows[0][0] in flops else None
    return out


def report(label: str, timings: dict, rows: list, flops: dict) -> None:
    row = result(label, timings, rows, flops)
    cells = [f"{row['s_per_step']:>9.3f}", f"{row['best_s_per_step']:>9.3f}"]
    for key, width in (("x_trl_full_ft", 10), ("x_trl_lora", 12), ("best_x_trl_full_ft", 10)):
        cells.append(f"{row[key]:>{width}.2f}" if row[key] is not None else " " * width)
    cells.append(f"{row['gflop']:>8.1f}{row['flops_x_trl_full_ft']:>10.2f}{row['peak_gib']:>10.1f}")
    print(f"{label:<54}{''.join(cells)}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row and round (4 CPU, 5 CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="time every row this many times, round-robin, all rows' models alive (default: 3 for small on CPU; "
        "otherwise 1, one model at a time, so that peak memory is the row's own)",
    )
    parser.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="CPU: keep: freed memory stays in the process (see keep_freed_memory); default: glibc as it comes",
    )
    parser.add_argument("--only", nargs="*", help="moedpo rows to run (substring of the label); default all")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/vs_trl_<shape>_<device>.json)")
    args = parser.parse_args()
    args.steps = args.steps or (5 if args.device.startswith("cuda") else 4)
    args.rounds = args.rounds or (3 if args.device == "cpu" and args.shape == "small" else 1)  # rounds: all alive
    warnings.filterwarnings("ignore")
    shape, device = SHAPES[args.shape], args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    kept = device == "cpu" and args.malloc == "keep" and keep_freed_memory()
    allocator = "glibc, freed memory kept" if kept else "as it comes"
    print(f"shape={args.shape} {shape} pairs={PAIRS} device={name} dtype={dtype} allocator: {allocator}", flush=True)
    print(f"{args.rounds} round(s) x {args.steps} timed steps after {args.warmup} warm-up; s/step = median", flush=True)
    header = f"{'s/step':>9}{'best':>9}{'x TRL FT':>10}{'x TRL LoRA':>12}{'best x FT':>10}{'GFLOP':>8}{'FLOP x FT':>10}"
    header += f"{'peak GiB':>10}"
    print(f"{'config':<54}{header}", flush=True)
    rows = [r for r in ROWS if r[1] == "trl" or not args.only or any(o in r[0] for o in args.only)]
    build = lambda kind, lora, k, schedule, batched: (  # noqa: E731
        trl_row(shape, device, dtype, lora)
        if kind == "trl"
        else moedpo_row(shape, device, dtype, kind, k, schedule, batched)
    )
    timings: dict[str, list[tuple[list[float], float]]] = {}
    flops: dict[str, float] = {}
    if args.rounds == 1:  # one row's model at a time
        for label, *spec in rows:
            step = build(*spec)
            timings[label] = [measure(step, device, args.warmup, args.steps)]
            flops[label] = count_flops(step)
            del step
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            report(label, timings, rows, flops)
    else:  # every row alive, timed in turn each round: a slow spell of the machine hits all rows alike
        steps = {label: build(*spec) for label, *spec in rows}
        for _ in range(args.rounds):
            for label in steps:
                timings.setdefault(label, []).append(measure(steps[label], device, args.warmup, args.steps))
        flops.update({label: count_flops(step) for label, step in steps.items()})
        for label, *_ in rows:
            report(label, timings, rows, flops)
    results = {label: result(label, timings, rows, flops) for label, *_ in rows}
    summary = {"shape": args.shape, "device": name, "allocator": allocator, "pairs": PAIRS, "rounds": args.rounds}
    summary["rows"] = results
    default = Path(__file__).resolve().parent / "results" / f"vs_trl_{args.shape}_{device.split(':')[0]}.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
