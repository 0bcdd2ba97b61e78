"""Command line: ``moedpo train``, ``sft``, ``eval``, ``report``, ``generate``, ``personalize``, ``export``,
``config``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import sys
import warnings

from moedpo.config import ConfigError, describe, load_config
from moedpo.data.formats import PreferenceDataError
from moedpo.distributed import launcher_rank
from moedpo.eval.report import report
from moedpo.export import export_merged
from moedpo.personalize import personalize
from moedpo.runs import personalization_path
from moedpo.session import evaluate_run, generate
from moedpo.sft import sft
from moedpo.threads import AUTO, cpu_threads
from moedpo.training import TrainingInterrupted, train

TRAIN_HELP = "Train K experts and a gate. With no arguments: the built-in world on a tiny model (no downloads)."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moedpo", description="Mix-/MoE-DPO: K experts and a gate by variational EM")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help=TRAIN_HELP, description=TRAIN_HELP)
    p_train.add_argument("--config", help="YAML config file (see examples/configs/)")
    p_train.add_argument("--resume", action="store_true", help="continue train.output_dir from its last checkpoint")
    p_train.add_argument("overrides", nargs="*", help="section.key=value, e.g. experts.num_experts=3")
    sft_help = "a reference policy from the data: fine-tune model.name_or_path on the preferred completions"
    p_sft = sub.add_parser("sft", help=sft_help, description=sft_help)
    p_sft.add_argument("--config", help="YAML config file (data.*, model.*, sft.* keys)")
    p_sft.add_argument("--resume", action="store_true", help="continue sft.output_dir from its last checkpoint")
    p_sft.add_argument("overrides", nargs="*", help="section.key=value, e.g. sft.max_steps=500")
    p_eval = sub.add_parser("eval", help="held-out mixture and per-expert accuracy of a run")
    p_eval.add_argument("run_dir")
    p_eval.add_argument("--data", help="held-out preference file (default: the run's own held-out split)")
    p_report = sub.add_parser("report", help="write RUN_DIR/report/: metrics, recovered types, rewards table, plots")
    p_report.add_argument("run_dir")
    p_report.add_argument("--num-prompts", type=int, help="held-out prompts for the rewards table (report.num_prompts)")
    p_config = sub.add_parser("config", help="print every config key with its value, type and meaning")
    p_config.add_argument("--config", help="YAML config file: print it resolved (defaults filled in)")
    p_config.add_argument("overrides", nargs="*", help="section.key=value")
    p_pers = sub.add_parser(
        "personalize", help="a new annotator's posterior over the experts from a few labelled pairs (no retraining)"
    )
    p_pers.add_argument("run_dir")
    p_pers.add_argument("--pairs", required=True, help="the annotator's labelled pairs (rankings, for a ranking run)")
    p_pers.add_argument("--user", help="the annotator's name (default: the file's user_id, else its name)")
    p_gen = sub.add_parser("generate", help="route a prompt by the gate and generate with that expert")
    p_gen.add_argument("run_dir")
    p_gen.add_argument("--prompt", required=True)
    p_gen.add_argument("--user", help="annotator id, for user-conditioned gates")
    p_gen.add_argument("--expert", default="auto", help="expert index, or auto (the gate's top expert)")
    p_gen.add_argument("--max-new-tokens", type=int, default=32)
    p_gen.add_argument(
        "--policy",
        default="gate",
        choices=("gate", "minmax"),
        help="gate: its top expert; minmax: an expert drawn from the report's min-max-regret weights",
    )
    p_gen.add_argument("--seed", type=int, default=0, help="--policy minmax: the seed of the expert's draw")
    p_export = sub.add_parser("export", help="each expert as a standalone Hugging Face model folder (no PEFT)")
    p_export.add_argument("run_dir")
    p_export.add_argument("--merged", action="store_true", help="merge each expert into its base (required for now)")
    p_export.add_argument("--output-dir", help="where DIR/expert_<k>/ go (default: RUN_DIR/merged)")
    p_export.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="upload expert k to the model repo REPO_ID-expert_<k>"
    )
    args = parser.parse_args(argv)
    # peft 0.21 calls a renamed transformers helper on every wrap; the warning is theirs and says nothing to users
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    rank = launcher_rank()
    if rank and args.command in ONE_PROCESS_COMMANDS:  # under torchrun: rank 0 reads and writes the run once
        print(f"moedpo {args.command}: rank {rank} leaves it to rank 0 (it runs in one process)", file=sys.stderr)
        return 0
    # train chooses by train.num_threads; the other commands by the cores free now (or OMP_NUM_THREADS)
    threads = contextlib.nullcontext() if args.command in ("train", "config") else cpu_threads(AUTO)
    try:
        with threads:
            if args.command == "train":
                run_dir = train(load_config(args.config, args.overrides), resume=args.resume)
                if rank == 0:  # under torchrun: once
                    print(f"run directory: {run_dir}")
            elif args.command == "sft":
                folder = sft(load_config(args.config, args.overrides), resume=args.resume)
                if folder is not None:  # None: a torchrun rank other than 0
                    print(f"model folder: {folder} (use it as model.name_or_path={folder})")
            elif args.command == "report":
                print(f"report: {report(args.run_dir, num_prompts=args.num_prompts)}")
            elif args.command == "config":
                print(describe(load_config(args.config, args.overrides)), end="")
            elif args.command == "eval":
                print(json.dumps(evaluate_run(args.run_dir, args.data), indent=1))
            elif args.command == "export":
                _export(args)
            elif args.command == "personalize":
                result = personalize(args.run_dir, args.pairs, args.user)
                print(json.dumps(result.__dict__, indent=1))
                print(
                    f"saved {personalization_path(args.run_dir, result.user)}; route it with: moedpo generate "
                    f"{args.run_dir} --user {result.user} --prompt ...",
                    file=sys.stderr,
                )
            else:
                expert, text = generate(args.run_dir, args.prompt, args.user, args.expert, args.max_new_tokens,
                                        args.policy, args.seed)  # fmt: skip
                print(f"[expert {expert}] {text}")
    except (ConfigError, PreferenceDataError, FileExistsError, FileNotFoundError) as err:  # one line, no traceback
        print(f"moedpo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk, not the input: say which file and what to do
        print(f"moedpo {args.command}: error: {_os_problem(err, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        said = str(err) if isinstance(err, TrainingInterrupted) else "interrupted (Ctrl-C)"
        print(f"moedpo {args.command}: {said}", file=sys.stderr)
        return 130
    return 0


# commands that read a finished run and write into it or print: under torchrun they would run once per rank (two
# reports written into one folder at once); train runs on every rank, sft on rank 0 (moedpo.sft)
ONE_PROCESS_COMMANDS = ("eval", "report", "generate", "personalize", "export", "config")


def _export(args) -> None:
    if not args.merged:
        raise ConfigError(
            f"export: pass --merged (standalone models); the PEFT adapters are already in {args.run_dir}/experts/"
        )
    folders, repos = export_merged(args.run_dir, args.output_dir, args.push_to_hub)
    for k, folder in enumerate(folders):
        pushed = f" -> https://huggingface.co/{repos[k]}" if repos else ""
        print(f"expert {k}: {folder}{pushed}")
    print(f"load one with: AutoModelForCausalLM.from_pretrained({str(folders[0])!r})", file=sys.stderr)


def _os_problem(err: OSError, command: str) -> str:
    where = f": {err.filename}" if err.filename else ""
    text = f"{err.strerror or err}{where}"
    if err.errno == errno.ENOSPC and command == "train":
        text += (
            "; free some space, then continue with --resume (the last complete checkpoint is kept; with none yet, "
            "rerun without --resume and with train.overwrite=true)"
        )
    return text


if __name__ == "__main__":
    sys.exit(main())
