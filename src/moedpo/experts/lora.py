"""K LoRA experts on one causal LM (PEFT adapters ``expert_0..expert_{K-1}``), the bank of ``experts.mode=lora``
and the base of the heads bank (:mod:`moedpo.experts.heads`)."""

from __future__ import annotations

import torch
from torch import nn

from moedpo.experts.bank import ExpertBank
from moedpo.experts.grouped_lora import grouped_sequence_logps, grouped_support
from moedpo.experts.logprobs import pooled_features, sequence_logps


def decoder_stack(model):
    """(decoder module, its ModuleList of layers, the final-norm attribute name) of a causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"heads mode needs a decoder with a `layers` ModuleList; {type(base).__name__} has none "
            "(use experts.mode=lora)"
        )
    norm = "norm" if hasattr(decoder, "norm") else None
    return decoder, layers, norm


def _distinct_lora_init(model, adapter_names, init_std: float, seed: int) -> None:
    """LoRA B starts at zero (pi_k = pi_ref for all k): perturb it per expert so the symmetry breaks."""
    with torch.no_grad():
        for k, name in enumerate(adapter_names):
            generator = torch.Generator().manual_seed(seed + 1000 * k)
            for param_name, param in model.named_parameters():
                if f"lora_B.{name}." in param_name:
                    noise = torch.randn(param.shape, generator=generator) * init_std
                    param.copy_(noise.to(param.dtype))


def resolve_target_modules(model, spec):
    """PEFT target modules; ``"all-linear+head"`` = every linear layer including the output head (PEFT's
    ``"all-linear"`` leaves the head out, and the head is where token-level preferences are cheapest to learn)."""
    if spec != "all-linear+head":
        return spec
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


class LoRABank(ExpertBank):
    """K LoRA adapters ``expert_0..expert_{K-1}`` on one causal LM; reference = adapters disabled, or a
    per-expert reference adapter (``reference_adapters[k]``: a PEFT adapter folder, frozen).

    ``batched``: "auto" runs the experts' rows in one grouped pass where :func:`grouped_support` allows and K > 1
    (else expert after expert; ``grouped_reason`` says why), True requires it, False never."""

    def __init__(
        self,
        model,
        num_experts: int,
        *,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules="all-linear+head",
        layers_to_transform: list[int] | None = None,
        init_std: float = 0.02,
        seed: int = 0,
        reference_adapters: list[str] | None = None,
        autocast_dtype: torch.dtype | None = None,
        reuse_graph: bool = False,
        batched: bool | str = "auto",
    ):
        from peft import LoraConfig, get_peft_model

        super().__init__(autocast_dtype, reuse_graph)
        self.num_experts = num_experts
        self.names = [f"expert_{k}" for k in range(num_experts)]
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=resolve_target_modules(model, target_modules),
            layers_to_transform=layers_to_transform,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, config, adapter_name=self.names[0])
        for name in self.names[1:]:
            self.model.add_adapter(name, config)
        _distinct_lora_init(self.model, self.names, init_std, seed)
        self.refresh_parameters()
        self.reference_names = None
        if reference_adapters:
            if len(reference_adapters) != num_experts:
                raise ValueError(
                    f"reference_adapters: expected {num_experts} paths (one per expert), got {len(reference_adapters)}"
                )
            self.reference_names = [f"ref_{k}" for k in range(num_experts)]
            for name, path in zip(self.reference_names, reference_adapters):
                self.model.load_adapter(path, adapter_name=name, is_trainable=False)
        self.device = next(self.model.parameters()).device
        if not batched:
            reason = "experts.batched=false"
        elif num_experts == 1:
            reason = "one expert (PEFT's own forward)"  # also under batched=true (num_experts=auto fits K=1)
        else:
            reason = grouped_support(self.model, self.names)
            if batched is True and reason:
                raise ValueError(f"experts.batched=true: the experts cannot run in one pass here: {reason}")
        self.grouped_reason, self.grouped = reason, reason is None

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self._trainable

    def refresh_parameters(self) -> None:
        """The experts' adapter weights, read from the model (again after FSDP2 replaced them by sharded ones)."""
        self._trainable = {n: p for n, p in self.model.named_parameters() if any(f".{a}." in n for a in self.names)}
        for param in self._trainable.values():
            param.requires_grad_(True)

    def decoder_layers(self) -> list[nn.Module]:
        """The base's decoder layers, with their adapters: what ``train.parallel=fsdp`` shards."""
        try:
            return list(decoder_stack(self.model)[1])
        except ValueError:  # decoder_stack's message is heads mode's
            name = type(self.model.get_base_model()).__name__
            raise ValueError(
                f"train.parallel=fsdp shards a decoder's `layers` ModuleList; {name} has none (use train.parallel=ddp)"
            ) from None

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _logps(self, batch, **kwargs):
        return sequence_logps(
            self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kwargs
        )

    def grouped_logps(self, batch, rows, experts):
        return grouped_sequence_logps(
            self.model,
            self.names,
            experts,
            *(batch[key][rows] for key in ("input_ids", "attention_mask", "completion_mask")),
        )

    def activate(self, k: int) -> None:
        """Route the model through expert k's adapter."""
        self.model.set_adapter(self.names[k])
        for param in self._trainable.values():  # set_adapter freezes the others; they stay in the optimizer
            param.requires_grad_(True)

    def expert_logps(self, k: int, batch: dict) -> torch.Tensor:
        self.activate(k)
        return self._logps(batch)

    def reference_pass(self, batch):
        with self.model.disable_adapter():
            logps, hidden = self._logps(batch, return_hidden=True)
        features = pooled_features(hidden, batch["attention_mask"], batch["completion_mask"])
        if self.reference_names is not None:
            per_expert = []
            for name in self.reference_names:
                self.model.set_adapter(name)
                per_expert.append(self._logps(batch))
            logps = torch.stack(per_expert, -1)  # (2B, K)
        return logps, features

    def save_experts(self, directory, state_dict: dict | None = None) -> None:
        """One standard PEFT adapter folder per expert: ``directory/expert_<k>``; ``state_dict``: the adapters'
        whole tensors by parameter name, where the model holds shards (fsdp)."""
        # LoRA on the output head leaves the base head untouched: do not copy it into every adapter folder
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        self.model.save_pretrained(str(directory), selected_adapters=self.names, save_embedding_layers=False, **extra)
