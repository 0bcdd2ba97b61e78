"""moedpo's step vs TRL's DPOTrainer step on the same tiny model and batch, as ratios (one process, CPU).

    python benchmarks/vs_trl.py [--steps 10] [--hidden 128] [--layers 4]

TRL: ``trainer.training_step`` + optimizer step, policy and reference both full models (bf16 off).
moedpo: one ``VariationalEM.step`` (em schedule) with K independent full experts (K=1 is plain DPO) and with
K LoRA experts; the reference log-probs are cached after the first step, as they are from the second epoch on.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings

import torch

from moedpo.data.builtin import make_builtin_rows, tiny_causal_lm, train_tokenizer
from moedpo.experts import IndependentBank, LoRABank
from moedpo.inference import VariationalEM
from moedpo.models import FixedGate


def timed(fn, steps, warmup=2):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def trl_step_time(model, tokenizer, rows, args):
    import trl
    from datasets import Dataset

    config = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        beta=0.5,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=args.batch,
        max_length=64,
        loss_type=["sigmoid"],
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call training_step directly

    def step():
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return timed(step, args.steps), batch


def moedpo_step_time(bank, batch, args):
    gate = FixedGate(bank.num_experts)
    ours = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    ours["index"] = torch.arange(batch["input_ids"].shape[0] // 2)

    optimizer = torch.optim.AdamW(bank.trainable_parameters().values(), lr=1e-4)
    loop = VariationalEM(bank, lambda b, _: gate(b["index"].numel()), optimizer, beta=0.5)
    return timed(lambda: loop.step(ours), args.steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_builtin_rows(4, 8)]
    model = tiny_causal_lm(len(tokenizer), args.hidden, args.layers, pad_token_id=tokenizer.pad_token_id)
    trl_time, batch = trl_step_time(copy.deepcopy(model), tokenizer, rows, args)
    print(f"hidden={args.hidden} layers={args.layers} batch={args.batch} pairs, CPU threads={torch.get_num_threads()}")
    print(f"{'trainer':<28}{'s/step':>9}{'x TRL':>8}")
    print(f"{'TRL DPOTrainer':<28}{trl_time:>9.4f}{1.0:>8.2f}")
    for k in (1, 2, 4):
        seconds = moedpo_step_time(IndependentBank(copy.deepcopy(model), k), batch, args)
        print(f"{f'moedpo independent K={k}':<28}{seconds:>9.4f}{seconds / trl_time:>8.2f}", flush=True)
    for k in (1, 2, 4):
        seconds = moedpo_step_time(LoRABank(copy.deepcopy(model), k), batch, args)
        print(f"{f'moedpo lora K={k}':<28}{seconds:>9.4f}{seconds / trl_time:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
