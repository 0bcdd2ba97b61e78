"""Memory-light sequence log-probs over completion tokens.

Fused path (decoder-only models whose head is a plain projection: Llama, Mistral, Qwen, GPT-2, ...): the
decoder gives hidden states, and the output head runs only on the positions that predict a completion token,
a chunk of positions at a time. A linear or plain-LoRA head runs through :mod:`moedpo.experts.fused_head`
(log-softmax fused with the projection, a hand-written backward that recomputes a chunk when there are several);
any other head, each chunk under activation checkpointing. So neither the (2B, T, V) logits nor their float32
copy ever exist, in the forward or for the backward: the peak is one chunk of ``MAX_CHUNK_ELEMENTS`` logits.
Models whose forward does more than ``head(hidden)`` (logit soft-capping or scaling, named in the config or
seen by a one-time probe against the plain forward) use the plain path, where the model returns logits only
for positions that can hold completion tokens (``logits_to_keep``) and the log-softmax runs a few sequences at
a time.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from moedpo.experts.fused_head import fused_head_log_softmax, head_parts

MAX_CHUNK_ELEMENTS = 2**25  # logits per chunk of the fused head: 128 MiB in float32


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """log softmax(logits)[labels] per position: (N, T, V), (N, T) -> (N, T), at least float32. The one plain
    route to log-probs at the labels (the plain forward, SFT, the head's autograd path; the fused head's twin).

    float32/float64 logits are used in place (gather minus logsumexp: no (N, T, V) copy). Half-precision logits
    are upcast ``chunk_rows`` sequences at a time, so a float32 copy of the whole tensor never exists.
    """
    if logits.element_size() >= 4:
        return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    rows = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk = logits[start : start + chunk_rows].float()  # (chunk_rows, T, V) float32 at most
        picked = chunk.gather(-1, labels[start : start + chunk_rows].unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(chunk, -1))
    return torch.cat(rows)


def _head_chunk(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return selective_log_softmax(head(hidden).unsqueeze(0), labels.unsqueeze(0), chunk_rows=1)[0]  # (C,)


def head_log_softmax(
    head, hidden: torch.Tensor, labels: torch.Tensor, max_elements: int | None = None, adapters: list[str] | None = None
):
    """log softmax(head(hidden))[labels] for M positions: (M, D), (M,) -> (M,) float32, chunk by chunk.

    With grad enabled and more than one chunk, each chunk's logits are recomputed in the backward, never stored
    (a single chunk is within the memory budget and is kept). A linear or plain-LoRA head takes the fused path
    (:mod:`moedpo.experts.fused_head`, a hand-written backward); any other head, checkpointed autograd.
    ``adapters``: the head's PEFT adapters to apply instead of the active ones.
    """
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    size = max(1, (MAX_CHUNK_ELEMENTS if max_elements is None else max_elements) // vocab)
    parts = head_parts(head, adapters)
    if parts is not None:
        return fused_head_log_softmax(parts, hidden, labels, size)
    if adapters is None or not hasattr(head, "_active_adapter"):  # a PEFT head: recompute with the adapter used now
        adapters = getattr(head, "_active_adapter", None)
    contexts = lambda: (contextlib.nullcontext(), _with_adapter(head, adapters))  # noqa: E731
    picked, chunked = [], hidden.shape[0] > size  # one chunk fits the budget: keep its logits, no recompute
    with _with_adapter(head, adapters):
        for start in range(0, hidden.shape[0], size):
            h, y = hidden[start : start + size], labels[start : start + size]
            if chunked and torch.is_grad_enabled():
                picked.append(checkpoint(_head_chunk, head, h, y, use_reentrant=False, context_fn=contexts))
            else:
                picked.append(_head_chunk(head, h, y))
    return torch.cat(picked) if picked else hidden.new_zeros(0).float()


@contextlib.contextmanager
def _with_adapter(head, adapters):
    """During a checkpoint's recomputation, the PEFT adapter that was active in the forward (the bank may have
    switched experts since)."""
    if adapters is None:
        yield
        return
    current, head._active_adapter = head._active_adapter, adapters
    try:
        yield
    finally:
        head._active_adapter = current


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(_base(model).forward).parameters


_FUSABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base model -> fused path is exact


def fusable(model) -> bool:
    """Whether ``model``'s logits are ``head(decoder(x))`` (checked once per model: its config and a probe)."""
    base = _base(model)
    if base not in _FUSABLE:
        _FUSABLE[base] = _probe(model)
    return _FUSABLE[base]


# config fields by which a model's forward changes the logits after the head, and their neutral values
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None, 0, 0.0),  # Gemma 2 and 3: c * tanh(logits / c)
    "logit_scale": (None, 1, 1.0),  # Cohere: logits * scale
    "logits_scaling": (None, 1, 1.0),  # Granite: logits / scaling
    "lm_head_multiplier": (None, 1, 1.0),
    "output_multiplier": (None, 1, 1.0),
}


