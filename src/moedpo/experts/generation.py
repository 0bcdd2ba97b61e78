"""A policy's causal LM (:func:`policy`), and completions sampled from it for many prompts at once, at a fixed
seed (reports, the reviews world's annotation, ``moedpo generate``).

Prompts are left-padded into batches; sampling is at temperature 1 with no top-k or top-p, so the samples are
draws from the policy itself (what its rewards are measured on). The same seed, prompts and model give the same
completions.
"""

from __future__ import annotations

import contextlib

import torch

from moedpo.config import ConfigError
from moedpo.data.tokenize import prompt_input_ids
from moedpo.progress import Progress


@contextlib.contextmanager
def policy(bank, k: int | None):
    """The causal LM of expert ``k`` (None: the reference) of a LoRA, heads (its adapters on the top layers) or
    independent bank, in eval mode."""
    bank.eval_mode()
    if hasattr(bank, "experts"):
        yield bank.reference_model if k is None else bank.experts[k]
    elif hasattr(bank, "activate"):
        if k is None:
            with bank.model.disable_adapter():
                yield bank.model
        else:
            bank.activate(k)
            yield bank.model
    else:
        raise ConfigError(f"sampling needs the experts' causal LMs: {type(bank).__name__} cannot generate")


@torch.no_grad()
def sample_completions(
    model, tokenizer, prompts: list, max_new_tokens: int = 48, seed: int = 0, batch_size: int = 64, desc=None
) -> list[str]:
    """One completion per prompt (``prompts``: strings, or message lists for a chat-templated model); ``desc``:
    show a progress bar (batches) under that name."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[str] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    progress = Progress(0, -(-len(prompts) // batch_size), desc or "sampling", enabled=desc is not None)
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [prompt_input_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            for i, x in enumerate(ids):  # left padding: every prompt ends where generation starts
                input_ids[i, width - len(x) :], attention[i, width - len(x) :] = torch.tensor(x), 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=pad,
            )
            out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            progress.update(start // batch_size + 1)
    finally:
        progress.close()
        torch.random.set_rng_state(generator_state)
    return out


@torch.no_grad()
def greedy_completion(model, tokenizer, prompt, max_new_tokens: int = 32) -> str:
    """The greedy continuation of one prompt (a string, or messages for a chat-templated model)."""
    ids = torch.tensor([prompt_input_ids(tokenizer, prompt)], device=next(model.parameters()).device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
