"""Expert banks: K policies that turn a collated batch into per-expert margins h (B, K).

All banks share one protocol, used by the EM loop's ``forward``:

- :meth:`ExpertBank.margins` — h (B, K) without a graph (all experts, no activations kept), plus the
  reference log-probs (computed once per example and cached) and pooled prompt features of the frozen base;
- :meth:`ExpertBank.push` — given d loss / d h (B, K), runs each expert's forward and backward in turn (only on
  the pairs with a non-zero gradient: sparse routing skips work), so memory does not grow with K.

Modes: :class:`LoRABank` (K PEFT LoRA adapters on one base), :class:`HeadsBank` (shared frozen trunk run once
per batch; each expert owns LoRA on the top layers), :class:`IndependentBank` (K full models).
"""

from __future__ import annotations

import contextlib

import torch

from moedpo.experts.logprobs import pooled_prompt_features, sequence_logps
from moedpo.losses.dpo import margins as dpo_margins


def select_pairs(batch: dict, rows: torch.Tensor) -> dict:
    """The sub-batch of pairs ``rows`` (B',) from a [chosen; rejected] batch."""
    num_pairs = batch["index"].shape[0]
    both = torch.cat([rows, rows + num_pairs])
    out = {}
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask", "completion_mask"):
            out[key] = value[both]
        elif isinstance(value, torch.Tensor) and value.shape[:1] == (num_pairs,):
            out[key] = value[rows]
        elif isinstance(value, list) and len(value) == num_pairs:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


class ExpertBank:
    """Shared logic; subclasses implement ``expert_logps(k, batch)`` and ``reference_pass(batch)``."""

    num_experts: int
    device: torch.device

    def __init__(self, autocast_dtype: torch.dtype | None = None):
        self.autocast_dtype = autocast_dtype
        self._ref_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._feature_cache: dict[int, torch.Tensor] = {}

    # -- subclasses ---------------------------------------------------------------------------------------------
    def expert_logps(self, k: int, batch: dict) -> torch.Tensor:
        """Sequence log-probs (2B,) of expert k on the [chosen; rejected] batch (with a graph if grad is on)."""
        raise NotImplementedError

    def reference_pass(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (2B,) or (2B, K) and pooled prompt features (2B, D) of the frozen base."""
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @torch.no_grad()
    def reference(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ref_chosen_logps, ref_rejected_logps) (B,) or (B, K), and prompt features (B, D); cached per example."""
        index = batch["index"].tolist()
        if any(i not in self._ref_cache for i in index):
            with self.autocast():
                logps, features = self.reference_pass(batch)
            chosen, rejected = logps.float().chunk(2)
            for j, i in enumerate(index):
                self._ref_cache[i] = (chosen[j], rejected[j])
                self._feature_cache[i] = features[j]  # chosen half: the prompt's features
        chosen = torch.stack([self._ref_cache[i][0] for i in index])
        rejected = torch.stack([self._ref_cache[i][1] for i in index])
        return chosen, rejected, torch.stack([self._feature_cache[i] for i in index])

    @torch.no_grad()
    def margins(self, batch: dict) -> dict:
        """h (B, K) and the log-probs behind it, with no graph: {"h", "chosen_logps", "rejected_logps", ...}."""
        batch = self.to_device(batch)
        ref_chosen, ref_rejected, features = self.reference(batch)
        with self.autocast():
            logps = torch.stack([self.expert_logps(k, batch).float() for k in range(self.num_experts)], -1)
        chosen, rejected = logps.chunk(2)  # (B, K) each
        h = dpo_margins(chosen, rejected, ref_chosen, ref_rejected)
        return {
            "h": h,
            "chosen_logps": chosen,
            "rejected_logps": rejected,
            "ref_chosen_logps": ref_chosen,
            "ref_rejected_logps": ref_rejected,
            "features": features,
        }

    def push(self, batch: dict, grad_h: torch.Tensor) -> None:
        """Backpropagate d loss / d h (B, K) into the experts, one expert's forward+backward at a time."""
        batch = self.to_device(batch)
        ref_chosen, ref_rejected, _ = self.reference(batch)
        for k in range(self.num_experts):
            rows = torch.nonzero(grad_h[:, k]).squeeze(-1)
            if rows.numel() == 0:
                continue  # sparse routing: expert k got no pair
            sub = batch if rows.numel() == grad_h.shape[0] else select_pairs(batch, rows)
            with self.autocast():
                chosen, rejected = self.expert_logps(k, sub).float().chunk(2)
            rc = ref_chosen[rows] if ref_chosen.dim() == 1 else ref_chosen[rows, k]
            rr = ref_rejected[rows] if ref_rejected.dim() == 1 else ref_rejected[rows, k]
            h_k = (chosen - rc) - (rejected - rr)
            h_k.backward(grad_h[rows, k].to(h_k.dtype))


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
    per-expert reference adapter (``reference_adapters[k]``: a PEFT adapter folder, frozen)."""

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
    ):
        from peft import LoraConfig, get_peft_model

        super().__init__(autocast_dtype)
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
        self._trainable = {n: p for n, p in self.model.named_parameters() if any(f".{a}." in n for a in self.names)}
        for param in self._trainable.values():
            param.requires_grad_(True)
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

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self._trainable

    def _logps(self, batch, **kwargs):
        return sequence_logps(
            self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kwargs
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
            logps, outputs = self._logps(batch, return_outputs=True, output_hidden_states=True)
        features = pooled_prompt_features(outputs.hidden_states[-1], batch["attention_mask"], batch["completion_mask"])
        if self.reference_names is not None:
            per_expert = []
            for name in self.reference_names:
                self.model.set_adapter(name)
                per_expert.append(self._logps(batch))
            logps = torch.stack(per_expert, -1)  # (2B, K)
        return logps, features

    def save_experts(self, directory) -> None:
        """One standard PEFT adapter folder per expert: ``directory/expert_<k>``."""
        # LoRA on the output head leaves the base head untouched: do not copy it into every adapter folder
        self.model.save_pretrained(str(directory), selected_adapters=self.names, save_embedding_layers=False)