@torch.no_grad()
def _probe(model) -> bool:
    """The config names no logit transform, and in eval mode (no dropout draws) the model's logits equal
    ``head(decoder(x))`` on a probe. Soft-capping of small random logits changes them by ~1e-5 relative, under any
    tolerance a probe could use: hence the config check."""
    base = _base(model)
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return False
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if any(getattr(config, name, None) not in neutral for name, neutral in LOGIT_TRANSFORMS.items()):
        return False
    device = next(base.parameters()).device
    ids = torch.arange(1, 9, device=device).remainder(base.config.vocab_size).unsqueeze(0)
    mask = torch.ones_like(ids)
    modes = {module: module.training for module in base.modules()}
    base.eval()
    try:
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        fused = base.get_output_embeddings()(hidden)
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    except (AttributeError, TypeError, ValueError):
        return False
    finally:
        for module, training in modes.items():
            module.training = training
    return fused.shape == plain.shape and bool(torch.allclose(fused.float(), plain.float(), rtol=1e-4, atol=1e-5))


def sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    return_hidden: bool = False,
    fused: bool | None = None,
    **forward_kwargs,
):
    """Sum of log pi(token | prefix) over completion tokens: (N, T) batch -> (N,) (float32 or wider).

    Extra keyword arguments go to the model (``inputs_embeds`` replaces ``input_ids`` as the model's input; the
    labels still come from ``input_ids``). With ``return_hidden`` also returns the last hidden states (N, T, D).
    ``fused=None`` takes the fused path where :func:`fusable` says it is exact.
    """
    others = sorted(set(forward_kwargs) - {"inputs_embeds"})  # position_ids, adapter_names ...: the model's forward
    if fused and others:
        raise ValueError(f"the fused path passes only inputs_embeds to the decoder; got {others} (use fused=None)")
    use_fused = not others and (fusable(model) if fused is None else fused)
    run = _fused_logps if use_fused else _plain_logps
    logps, hidden = run(model, input_ids, attention_mask, completion_mask, forward_kwargs, want_hidden=return_hidden)
    return (logps, hidden) if return_hidden else logps


def _fused_logps(model, input_ids, attention_mask, completion_mask, kwargs, want_hidden=True):
    base = _base(model)
    inputs = {"inputs_embeds": kwargs["inputs_embeds"]} if "inputs_embeds" in kwargs else {"input_ids": input_ids}
    hidden = base.get_decoder()(attention_mask=attention_mask, use_cache=False, **inputs).last_hidden_state
    return completion_logps(base.get_output_embeddings(), hidden, input_ids, completion_mask), hidden


def completion_logps(head, hidden, input_ids, completion_mask, groups=None) -> torch.Tensor:
    """Sum of the completion tokens' log-probs from the decoder's last hidden states (N, T, D): (N,) float32.
    The head runs only on the positions that predict a completion token. ``groups``: [(head adapters, rows (N,)
    bool)], each group's rows through the head with those PEFT adapters (a grouped pass of several experts)."""
    mask = completion_mask[:, 1:].bool()  # position t predicts token t + 1
    rows, cols = torch.nonzero(mask, as_tuple=True)
    labels = input_ids[rows, cols + 1]
    if groups is None:
        token_logps = head_log_softmax(head, hidden[rows, cols], labels)
    else:
        token_logps = hidden.new_zeros(rows.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
        for adapters, members in groups:
            at = torch.nonzero(members[rows]).squeeze(-1)  # this group's positions
            if at.numel():
                picked = head_log_softmax(head, hidden[rows[at], cols[at]], labels[at], adapters=adapters)
                token_logps = token_logps.index_put((at,), picked.to(token_logps.dtype))
    logps = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=input_ids.device)
    return logps.index_add(0, rows, token_logps)


def _plain_logps(model, input_ids, attention_mask, completion_mask, kwargs, want_hidden=True):
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    first = int(mask.float().argmax(1).min()) if mask.any() else labels.shape[1] - 1  # first completion label
    keep = labels.shape[1] - first  # positions whose next token can be a completion token
    kwargs = dict(kwargs, use_cache=False, output_hidden_states=want_hidden)
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep + 1  # the last position predicts nothing; trimmed below
    if "inputs_embeds" not in kwargs:
        kwargs["input_ids"] = input_ids
    outputs = model(attention_mask=attention_mask, **kwargs)
    logits = outputs.logits[:, -(keep + 1) : -1]  # (N, keep, V): predictions for labels[:, first:]
    token_logps = selective_log_softmax(logits, labels[:, first:])
    logps = (token_logps * mask[:, first:]).sum(-1)
    return logps, (outputs.hidden_states[-1] if want_hidden else None)


def pooled_prompt_features(hidden: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """Mean of hidden states over prompt tokens: (N, T, D) -> (N, D) float32."""
    prompt = (attention_mask.bool() & ~completion_mask.bool()).unsqueeze(-1).float()
    return (hidden.float() * prompt).sum(1) / prompt.sum(1).clamp_min(1.0)


def pooled_completion_features(hidden: torch.Tensor, completion_mask: torch.Tensor):
    """Mean of hidden states over completion tokens: (N, T, D) -> (N, D) float32."""
    completion = completion_mask.bool().unsqueeze(-1).float()
    return (hidden.float() * completion).sum(1) / completion.sum(1).clamp_min(1.0)


def pooled_features(hidden: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """Prompt and completion means side by side, (N, T, D) -> (N, 2D): what the gate (prompt half) and the
    amortized guide (both halves of chosen and rejected) read, at no cost beyond the reference pass."""
    return torch.cat(
        [
            pooled_prompt_features(hidden, attention_mask, completion_mask),
            pooled_completion_features(hidden, completion_mask),
        ],
        -1,
    )
