"""The variational EM loop (Mix-/MoE-DPO, arXiv 2510.08256, Alg. 1), one readable ``step()``.

``VariationalEM`` never sees an LLM. It takes ``forward(batch) -> dict`` that returns

- ``"h"``: expert margins (B, K) (with a graph to the experts, or detached plus a ``"backward"`` callable
  that pushes d loss / d h into the experts one expert at a time, so memory does not grow with K);
- ``"gate_logits"``: (B, K) in pair scope, (U, K) in user scope;
- any other entries: keyword arguments for the latent model and guide (``user_index``, ``features``...).

Schedules:

- ``em``: E-step exact posterior q (Pyro enumeration), M-step -E_q[log p(y, z)]: weighted DPO on the
  experts (q detached) plus the gate's cross-entropy to q; ``m_steps`` updates reuse one E-step, and a
  :class:`~moedpo.models.FixedGate` may take the closed-form update w = mean q.
- ``svi``: gradient of the exact marginal likelihood (no guide) or of an amortized guide's ELBO.
- ``gumbel``: Monte Carlo ELBO with straight-through Gumbel-Softmax z (sparse: only the sampled expert gets a
  gradient) and an annealed temperature; q is the guide's (``"guide_logits"``) or the exact posterior.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from moedpo.inference.estep import marginal_nll, plate_nesting, posterior_marginals
from moedpo.inference.objectives import em_loss, marginal_loss, relaxed_loss
from moedpo.losses.anticollapse import load_balance_loss, usage_entropy_penalty
from moedpo.models.bt import mixture_bt_model, relaxed_bt_model
from moedpo.models.gates import FixedGate
from moedpo.models.guides import RelaxedGuide

SCHEDULES = ("em", "svi", "gumbel")


def anneal_temperature(step: int, start: float, end: float, steps: int) -> float:
    """Geometric annealing from ``start`` to ``end`` over ``steps`` steps, constant afterwards."""
    if steps <= 0 or step >= steps:
        return end
    return start * math.exp(step / steps * math.log(end / start))


class VariationalEM:
    """Fit experts and gate by variational EM; ``step(batch)`` returns the mean per-pair loss as a float."""

    def __init__(
        self,
        forward: Callable[[Any], Mapping[str, Any]],
        optimizer: torch.optim.Optimizer,
        *,
        beta: float,
        model=mixture_bt_model,
        schedule: str = "em",
        guide=None,
        max_plate_nesting: int | None = None,
        m_steps: int = 1,
        closed_form_gate: FixedGate | None = None,
        gate_momentum: float = 0.0,
        relaxed_model=relaxed_bt_model,
        straight_through: bool = True,
        temperature: tuple[float, float, int] = (1.0, 0.1, 1000),
        load_balance: float = 0.0,
        usage_entropy: float = 0.0,
        label_smoothing: float = 0.0,
        clip_grad_norm: float | None = None,
        lr_scheduler=None,
        sync=None,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        self.forward, self.optimizer, self.beta = forward, optimizer, beta
        self.model, self.schedule, self.guide = model, schedule, guide
        self.max_plate_nesting = plate_nesting(model, max_plate_nesting)
        self.m_steps, self.closed_form_gate, self.gate_momentum = m_steps, closed_form_gate, gate_momentum
        self.relaxed_model, self.relaxed_guide = relaxed_model, RelaxedGuide(straight_through)
        self.temperature = temperature
        self.load_balance, self.usage_entropy = load_balance, usage_entropy
        self.label_smoothing, self.clip_grad_norm, self.lr_scheduler = label_smoothing, clip_grad_norm, lr_scheduler
        self.sync = sync  # moedpo.distributed.DataParallel: sums across processes (None: one process)
        self.num_steps = 0
        self.metrics: dict[str, float] = {}

    # -- one batch -------------------------------------------------------------------------------------------
    def backward(self, batch, loss_scale: float = 1.0, marginals: dict | None = None) -> dict:
        """Forward, objective and backward for one (micro-)batch; gradients accumulate. Returns its E-step."""
        out = dict(self.forward(batch))
        h, gate_logits, push = out.pop("h"), out.pop("gate_logits"), out.pop("backward", None)
        if push is not None:
            h = h.detach().requires_grad_(True)
        obs = out.pop("obs", None)
        obs = torch.ones(h.shape[0], dtype=h.dtype, device=h.device) if obs is None else obs
        args, kwargs = (h, gate_logits, self.beta, obs), {"label_smoothing": self.label_smoothing, **out}
        loss, marginals = self._objective(args, kwargs, marginals)
        num_pairs = h.shape[0]
        total = loss / num_pairs
        if self.load_balance:
            total = total + self.load_balance * load_balance_loss(gate_logits)
        if self.usage_entropy:
            total = total + self.usage_entropy * usage_entropy_penalty(gate_logits)
        (total * loss_scale).backward()
        if push is not None:
            push(h.grad)
        self._record(loss.detach() / num_pairs, marginals, gate_logits.detach(), args, kwargs)
        return marginals

    def _objective(self, args, kwargs, marginals):
        nesting = self.max_plate_nesting
        if self.schedule == "em":
            return em_loss(self.model, *args, max_plate_nesting=nesting, marginals=marginals, **kwargs)
        posterior = posterior_marginals(self.model, *args, max_plate_nesting=nesting, **kwargs)
        if self.schedule == "svi":
            return marginal_loss(self.model, self.guide, *args, max_plate_nesting=nesting, **kwargs), posterior
        tau = anneal_temperature(self.num_steps, *self.temperature)
        if "guide_logits" not in kwargs:
            num_experts = args[0].shape[-1]
            kwargs = {**kwargs, "guide_logits": posterior["z"].clamp_min(1e-30).log().reshape(-1, num_experts)}
        loss = relaxed_loss(self.relaxed_model, self.relaxed_guide, *args, temperature=tau, **kwargs)
        return loss, posterior

    def _record(self, loss, marginals, gate_logits, args, kwargs):
        q = marginals["z"].reshape(-1, marginals["z"].shape[-1])  # (units, K)
        entropy = -(torch.special.xlogy(q, q)).sum(-1).mean()
        if self.schedule == "em" or (self.schedule == "svi" and self.guide is None):
            nll = float(loss)  # the loss at the exact posterior is the marginal NLL
        else:
            nll = marginal_nll(self.model, *args, max_plate_nesting=self.max_plate_nesting, **kwargs)
            nll /= args[0].shape[0]
        usage = torch.softmax(gate_logits.reshape(-1, gate_logits.shape[-1]), -1).mean(0)
        self.metrics = {"loss": float(loss), "em/marginal_nll": nll, "em/elbo": -float(loss)}
        self.metrics["em/responsibility_entropy"] = float(entropy)
        self.metrics.update({f"em/expert_usage_{k}": float(v) for k, v in enumerate(q.mean(0))})
        self.metrics.update({f"gate/usage_{k}": float(v) for k, v in enumerate(usage)})
        self._last_q = q

    # -- one optimisation step -----------------------------------------------------------------------------
    def step(self, *micro_batches) -> float:
        """One E-step and ``m_steps`` M-step updates; several micro-batches accumulate into one update.

        Returns the mean per-pair loss (averaged over micro-batches); ``self.metrics`` holds the rest.
        """
        marginals = [None] * len(micro_batches)
        for _ in range(self.m_steps):
            self.optimizer.zero_grad(set_to_none=True)
            records, qs = [], []
            for i, batch in enumerate(micro_batches):
                reuse = marginals[i] if self.schedule == "em" else None
                marginals[i] = self.backward(batch, loss_scale=1 / len(micro_batches), marginals=reuse)
                records.append(self.metrics)
                qs.append(self._last_q)
            self.metrics = {k: sum(r[k] for r in records) / len(records) for k in records[0]}
            self.apply_gradients()
        self.update_gate(torch.cat(qs))
        self.num_steps += 1
        return self.metrics["loss"]

    def apply_gradients(self) -> None:
        """Average gradients over processes, clip, step the optimizer and the learning-rate schedule."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.sync is not None:
            self.sync.average_gradients(params)
        if self.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            self.metrics["grad_norm"] = float(grad_norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def update_gate(self, q: torch.Tensor) -> None:
        """Closed-form Mix-DPO gate M-step: w <- momentum * w + (1 - momentum) * mean q."""
        if self.closed_form_gate is None:
            return
        with torch.no_grad():
            total, count = q.sum(0, keepdim=True), torch.tensor(float(q.shape[0]), device=q.device)
            if self.sync is not None:  # the mean over every process's latent units
                total, count = self.sync.sum(total), self.sync.sum(count)
            target = total / count
            if self.gate_momentum:
                old = torch.softmax(self.closed_form_gate.logits, -1)
                target = self.gate_momentum * old + (1 - self.gate_momentum) * target
            self.closed_form_gate.set_proportions(target)
