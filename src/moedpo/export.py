"""``moedpo export RUN --merged``: each expert of a finished run as a standalone Hugging Face model folder,
``DIR/expert_<k>/`` (config, safetensors weights, tokenizer, generation config), which
``AutoModelForCausalLM.from_pretrained`` loads with no PEFT and no moedpo.

- ``lora`` and ``heads`` experts are PEFT adapters on the base (heads: LoRA on the expert's own top decoder layers
  and the output head), so merging (``merge_and_unload``) gives a full model whose weights are the expert's; a base
  whose output head shares the input embeddings is untied first, else merging a LoRA on the head would also move
  the embeddings;
- ``independent`` experts are full models already: copied with the run's tokenizer.

``--push-to-hub REPO_ID`` uploads each folder to its own model repository, ``REPO_ID-expert_<k>`` (one repository
per expert, so each loads by its name: ``from_pretrained("REPO_ID-expert_0")``), with ``HfApi().create_repo`` and
``upload_folder`` (a token from ``hf auth login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from moedpo.config import Config, ConfigError, load_config
from moedpo.experts.loading import DTYPES, adapter_base, load_pretrained
from moedpo.runs import GATE_FILE


def export_merged(run_dir: str | Path, output_dir: str | Path | None = None, push_to_hub: str | None = None):
    """Write ``output_dir/expert_<k>/`` (default ``RUN/merged``) for every expert; with ``push_to_hub``, upload
    each to ``<push_to_hub>-expert_<k>``. Returns the folders (and the repository ids, if pushed)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a moedpo run directory (no config.yaml)")
    if not (run_dir / GATE_FILE).exists():
        raise FileNotFoundError(f"{run_dir}: training did not finish (no {GATE_FILE}); there are no experts to export")
    config = load_config(run_dir / "config.yaml")
    repos = [f"{push_to_hub}-expert_{k}" for k in range(config.experts.num_experts)] if push_to_hub else []
    for repo in repos[:1]:  # before any merging
        try:
            validate_repo_id(repo)
        except HFValidationError as err:
            problem = f"not a repository id ({err}); expected name or org/name"
            raise ConfigError(f"--push-to-hub {push_to_hub}: {problem}") from None
    out = Path(output_dir) if output_dir is not None else run_dir / "merged"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--output-dir {out}: exists and is not an empty folder; remove it or choose another")
    folders = []
    for k in range(config.experts.num_experts):
        model, tokenizer = merged_expert(run_dir, config, k)
        folder = out / f"expert_{k}"
        model.save_pretrained(folder)  # config.json, model.safetensors, generation_config.json
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders, [_upload(folder, repo, run_dir) for folder, repo in zip(folders, repos)]


def merged_expert(run_dir: Path, config: Config, k: int):
    """(causal LM, tokenizer) of expert k as one plain model, in ``model.dtype``, on the CPU."""
    folder = run_dir / "experts" / f"expert_{k}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing; the run directory is incomplete")
    m = config.model
    if config.experts.mode == "independent":  # a full model folder already
        tokenizer_from = run_dir / "base" if (run_dir / "base").exists() else m.name_or_path
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from, trust_remote_code=m.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[m.dtype])
        return model, tokenizer
    tokenizer, base = load_pretrained(adapter_base(folder), m.dtype, m.trust_remote_code)
    _untie_output_head(base)
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return merged.eval(), tokenizer


def _untie_output_head(model) -> None:
    """Give the output head its own copy of a tied embedding matrix, so a merged head LoRA changes the head only."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        return
    head.weight = torch.nn.Parameter(embeddings.weight.detach().clone())
    model.config.get_text_config().tie_word_embeddings = False
    model.config.tie_word_embeddings = False


def _next_step(err: Exception) -> str:
    """What to do about a failed upload: offline mode, no network, or (otherwise) the token."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set: unset it on a machine with network"
    if not isinstance(err, HfHubHTTPError) and any(w in type(err).__name__ for w in ("Connect", "Timeout", "Network")):
        return "the hub could not be reached: check the network (or a proxy via HTTPS_PROXY)"
    return "log in with `hf auth login` or set HF_TOKEN (with write access)"


def _upload(folder: Path, repo: str, run_dir: Path) -> str:
    api = HfApi()
    try:
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo, folder_path=str(folder), repo_type="model", commit_message=f"moedpo export of {run_dir.name}"
        )
    except Exception as err:  # noqa: BLE001 (the hub client raises its HTTP library's errors: all end here, named)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"--push-to-hub: uploading {folder} to {repo} failed ({type(err).__name__}: {first}); {_next_step(err)}, "
            f"then rerun with --output-dir elsewhere (the merged folders are in {folder.parent})"
        ) from None
    return repo
