#!/usr/bin/env bash
# One device session: install carried wheels, bf16 checks (margins, fused head), DDP (NCCL, a group of one)
# against no parallelism, a built-in run on CUDA (bf16 autocast), step cost, and the TRL comparison at the
# Llama-3.2-1B shape.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
(cd benchmarks && timeout 120 python3 gpu_check.py) 2>&1 | grep -v Warn | tee $OUT/gpu_check.txt
(cd benchmarks && timeout 120 python3 parallel_check.py --device cuda --hidden 1024 --layers 8 --seq 256 --batch 16) 2>&1 | grep -v Warn | tee $OUT/parallel_check.txt
timeout 180 python3 -m moedpo.cli train train.device=cuda train.output_dir=$OUT/run train.eval_steps=50 2>&1 | tail -2
python3 - <<'PY' | tee $OUT/run_summary.txt
import json, os
m = json.load(open(os.environ["OUT"] + "/run/report/eval.json"))["metrics"]
print({k: round(v, 4) for k, v in m.items() if isinstance(v, float)})
PY
timeout 200 python3 benchmarks/step_cost.py --device cuda --hidden 1024 --layers 8 --seq 256 --batch 16 --steps 5 2>&1 | grep -v Warn | tee $OUT/step_cost_gpu.txt
timeout 420 python3 benchmarks/vs_trl.py --shape llama-1b --device cuda --out $OUT/vs_trl_llama-1b_cuda.json 2>&1 | grep -vE "Warn|Adding EOS|Tokenizing" | tee $OUT/vs_trl_llama-1b_cuda.txt
