"""Shared trunk + expert heads (the paper's MoE-DPO parameterisation) and independent experts.

:class:`HeadsBank` runs the frozen bottom layers once per batch; each expert owns LoRA adapters on the top
``top_layers`` decoder layers and reruns only those from the cached trunk output. It works for decoder stacks
whose model forward accepts ``inputs_embeds`` without adding to them (Llama, Mistral, Qwen2/3, Phi-3 ...); the
split is verified against the full forward at construction and refused with a clear error otherwise.
:class:`IndependentBank` holds K full copies of a small model.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from moedpo.experts.bank import ExpertBank, select_pairs, stacked_rows
from moedpo.experts.grouped_lora import grouped_sequence_logps
from moedpo.experts.logprobs import pooled_features, sequence_logps
from moedpo.experts.lora import LoRABank, decoder_stack


def _output_head_name(model) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


class HeadsBank(LoRABank):
    """Shared frozen trunk (bottom layers, run once per batch) + per-expert LoRA on the top ``top_layers`` and,
    with ``output_head``, on the output head."""

    def __init__(self, model, num_experts: int, *, top_layers: int = 1, output_head: bool = True, **lora):
        _, layers, _ = decoder_stack(model)
        depth = len(layers)
        if not 1 <= top_layers <= depth:
            raise ValueError(f"top_layers must be in [1, {depth}] for this model, got {top_layers}")
        self.split = depth - top_layers
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in layers[-1].named_modules() if isinstance(m, nn.Linear)})
        owned = "|".join(str(i) for i in range(self.split, depth))
        pattern = rf".*\.layers\.({owned})\.(.*\.)?({'|'.join(linear)})"  # every linear layer of the top layers
        if output_head:
            pattern += f"|{_output_head_name(model)}"  # ... and the output head
        lora.setdefault("target_modules", pattern)
        super().__init__(model, num_experts, **lora)
        self.decoder, self.layers, self.norm_name = decoder_stack(self.model)
        self._trunk_key, self._trunk = None, None
        self._verify_split()

    @contextlib.contextmanager
    def _only_layers(self, layers, keep_norm: bool):
        saved_layers = self.decoder.layers
        saved_norm = getattr(self.decoder, self.norm_name) if self.norm_name else None
        self.decoder.layers = nn.ModuleList(layers)
        if self.norm_name and not keep_norm:
            setattr(self.decoder, self.norm_name, nn.Identity())
        try:
            yield
        finally:
            self.decoder.layers = saved_layers
            if self.norm_name:
                setattr(self.decoder, self.norm_name, saved_norm)

    @torch.no_grad()
    def trunk(self, batch) -> torch.Tensor:
        """Hidden states after the frozen bottom layers (2B, T, D), computed once per batch.

        The cache is keyed by the batch's values: a copy of its input_ids and attention_mask (2B, T), compared with
        ``torch.equal``, since the trunk is a function of them alone. An address key (data_ptr, shape, index)
        matched a different batch once freed memory was reused (new users' probe batches all have index -1..-n),
        and a key on the tensor object would miss in training on an accelerator, where margins() and backward()
        each move the same CPU batch to the device anew.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if not self._is_cached(ids, mask):
            with self._only_layers(self.layers[: self.split], keep_norm=False):
                out = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            self._trunk_key, self._trunk = (ids.clone(), mask.clone()), out.last_hidden_state
        return self._trunk

    def begin_pass(self) -> None:
        """Under ``lockstep`` the trunk is kept within one micro-batch's passes only: a process whose batch equals its
        last one would otherwise skip the trunk's sharded forward that the others run (a collective mismatch)."""
        if self.lockstep is not None:
            self._trunk_key, self._trunk = None, None

    def _is_cached(self, ids: torch.Tensor, mask: torch.Tensor) -> bool:
        if self._trunk_key is None:
            return False
        cached_ids, cached_mask = self._trunk_key
        same_shape = cached_ids.shape == ids.shape and cached_mask.shape == mask.shape
        return same_shape and torch.equal(cached_ids, ids) and torch.equal(cached_mask, mask)

    def _top_logps(self, batch, hidden=None):
        hidden = self.trunk(batch) if hidden is None else hidden
        with self._only_layers(self.layers[self.split :], keep_norm=True):
            return sequence_logps(
                self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], inputs_embeds=hidden
            )

    def expert_logps(self, k: int, batch: dict) -> torch.Tensor:
        self.activate(k)
        return self._top_logps(batch)

    def rows_logps(self, k: int, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        """Expert k on some pairs of a batch: the batch's trunk (computed once) sliced, then k's top layers."""
        if rows.numel() == batch["index"].shape[0]:
            return self.expert_logps(k, batch)
        hidden = self.trunk(batch)[stacked_rows(batch, rows)]
        self.activate(k)
        return self._top_logps(select_pairs(batch, rows), hidden)

    def grouped_logps(self, batch, rows, experts):
        """The batch's trunk (computed once) at ``rows``, then each row's expert's top layers, in one pass."""
        hidden = self.trunk(batch)[rows]
        inputs = (batch[key][rows] for key in ("input_ids", "attention_mask", "completion_mask"))
        with self._only_layers(self.layers[self.split :], keep_norm=True):
            return grouped_sequence_logps(self.model, self.names, experts, *inputs, inputs_embeds=hidden)

    @torch.no_grad()
    def _verify_split(self) -> None:
        ids = torch.arange(2, 10, device=self.device).remainder(self.model.config.vocab_size).unsqueeze(0)
        mask = torch.ones_like(ids)
        probe = {
            "input_ids": ids.repeat(2, 1),
            "attention_mask": mask.repeat(2, 1),
            "completion_mask": torch.cat([torch.zeros(2, 4), torch.ones(2, 4)], 1).long().to(self.device),
            "index": torch.tensor([-1], device=self.device),
        }
        with self.model.disable_adapter():
            full = sequence_logps(
                self.model, probe["input_ids"], probe["attention_mask"], probe["completion_mask"], fused=False
            )
            split = self._top_logps(probe)
        self._trunk_key = None
        if not torch.allclose(full.float(), split.float(), atol=1e-4, rtol=1e-4):
            raise ValueError(
                f"heads mode: splitting {type(self.model.get_base_model()).__name__} into trunk and "
                "top layers changes its output (its forward treats inputs_embeds specially); "
                "use experts.mode=lora"
            )


class IndependentBank(ExpertBank):
    """K separate full models (small models only); the reference is the frozen original. Copies start apart by
    relative noise: each weight tensor gets ``0.1 * init_std * std(tensor)`` Gaussian noise."""

    def __init__(
        self, model, num_experts: int, *, init_std: float = 0.0, seed: int = 0, autocast_dtype=None, reuse_graph=False
    ):
        super().__init__(autocast_dtype, reuse_graph)
        self.num_experts = num_experts
        self.reference_model = model.eval().requires_grad_(False)
        self.experts = nn.ModuleList()
        for k in range(num_experts):
            expert = copy.deepcopy(model).train().requires_grad_(True)
            if init_std:
                generator = torch.Generator().manual_seed(seed + 1000 * k)
                with torch.no_grad():
                    for param in expert.parameters():
                        scale = 0.1 * init_std * (param.std() if param.numel() > 1 else 0.0)
                        param.add_(torch.randn(param.shape, generator=generator).to(param) * scale)
            self.experts.append(expert)
        self.device = next(model.parameters()).device

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"expert_{k}.{n}": p for k, e in enumerate(self.experts) for n, p in e.named_parameters()}

    def modules(self) -> list[nn.Module]:
        return list(self.experts)  # the reference stays in eval mode

    def expert_logps(self, k: int, batch: dict) -> torch.Tensor:
        return sequence_logps(self.experts[k], batch["input_ids"], batch["attention_mask"], batch["completion_mask"])

    def reference_pass(self, batch):
        logps, hidden = sequence_logps(
            self.reference_model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            return_hidden=True,
        )
        return logps, pooled_features(hidden, batch["attention_mask"], batch["completion_mask"])

    def save_experts(self, directory) -> None:
        """Full model folders ``directory/expert_<k>`` (``AutoModelForCausalLM.from_pretrained`` loads them)."""
        for k, expert in enumerate(self.experts):
            expert.save_pretrained(f"{directory}/expert_{k}")
