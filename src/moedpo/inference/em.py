"""The variational EM loop (Mix-/MoE-DPO, arXiv 2510.08256, Alg. 1): one readable ``step()``.

``VariationalEM`` never sees an LLM. It talks to two objects:

- ``experts.margins(batch)``: the experts' margins, either a tensor h (B, K) with a graph to the experts, or a
  dict with ``chosen_logps`` / ``rejected_logps`` (B, K), the reference log-probs (B,) or (B, K) and optionally
  ``chosen_lengths`` / ``rejected_lengths`` (B,). Without a graph, ``experts.backward(batch, d_chosen,
  d_rejected)`` pushes d loss / d log-probs into the experts (one expert at a time, so memory does not grow
  with K); ``experts.num_experts`` is K.
- ``gate(batch, margins)``: the gate's logits, (B, K) in pair scope, (U, K) in user scope, or a tuple
  (logits, extra keyword arguments for the latent model, e.g. ``user_index``).

Schedules (each M-step objective is a sum over pairs, divided by the *global* number of pairs of the step, and
gradients are summed over processes: any split of a batch into processes or accumulation steps, even or not,
gives the update of one big batch):

- ``em``: exact E-step (:func:`~moedpo.inference.estep.posterior`), then ``m_steps`` updates of
  -E_q[log p(obs, z)] with q fixed: weighted DPO for the experts, cross-entropy to q for the gate. With
  ``loss_type`` ipo / hinge / robust the experts' term is the q-weighted TRL loss instead.
- ``svi``: gradient of the exact marginal likelihood (no guide) or of a guide's ELBO.
- ``gumbel``: one exact posterior draw of z (the forward of a straight-through Gumbel-Softmax at any
  temperature), then -log p(obs, z): only the drawn experts get a gradient (sparse top-1 updates).
"""

from __future__ import annotations

import torch

from moedpo.inference.estep import EStep, e_step, plate_nesting
from moedpo.inference.margins import (
    as_dict,
    detached,
    gate_output,
    loss_margins,
    margins_with_leaves,
    num_pairs,
)
from moedpo.inference.metrics import step_record, summarise
from moedpo.inference.objectives import em_loss, marginal_loss, sampled_loss
from moedpo.losses.anticollapse import load_balance_loss, usage_entropy_penalty
from moedpo.losses.dpo import LOSS_TYPES, dpo_loss, log_likelihood
from moedpo.models.bt import mixture_bt_model
from moedpo.models.gates import FixedGate

SCHEDULES = ("em", "svi", "gumbel")


