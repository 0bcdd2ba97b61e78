"""Two processes (torchrun, gloo) take the same steps as one process with the whole global batch, for the lora and
heads banks under the em, gumbel and routed schedules, with DDP and with FSDP2 (``train.parallel=fsdp``: decoder
layers sharded), also when the annotators have unequal pair counts, the shards are uneven, the last batch is short
and a shard is empty; kill -9 and ``--resume`` on two processes and on one; the DPO baseline trains under
torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moedpo.config import ConfigError, load_config
from moedpo.data.builtin import make_builtin_rows
from moedpo.runs import read_metrics
from moedpo.training import train

SETTINGS = [
    "model.hidden_size=32",
    "data.eval_fraction=0",
    "train.users_per_batch=2",  # 3 annotators: batches of 2 then 1 annotators -> shards 1+1, then 1+0 (empty)
    "train.max_steps=10",
    "train.eval_steps=0",
    "train.save_steps=0",
]
SCHEDULES = {
    "em": [],
    "gumbel": ["em.schedule=gumbel", "experts.init_std=0.3"],
    # routed from step 2 on (2 exact warm-up steps): only the drawn expert of each annotator learns
    "routed": ["em.schedule=routed", "em.guide=amortized", "em.exact_warmup=2", "em.exact_every=0"],
}
BANKS = {"lora": [], "heads": ["experts.mode=heads"]}
RUNS = {f"{bank}-{schedule}": BANKS[bank] + SCHEDULES[schedule] for bank in BANKS for schedule in SCHEDULES}
RUNS |= {
    "restarts": ["em.restarts=2", "em.restart_steps=3"],  # every process runs and scores both restarts
    "auto-k": ["experts.num_experts=auto", "experts.max_experts=2", "em.restart_steps=3", "data.eval_fraction=0.25"],
    "accumulation": ["train.gradient_accumulation_steps=2"],  # shards of 2 micro-batches, some empty
    "pair-scope": ["em.scope=pair", "train.per_device_train_batch_size=3"],  # 3 pairs per process: 6 a step
    "routed-3": [*SCHEDULES["routed"], "train.users_per_batch=3"],  # shards of 2 + 1 annotators: 2 experts on one
}
SHARDED = {f"fsdp-{name}": [*overrides, "train.parallel=fsdp"] for name, overrides in RUNS.items()}
RUNS |= SHARDED  # FSDP2: the decoder layers sharded across the two processes, compared with one unsharded process
ONE_PROCESS = {"pair-scope": ["train.per_device_train_batch_size=6"]}  # the same global batch in one process


def one_process_twin(name: str) -> str:
    """The one-process run a two-process run is compared with (a sharded run's is the unsharded one)."""
    return name.removeprefix("fsdp-")


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def write_unequal_annotators(path):
    """Three annotators with 11, 6 and 2 pairs (two types)."""
    rows = make_builtin_rows(annotators_per_type=2, pairs_per_annotator=12, seed=3)
    counts = {"annotator_000": 11, "annotator_001": 6, "annotator_002": 2}
    kept = []
    for row in rows:
        if counts.get(row["user_id"], 0) > 0:
            counts[row["user_id"]] -= 1
            kept.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def torchrun(*arguments, port: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run([*command, *arguments], env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run of RUNS trained by one process and by two (one torchrun launch for all of them)."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "prefs.jsonl"
    write_unequal_annotators(data)
    settings = {name: [f"data.source={data}", *SETTINGS, *extra] for name, extra in RUNS.items()}
    listing = [[f"train.output_dir={root / 'two' / name}", *s] for name, s in settings.items()]
    (root / "runs.json").write_text(json.dumps(listing))
    torchrun(str(Path(__file__).with_name("two_process_runs.py")), str(root / "runs.json"), port=29533)
    for name, s in settings.items():
        if name not in SHARDED:
            train(load_config(overrides=[f"train.output_dir={root / 'one' / name}", *s, *ONE_PROCESS.get(name, [])]))
    return root, settings


@pytest.mark.parametrize("name", list(RUNS))
def test_two_uneven_processes_match_one(runs, name):
    """Parameters after 10 steps, the logged losses and the gate equal one process's. Before (a hand-written
    all-reduce of every gradient, a missing one as zeros; draws from each process's own random stream) em matched
    but gumbel and routed ended 0.034-0.045 apart on both banks. Turning a missing gradient into zeros alone
    (AdamW then steps experts no pair reached) fails the sparse runs too."""
    root, settings = runs
    one, two = root / "one" / one_process_twin(name), root / "two" / name
    lines_one, lines_two = read_metrics(one), read_metrics(two)
    assert lines_two[-1]["world_size"] == 2 and lines_one[-1]["world_size"] == 1
    # every logged metric is over both processes' pairs (before, all but loss, grad_norm and gate/usage were rank
    # 0's shard: rewards/accuracies up to 0.54 off); loss and grad_norm by 1e-5, log-prob sums scale with length
    assert [a.keys() - {"world_size"} for a in lines_one] == [b.keys() - {"world_size"} for b in lines_two]
    for a, b in zip(lines_one, lines_two):
        for key in a.keys() - {"world_size"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (key, a["step"])
    expected = load_file(one / "checkpoint" / "params.safetensors")
    got = load_file(two / "checkpoint" / "params.safetensors")
    assert expected.keys() == got.keys()
    differences = torch.cat([(expected[k] - got[k]).abs().flatten() for k in expected])
    worst, typical = differences.max().item(), differences.mean().item()
    print(f"{name}: parameter difference 1 vs 2 processes: max {worst:.3g}, mean {typical:.3g}")
    # float32 sums in another order (one shard or two) differ by rounding, and AdamW divides each gradient entry by
    # its own scale: an entry whose terms nearly cancel turns that rounding into up to ~1e-4 of movement (measured:
    # 2.9e-5 on one entry, mean 1.7e-8). One shard weighted 1.2 instead of 1 gives max 7e-3, mean 5e-4.
    assert worst < 1e-4 and typical < 1e-6, f"max parameter difference {worst:.3g}, mean {typical:.3g}"
    # each process computed every second example's reference log-probs; the run keeps the whole cache
    ref_one, ref_two = (load_file(run / "reference_logps.safetensors") for run in (one, two))
    assert ref_one.keys() == ref_two.keys() and torch.equal(ref_one["index"], ref_two["index"])
    assert all(torch.allclose(ref_one[k].float(), ref_two[k].float(), atol=1e-5) for k in ref_one)
    assert not list(two.glob("reference_logps.safetensors.rank*"))
    gate_one, gate_two = load_file(one / "gate.safetensors"), load_file(two / "gate.safetensors")
    assert gate_one.keys() == gate_two.keys()
    for key in gate_one:
        assert torch.allclose(gate_one[key], gate_two[key], atol=1e-6), key
    assert (two / "experts" / "expert_0" / "adapter_model.safetensors").exists()
    if name in SHARDED:  # the PEFT folders hold the gathered adapters, not one process's shards
        adapter_one, adapter_two = (
            load_file(r / "experts" / "expert_0" / "adapter_model.safetensors") for r in (one, two)
        )
        assert adapter_one.keys() == adapter_two.keys()
        assert all(torch.allclose(adapter_one[k], adapter_two[k], atol=1e-4) for k in adapter_one)
        assert (two / "checkpoint" / "dcp" / ".metadata").exists() and not (
            two / "checkpoint" / "optimizer.pt"
        ).exists()
    if "auto" in name:  # K chosen alike, from scores equal up to float32 rounding
        chose_one, chose_two = (json.loads((run / "k_selection.json").read_text()) for run in (one, two))
        assert chose_one["chosen"] == chose_two["chosen"]
        assert chose_one["scores"] == pytest.approx(chose_two["scores"], abs=1e-5)
    assert (two / "report" / "report.md").exists()


def test_the_runs_moved_and_sparse_schedules_left_experts_alone(runs):
    """The comparison is not of untrained parameters, and the sparse schedules really skip experts: under routed,
    an expert's LoRA that no annotator was drawn for in a step keeps its AdamW state's step count below the
    number of routed steps (checked through the parameters: routed and em runs end apart)."""
    root, settings = runs
    initial = train(
        load_config(
            overrides=[
                f"train.output_dir={root / 'init'}",
                *settings["lora-em"],
                "train.max_steps=1",
                "train.learning_rate=0",
            ]  # fmt: skip
        )
    )
    start = load_file(initial / "checkpoint" / "params.safetensors")
    for name in RUNS:
        if "heads" in name or name == "auto-k" or name in SHARDED:  # other parameters (heads; K chosen); 2 processes
            continue
        end = load_file(root / "one" / name / "checkpoint" / "params.safetensors")
        assert max((end[k] - start[k]).abs().max().item() for k in start) > 1e-3, name
    em, routed = (load_file(root / "one" / n / "checkpoint" / "params.safetensors") for n in ("lora-em", "lora-routed"))
    assert max((em[k] - routed[k]).abs().max().item() for k in em) > 1e-3


@pytest.mark.parametrize("parallel", ["auto", "fsdp"])
def test_dpo_baseline_trains_under_torchrun(tmp_path, parallel):
    """``torchrun -m moedpo.cli train train.dpo_baseline=true``: both runs and the report. Before, rank 0 started
    the baseline alone while rank 1 closed the group ('Connection closed by peer'), leaving RUN/dpo half-built.
    ``fsdp``: held-out evaluation every 2 steps on both processes (the sharded layers need both), the report from
    the saved run."""
    data = tmp_path / "prefs.jsonl"
    write_unequal_annotators(data)
    settings = [f"data.source={data}", *SETTINGS, "train.max_steps=4", "data.eval_fraction=0.25", "train.eval_steps=2"]
    run, sharded = tmp_path / "two", [f"train.parallel={parallel}"]
    torchrun("-m", "moedpo.cli", "train", f"train.output_dir={run}", "train.dpo_baseline=true", *settings, *sharded,
             port=29534)  # fmt: skip
    assert "eval/mixture_nll" in read_metrics(run)[1]
    assert (run / "gate.safetensors").exists() and (run / "dpo" / "gate.safetensors").exists()
    report = (run / "report" / "report.md").read_text()
    assert "| one DPO policy |" in report  # the per-type table's baseline column, read from RUN/dpo
    one = [f"train.output_dir={tmp_path / 'one'}", "train.dpo_baseline=true", *settings]
    single = train(load_config(overrides=one))
    expected = load_file(single / "dpo" / "checkpoint" / "params.safetensors")
    got = load_file(run / "dpo" / "checkpoint" / "params.safetensors")
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-4


@pytest.mark.parametrize("case", ["lora-routed", "dropout", "pair-scope", "fsdp-lora-routed"])
def test_kill_nine_then_resume_on_two_processes_and_on_one(runs, tmp_path, case):
    """Process 1 of a two-process run is killed (SIGKILL) before step 8 of 10 (checkpoints every 3 steps; torchrun
    then stops process 0 too). ``--resume`` with two processes ends bit for bit where the uninterrupted
    two-process run ends; ``--resume`` of a copy with one process within the float32 tolerance above (a checkpoint
    holds full parameters and optimizer state, and the batches and draws follow from the step, not the rank).
    ``dropout``: LoRA dropout draws from each process's own random stream, so each rank resumes its own (with rank
    0's on every rank, as before, the resumed run left the uninterrupted one); one process draws other masks.
    ``pair-scope``: 3 pairs per process; resumed on one process the run keeps its 6 pairs a step (before, it went on
    with 3 and ended 0.016 away). ``fsdp-lora-routed``: sharded layers, checkpoints through DCP (each process its
    shards), resumed on two processes, and on one process sharded (a group of one) and unsharded."""
    root, settings = runs
    overrides = settings[case if case in ("pair-scope", "fsdp-lora-routed") else "lora-routed"]
    overrides = overrides + (["experts.lora_dropout=0.1"] if case == "dropout" else [])
    crashed, whole = tmp_path / "crashed", tmp_path / "whole"
    listing = [{"overrides": [f"train.output_dir={crashed}", *overrides, "train.save_steps=3"], "kill": [1, 7]}]
    if case == "dropout":  # the uninterrupted run first, in the same launch
        listing.insert(0, [f"train.output_dir={whole}", *overrides, "train.save_steps=3"])
    (tmp_path / "kill.json").write_text(json.dumps(listing))
    script = str(Path(__file__).with_name("two_process_runs.py"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535"]
    result = subprocess.run([*command, script, str(tmp_path / "kill.json")], env=ENV, capture_output=True, text=True)
    assert result.returncode != 0 and "SIGKILL" in result.stderr, result.stderr[-2000:]
    step = json.loads((crashed / "checkpoint" / "state.json").read_text())["step"]
    assert step in (3, 6) and not (crashed / "gate.safetensors").exists()
    shutil.copytree(crashed, tmp_path / "copy")
    torchrun("-m", "moedpo.cli", "train", "--config", str(crashed / "config.yaml"), "--resume", port=29536)
    uninterrupted = whole if case == "dropout" else root / "two" / case
    expected = load_file(uninterrupted / "checkpoint" / "params.safetensors")
    same_size = load_file(crashed / "checkpoint" / "params.safetensors")
    assert all(torch.equal(expected[k], same_size[k]) for k in expected)
    if case == "dropout":
        return
    if case.startswith("fsdp"):  # DCP reshards: the same checkpoint resumed on one process without fsdp too
        shutil.copytree(tmp_path / "copy", tmp_path / "whole-copy")
        plain = [f"train.output_dir={tmp_path / 'whole-copy'}", "train.parallel=auto"]
        train(load_config(tmp_path / "whole-copy" / "config.yaml", plain), resume=True)
        unsharded = load_file(tmp_path / "whole-copy" / "checkpoint" / "params.safetensors")
        assert max((expected[k] - unsharded[k]).abs().max().item() for k in expected) < 1e-4
    train(load_config(tmp_path / "copy" / "config.yaml", [f"train.output_dir={tmp_path / 'copy'}"]), resume=True)
    if case == "pair-scope":
        assert (
            json.loads((tmp_path / "copy" / "checkpoint" / "state.json").read_text())["per_device_train_batch_size"]
            == 6
        )
    one = load_file(tmp_path / "copy" / "checkpoint" / "params.safetensors")
    assert max((expected[k] - one[k]).abs().max().item() for k in expected) < 1e-4


def test_sft_under_torchrun_fine_tunes_once_on_rank_0(tmp_path):
    """``torchrun -m moedpo.cli sft``: one fine-tune, one writer, both ranks exit 0. Before, both processes trained
    the same model and wrote the same files at the same time."""
    folder = tmp_path / "sft"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537"]
    arguments = ["-m", "moedpo.cli", "sft", "sft.max_steps=3", f"sft.output_dir={folder}"]
    result = subprocess.run([*command, *arguments], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model folder:") == 1 and "rank 1 leaves the fine-tune to rank 0" in result.stderr
    assert result.stderr.count("sft: step 3/3") == 1
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_parallel_engine_in_one_process_ends_where_no_parallelism_ends(tmp_path, parallel):
    """``train.parallel=ddp`` or ``fsdp`` without a launcher: the engine's route in a process group of one, bit for
    bit the run without it (the sum over one process is the identity; the draws do not depend on the engine)."""
    data = tmp_path / "prefs.jsonl"
    write_unequal_annotators(data)
    settings = [f"data.source={data}", *SETTINGS, "em.schedule=gumbel", "experts.init_std=0.3"]
    plain = train(load_config(overrides=[f"train.output_dir={tmp_path / 'plain'}", *settings]))
    engine = [f"train.output_dir={tmp_path / parallel}", f"train.parallel={parallel}", *settings]
    run = train(load_config(overrides=engine))
    assert read_metrics(run)[-1]["world_size"] == 1
    expected, got = (load_file(r / "checkpoint" / "params.safetensors") for r in (plain, run))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not torch.distributed.is_initialized()  # the group it started is closed
    if parallel == "fsdp":  # a checkpoint without dcp/ (whole optimizer state) is refused by a sharded resume
        with pytest.raises(ConfigError, match="written without train.parallel=fsdp"):
            train(load_config(plain / "config.yaml", ["train.parallel=fsdp", "train.max_steps=12"]), resume=True)
        assert not torch.distributed.is_initialized()


def test_fsdp_refuses_independent_experts_and_best_model(tmp_path):
    """What fsdp does not shard is refused by name: K full models (no one base to shard), and keeping the best
    step's whole parameters."""
    data = tmp_path / "prefs.jsonl"
    write_unequal_annotators(data)
    settings = [f"data.source={data}", *SETTINGS, "train.parallel=fsdp", "train.max_steps=1"]
    with pytest.raises(ValueError, match="use experts.mode=lora or heads"):
        train(load_config(overrides=[f"train.output_dir={tmp_path / 'k'}", "experts.mode=independent", *settings]))
    best = ["train.load_best_model_at_end=true", "data.eval_fraction=0.25", "train.eval_steps=1"]
    with pytest.raises(ConfigError, match="load_best_model_at_end=true with train.parallel=fsdp"):
        load_config(overrides=[f"train.output_dir={tmp_path / 'b'}", *settings, *best])
    assert not torch.distributed.is_initialized()


def test_every_process_refuses_a_used_run_directory_before_building(tmp_path):
    """A run directory that already holds a run: both processes stop with the same message, nothing is built or
    written. Before, rank 1 skipped the check, built the model and died in a collective ('Connection closed by
    peer')."""
    run = tmp_path / "used"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29538"]
    arguments = ["-m", "moedpo.cli", "train", f"train.output_dir={run}", *SETTINGS]
    result = subprocess.run([*command, *arguments], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("exists and is not empty") == 2, result.stderr[-2000:]
    assert "Connection closed" not in result.stderr and "reference log-probs" not in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_commands_on_a_finished_run_run_once_under_torchrun(runs):
    """``torchrun ... moedpo.cli report RUN``: one report, written by rank 0; rank 1 says it leaves it. Before, every
    rank wrote report/ at the same time."""
    root, _ = runs
    run = root / "two" / "lora-em"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29539"]
    result = subprocess.run([*command, "-m", "moedpo.cli", "report", str(run)], env=ENV, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("report:") == 1 and "rank 1 leaves it to rank 0" in result.stderr


def test_ctrl_c_under_torchrun_checkpoints_the_step_every_rank_stops_at(tmp_path):
    """Ctrl-C in the terminal (SIGINT to the launch's process group; torchrun forwards it, then sends SIGTERM): the
    ranks agree to stop after one step, write its checkpoint and print the resume command; --resume finishes. Before,
    every rank stopped at once and the steps since the last periodic checkpoint were lost."""
    data = tmp_path / "prefs.jsonl"
    write_unequal_annotators(data)
    run = tmp_path / "run"
    settings = [f"data.source={data}", *SETTINGS, "train.max_steps=3000"]  # save_steps=0: only the stop writes one
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29540"]
    arguments = [*command, "-m", "moedpo.cli", "train", f"train.output_dir={run}", *settings]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    launch = subprocess.Popen(arguments, env=ENV, start_new_session=True, **pipes)  # its own group, as a terminal
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert launch.poll() is None and time.time() < deadline, launch.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(launch.pid, signal.SIGINT)
    _, stderr = launch.communicate(timeout=120)
    assert launch.returncode != 0
    step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert 5 <= step < 3000 and f"interrupted after step {step} of 3000" in stderr, stderr[-3000:]
    assert "Resume with: moedpo train --config" in stderr
    lines = read_metrics(run)
    assert lines[-1]["step"] >= step - 1
