"""K LoRA experts in one pass: row n of a batch through expert e[n]'s adapters (issue 21).

PEFT runs a forward under one active adapter, and its per-row ``adapter_names`` refuses training; so K experts
cost K passes through the shared base, each on a small batch, and a sparse step that routes few rows to each
expert launches as many base kernels as a dense one. Here the rows are sorted by expert and go through the base
once; every PEFT LoRA ``nn.Linear`` of the decoder adds to each expert's segment of rows its own delta:

    y[rows of k] = base(x)[rows of k] + s_k B_k A_k dropout(x[rows of k])       s_k = alpha / r

the same matmuls, on the same rows, as a PEFT forward with expert k active (so the same log-probs and gradients:
tested against PEFT, float32), with no FLOP beyond them; the base's matmuls run once on all rows instead of K
times on a part. The output head, the largest matmul, runs once per expert on that expert's completion
positions, with the expert's LoRA (through the fused head, :mod:`moedpo.experts.fused_head`, where it applies).
A mask over the K adapters stacked along the rank would need fewer launches (two matmuls a layer), but costs K
times the LoRA FLOPs: as much as the base itself at width 256 and rank 16 (measured: +22% FLOPs a step).

Applies to plain LoRA on the decoder's ``nn.Linear`` layers of a model whose logits are ``head(decoder(x))``
(:func:`grouped_support` says why not otherwise: DoRA, LoRA bias, GPT-2's Conv1D, logit soft-capping); the
bank then runs the experts one after another.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moedpo.experts.logprobs import completion_logps, fusable


def _lora_layers(model) -> list[nn.Module]:
    """Every PEFT tuner layer of the model with LoRA weights (``lora_A``), the output head included."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def grouped_support(model, names: list[str]) -> str | None:
    """None when ``names``' adapters can run in one grouped pass on ``model``; otherwise the reason they cannot."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not fusable(model):
        return f"{type(base).__name__}'s logits are not head(decoder(x))"
    head = base.get_output_embeddings()  # runs once per expert, through PEFT's or the fused head: any LoRA
    for layer in _lora_layers(model):
        if layer is head:
            continue
        present = [n for n in names if n in layer.lora_A.keys()]
        if not present:
            continue
        if len(present) < len(names):
            return "the experts' adapters target different layers"
        if type(layer.base_layer) is not nn.Linear or getattr(layer, "fan_in_fan_out", False):
            return f"LoRA on {type(layer.base_layer).__name__} (grouped LoRA takes nn.Linear)"
        if getattr(layer, "merged", False):
            return "an adapter is merged into the base"
        for name in names:
            a, b = layer.lora_A[name], layer.lora_B[name]
            if name in getattr(layer, "lora_variant", {}) or type(a) is not nn.Linear or b.bias is not None:
                return "a LoRA variant (DoRA) or a LoRA bias"
            if a.weight.shape != layer.lora_A[names[0]].weight.shape:
                return "the experts' adapters have different ranks"
        rates = {float(getattr(layer.lora_dropout[n], "p", 0.0)) for n in names}
        if len(rates) > 1:
            return "the experts' adapters have different dropout"
    return None


def grouped_delta(layer, names: list[str], counts: list[int], x: torch.Tensor) -> torch.Tensor:
    """Each segment's LoRA delta under its expert: x (N, T, in) with rows sorted by expert, ``counts[k]`` rows of
    expert k (summing to N) -> (N, T, out)."""
    if x.shape[0] != sum(counts):
        raise ValueError(f"grouped LoRA: expert segments of {sum(counts)} rows for an input of {x.shape[0]} rows")
    deltas = []
    for name, rows in zip(names, x.split(counts)):
        if rows.shape[0]:
            a, b = layer.lora_A[name], layer.lora_B[name]
            deltas.append(b(a(layer.lora_dropout[name](rows.to(a.weight.dtype)))) * layer.scaling[name])
    return torch.cat(deltas)


@contextlib.contextmanager
def grouped_adapters(model, names: list[str], counts: list[int], skip: nn.Module | None = None):
    """Within the context, every LoRA layer of ``model`` but ``skip`` computes base(x) plus, on each expert's
    segment of rows (rows sorted by expert, ``counts[k]`` of expert k), that expert's delta.

    PEFT's own adapter terms are off meanwhile (``disable_adapter_layers``). The ``names`` adapters' weights
    require grad within the context and after it (PEFT's re-enabling on the way out would freeze all but the
    active adapter, and a backward after the context would then skip the others); other flags stay as found."""
    every = _lora_layers(model)
    layers = [layer for layer in every if layer is not skip and names[0] in layer.lora_A.keys()]
    flags = {p: p.requires_grad for layer in every for p in layer.parameters()}
    for layer in every:
        for name in (n for n in names if n in layer.lora_A.keys()):
            flags.update({layer.lora_A[name].weight: True, layer.lora_B[name].weight: True})

    def add_delta(layer, args, output):
        return output + grouped_delta(layer, names, counts, args[0]).to(output.dtype)

    handles = [layer.register_forward_hook(add_delta) for layer in layers]
    model.base_model.disable_adapter_layers()
    for param, flag in flags.items():
        param.requires_grad_(flag)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.base_model.enable_adapter_layers()
        for param, flag in flags.items():
            param.requires_grad_(flag)


def grouped_sequence_logps(
    model,
    names: list[str],
    experts: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of log pi_{e[n]}(token | prefix) over row n's completion tokens, all rows in one decoder pass: (N,)
    float32. ``inputs_embeds`` (N, T, D) replaces ``input_ids`` as the decoder's input (the labels still come from
    ``input_ids``). Rows already sorted by expert (as the bank builds them) are not copied."""
    order = None if bool((experts[1:] >= experts[:-1]).all()) else torch.argsort(experts, stable=True)
    if order is not None:
        experts, input_ids, attention_mask, completion_mask = (
            t[order] for t in (experts, input_ids, attention_mask, completion_mask)
        )
        inputs_embeds = None if inputs_embeds is None else inputs_embeds[order]
    counts = torch.bincount(experts, minlength=len(names)).tolist()  # one host sync a pass
    base = model.get_base_model()
    head = base.get_output_embeddings()
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    with grouped_adapters(model, names, counts, skip=head):
        hidden = base.get_decoder()(attention_mask=attention_mask, use_cache=False, **inputs).last_hidden_state
    groups = [([name], experts == k) for k, name in enumerate(names) if counts[k]]
    logps = completion_logps(head, hidden, input_ids, completion_mask, groups)
    return logps if order is None else torch.empty_like(logps).index_put((order,), logps)