class VariationalEM:
    """Fit experts and gate by variational EM; ``step(*micro_batches)`` returns the mean per-pair loss."""

    def __init__(
        self,
        experts,
        gate,
        optimizer: torch.optim.Optimizer,
        *,
        beta: float,
        model=mixture_bt_model,
        schedule: str = "em",
        guide=None,
        max_plate_nesting: int | None = None,
        m_steps: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        closed_form_gate: FixedGate | None = None,
        gate_momentum: float = 0.0,
        load_balance: float = 0.0,
        usage_entropy: float = 0.0,
        clip_grad_norm: float | None = None,
        lr_scheduler=None,
        sync=None,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
        if loss_type != "sigmoid" and schedule != "em":
            raise ValueError(f"loss_type={loss_type!r} needs schedule='em' (the q-weighted TRL loss)")
        if m_steps < 1:
            raise ValueError(f"m_steps must be >= 1, got {m_steps}")
        self.experts, self.gate, self.optimizer, self.beta = experts, gate, optimizer, beta
        self.model, self.schedule, self.guide = model, schedule, guide
        self.max_plate_nesting = plate_nesting(model, max_plate_nesting)
        self.m_steps, self.loss_type, self.label_smoothing = m_steps, loss_type, label_smoothing
        self.closed_form_gate, self.gate_momentum = closed_form_gate, gate_momentum
        self.load_balance, self.usage_entropy = load_balance, usage_entropy
        self.clip_grad_norm, self.lr_scheduler = clip_grad_norm, lr_scheduler
        self.sync = sync  # moedpo.distributed.DataParallel: sums across processes (None: one process)
        self.num_steps = 0
        self.metrics: dict[str, float] = {}

    # -- one optimisation step: read this first ------------------------------------------------------------
    def step(self, *micro_batches) -> float:
        """margins -> gate -> E-step -> M-step -> expert update -> optimizer (x m_steps) -> gate -> schedule."""
        batches = [b for b in micro_batches if b is not None and num_pairs(b) > 0]  # empty shards: no work
        total = self._global_sum(sum(num_pairs(b) for b in batches))
        if total == 0:
            raise ValueError("the global batch has no pairs")
        e_steps: list[EStep | None] = [None] * len(batches)
        records = []
        for update in range(self.m_steps):
            self.optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(batches):
                out = as_dict(self.experts.margins(batch))  # margins (B, K)
                h, leaves = margins_with_leaves(out)
                gate_logits, extra = gate_output(self.gate(batch, out))  # gate
                args = (h, gate_logits, self.beta, torch.ones(h.shape[0], dtype=h.dtype, device=h.device))
                kwargs = {"label_smoothing": self.label_smoothing, **extra}
                if e_steps[i] is None:
                    e_steps[i] = self.e_step(args, kwargs)  # E-step (once; reused by later M-steps)
                loss = self.m_step_loss(e_steps[i], out, args, kwargs)  # M-step: a sum over the pairs
                (loss / total).backward()
                if leaves:  # expert update: margins came without a graph; the experts backpropagate
                    self.experts.backward(batch, *(leaf.grad for leaf in leaves))
                if update == 0:
                    records.append(self._record(e_steps[i], detached(out), h.detach(), gate_logits))
            self.apply_gradients()  # optimizer
        self.update_gate([e.gate_q for e in e_steps])  # closed-form Mix-DPO proportions
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()  # schedule: once per EM step, whatever m_steps is
        self.num_steps += 1
        self.metrics = {
            "loss": self._global_sum(sum(r["loss"] for r in records)) / total,
            **({"grad_norm": self.grad_norm} if self.clip_grad_norm is not None else {}),
            **summarise(records),  # this process's micro-batches
        }
        if self.loss_type != "sigmoid":
            self.metrics["em/marginal_nll"] = self._global_sum(sum(r["em/marginal_nll"] for r in records)) / total
        return self.metrics["loss"]

    # -- the pieces ----------------------------------------------------------------------------------------------
    def e_step(self, args, kwargs) -> EStep:
        return e_step(
            self.model, args, kwargs, self.beta, self.label_smoothing, self.max_plate_nesting, self.schedule == "gumbel"
        )

    def m_step_loss(self, e: EStep, out: dict, args, kwargs) -> torch.Tensor:
        """The schedule's objective for one micro-batch, summed over its pairs."""
        nesting = self.max_plate_nesting
        if self.schedule == "em":
            loss, _ = em_loss(self.model, *args, max_plate_nesting=nesting, post=e.post, **kwargs)
        elif self.schedule == "svi":
            loss = marginal_loss(self.model, self.guide, *args, max_plate_nesting=nesting, **kwargs)
        else:
            loss = sampled_loss(self.model, e.draw, *args, max_plate_nesting=nesting, **kwargs)
        if self.loss_type != "sigmoid":  # swap the BT term of the experts for the q-weighted TRL loss
            h = args[0]
            loss = loss + self._loss_type_shift(e, out, h)
        gate_logits, num_pairs = args[1], args[0].shape[0]
        if self.load_balance:
            loss = loss + num_pairs * self.load_balance * load_balance_loss(gate_logits)
        if self.usage_entropy:
            loss = loss + num_pairs * self.usage_entropy * usage_entropy_penalty(gate_logits)
        return loss

    def _loss_type_shift(self, e: EStep, out: dict, h: torch.Tensor) -> torch.Tensor:
        """sum_ik r_ik [loss_type(h_ik) + log sigmoid(beta h_ik)]: added to -E_q[log p], it replaces the experts'
        Bradley-Terry term by the q-weighted TRL loss (K = 1: exactly TRL's loss)."""
        expert_loss = dpo_loss(loss_margins(out, h, self.loss_type), self.beta, self.loss_type, self.label_smoothing)
        return (e.pair_q * (expert_loss + log_likelihood(h, self.beta, self.label_smoothing))).sum()

    def _record(self, e: EStep, out: dict, h: torch.Tensor, gate_logits: torch.Tensor) -> dict:
        shift = float(self._loss_type_shift(e, out, h)) if self.loss_type != "sigmoid" else 0.0
        return step_record(e, out, h, gate_logits, self.beta, shift)

    def apply_gradients(self) -> None:
        """Sum gradients over processes, clip, step the optimizer."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.sync is not None:
            self.sync.sum_gradients(params)
        if self.clip_grad_norm is not None:
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
        self.optimizer.step()

    def update_gate(self, gate_qs: list[torch.Tensor]) -> None:
        """Closed-form Mix-DPO gate M-step: w <- momentum * w + (1 - momentum) * mean over latent units of q."""
        if self.closed_form_gate is None:
            return
        logits = self.closed_form_gate.logits
        with torch.no_grad():
            total = sum((q.reshape(-1, q.shape[-1]).sum(0).to(logits) for q in gate_qs), torch.zeros_like(logits))
            count = torch.tensor(float(sum(q.reshape(-1, q.shape[-1]).shape[0] for q in gate_qs)), device=logits.device)
            if self.sync is not None:  # the mean over every process's latent units
                total, count = self.sync.sum(total), self.sync.sum(count)
            target = total / count
            if self.gate_momentum:
                target = self.gate_momentum * torch.softmax(logits, -1) + (1 - self.gate_momentum) * target
            self.closed_form_gate.set_proportions(target.unsqueeze(0))

    def _global_sum(self, value: float) -> float:
        if self.sync is None:
            return float(value)
        return float(self.sync.sum(torch.tensor(float(value), dtype=torch.float64)))
