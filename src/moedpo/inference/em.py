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
gives the update of one big batch; the anti-collapse penalties, functions of the step's mean gate, enter as each
micro-batch's exact share, :mod:`~moedpo.inference.penalties`):

- ``em``: exact E-step (:func:`~moedpo.inference.estep.posterior`), then ``m_steps`` updates of
  -E_q[log p(obs, z)] with q fixed: weighted DPO for the experts, cross-entropy to q for the gate. With
  ``loss_type`` ipo / hinge / robust the experts' term is the q-weighted TRL loss instead.
- ``svi``: gradient of the exact marginal likelihood (no guide) or of a guide's ELBO.
- ``gumbel``: one exact posterior draw of z (the forward of a straight-through Gumbel-Softmax at any
  temperature), then -log p(obs, z): only the drawn experts get a gradient (sparse top-1 updates).
- ``routed``: sparse updates routed by the guide, with no E-step over K: z ~ q_phi from features that cost no
  expert forward (``experts.reference(batch)``, which must give ``guide_features``), then only expert z runs,
  forward and backward (``experts.margins(batch, route=z)``). The guide learns by a score-function estimator
  with a decaying-average baseline (:func:`~moedpo.inference.objectives.routed_loss`). The first ``exact_warmup``
  steps and every ``exact_every``-th step (0: never) are dense ``em`` steps instead: the warm-up lets the experts
  separate before a guide routes them (routing from a symmetric start let one expert take every annotator in
  heads mode), the periodic ones keep the guide honest and log its KL.

With a ``guide`` under ``em``, ``gumbel`` and ``routed``'s exact steps, the guide is trained alongside on its
enumerated ELBO with the margins and the gate held fixed (minimising KL(q_phi || exact posterior)), and
``guide/kl`` = log p(obs) - ELBO(q_phi), per latent unit, is logged; under ``svi`` the guide's ELBO trains
everything.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from moedpo.inference.clipping import clip_grad_norm
from moedpo.inference.draws import KeyedSampling, UnitDraws, posterior_draw
from moedpo.inference.estep import EStep, e_step, plate_nesting, posterior
from moedpo.inference.margins import (
    as_dict,
    detached,
    gate_output,
    loss_margins,
    margins_with_leaves,
    num_pairs,
    observations,
)
from moedpo.inference.metrics import routed_record, step_record, summarise
from moedpo.inference.objectives import (
    SignalBaseline,
    draw_from_guide,
    em_loss,
    forward_kl,
    guide_fit_loss,
    latent_site,
    marginal_loss,
    routed_loss,
    sampled_loss,
)
from moedpo.inference.penalties import GatePenalty, gate_penalty
from moedpo.inference.start import Start
from moedpo.losses.dpo import LOSS_TYPES, dpo_loss, log_likelihood
from moedpo.models.bt import first_pairs, mixture_bt_model
from moedpo.models.gates import FixedGate

SCHEDULES = ("em", "svi", "gumbel", "routed")


def unit_keys(batch, extra: dict, num_units: int) -> tuple[list | None, torch.Tensor]:
    """Ids of a batch's latent units (annotator ids in user scope, example indices in pair scope; None when the
    batch carries neither) and their numbers of pairs (units,)."""
    if "user_index" in extra:
        local = extra["user_index"].cpu()
        counts = torch.bincount(local, minlength=num_units)
        users = batch.get("user") if isinstance(batch, dict) else getattr(batch, "user", None)
        if users is None:
            return None, counts
        return [("user", int(users[i])) for i in first_pairs(local, num_units).tolist()], counts
    index = batch.get("index") if isinstance(batch, dict) else None
    keys = None if index is None else [("pair", int(i)) for i in index.tolist()]
    return keys, torch.ones(num_units, dtype=torch.long)


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
        exact_every: int = 0,
        exact_warmup: int = 0,
        baseline_decay: float = 0.8,
        start: Start | None = None,
        seed: int = 0,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
        if loss_type != "sigmoid" and schedule != "em":
            raise ValueError(f"loss_type={loss_type!r} needs schedule='em' (the q-weighted TRL loss)")
        if m_steps < 1:
            raise ValueError(f"m_steps must be >= 1, got {m_steps}")
        if schedule == "routed" and guide is None:
            raise ValueError("schedule='routed' draws z from a guide: pass guide= (e.g. an AmortizedGuide)")
        self.experts, self.gate, self.optimizer, self.beta = experts, gate, optimizer, beta
        self.model, self.schedule, self.guide = model, schedule, guide
        self.max_plate_nesting = plate_nesting(model, max_plate_nesting)
        self.m_steps, self.loss_type, self.label_smoothing = m_steps, loss_type, label_smoothing
        self.closed_form_gate, self.gate_momentum = closed_form_gate, gate_momentum
        self.load_balance, self.usage_entropy = load_balance, usage_entropy
        self.clip_grad_norm, self.lr_scheduler = clip_grad_norm, lr_scheduler
        self.sync = sync  # moedpo.distributed.DataParallel: sums across processes (None: one process)
        self.exact_every, self.exact_warmup = exact_every, exact_warmup
        self.baseline = SignalBaseline(baseline_decay)  # routed: the score-function term's baselines
        self.start = start  # a start from the data: the prior of the first E-steps (moedpo.inference.start)
        self.draws = UnitDraws(seed)  # gumbel / routed / subset draws: per unit, the same on any process split
        self.num_steps = 0
        self.draw_index = 0  # num_steps * m_steps + the update within the step: the unit draws' key
        self.metrics: dict[str, float] = {}

    # -- one optimisation step: read this first ------------------------------------------------------------
    def step(self, *micro_batches) -> float:
        """margins -> gate -> E-step -> M-step -> expert update -> optimizer (x m_steps) -> gate -> schedule.

        (``routed``: guide features -> gate -> z ~ guide -> the drawn experts' margins -> ELBO -> their update.)"""
        counts = [num_pairs(b) if b is not None else 0 for b in micro_batches]
        positions = [i for i, count in enumerate(counts) if count > 0]
        batches = [micro_batches[i] for i in positions]  # empty shards: no work
        total = self._global_sum(sum(counts))
        if total == 0:
            raise ValueError("the global batch has no pairs")
        idle = self._idle_slots(counts)  # lockstep: where this process mirrors the others' passes
        mine = {p: i for i, p in enumerate(positions)}
        work = [mine.get(p) for p in sorted([*positions, *idle])]  # batches' indices in order, None: idle here
        exact = self.num_steps < self.exact_warmup or (self.exact_every and self.num_steps % self.exact_every == 0)
        routed = self.schedule == "routed" and not exact
        e_steps: list = [None] * len(batches)
        records, signals = [], []
        if self.sync is not None:
            self.sync.watch(p for group in self.optimizer.param_groups for p in group["params"])
        for update in range(self.m_steps):
            self.draw_index = self.num_steps * self.m_steps + update  # keys each update's draws
            self.optimizer.zero_grad(set_to_none=True)
            penalty = None if routed else self.gate_penalty(batches)  # anti-collapse: the whole step's mean gate
            for i in work:
                if i is None:
                    self.experts.idle(routed)
                    continue
                batch = batches[i]
                if routed:
                    record, e_steps[i], signal = self.routed_update(batch, total)
                    signals.append((update, positions[i], *signal))
                else:
                    record, e_steps[i] = self.dense_update(batch, e_steps[i], total, penalty)
                if update == 0:
                    records.append(record)
            self.apply_gradients()  # optimizer
        if routed:
            self.update_baseline(signals)
        else:  # from exact posteriors only: a guide's noisy q would random-walk the proportions
            self.update_gate([e.gate_q for e in e_steps])  # closed-form Mix-DPO proportions
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()  # schedule: once per EM step, whatever m_steps is
        self.num_steps += 1
        self.metrics = {
            "loss": self._global_sum(sum(r["loss"] for r in records)) / total,
            **({"grad_norm": self.grad_norm} if self.clip_grad_norm is not None else {}),
            **summarise([r for part in self._gather(records) for r in part]),  # every process's micro-batches
        }
        if self.loss_type != "sigmoid":
            self.metrics["em/marginal_nll"] = self._global_sum(sum(r["em/marginal_nll"] for r in records)) / total
        if self.schedule == "routed":
            self.metrics["em/exact_step"] = float(not routed)
        return self.metrics["loss"]

    def dense_update(
        self, batch, e: EStep | None, total: float, penalty: GatePenalty | None = None
    ) -> tuple[dict, EStep]:
        """Every expert's margins, the exact E-step (``e`` reused across M-steps) and the M-step gradients, with
        this micro-batch's share of the step's anti-collapse ``penalty``."""
        out = as_dict(self.experts.margins(batch))  # margins (B, K); rankings: (B, M, K)
        h, leaves = margins_with_leaves(out)
        gate_logits, extra = gate_output(self.gate(batch, out))  # gate
        obs, observed = observations(out, h)
        self._check_rankings(out)
        args = (h, gate_logits, self.beta, obs)
        kwargs = {"label_smoothing": self.label_smoothing, **observed, **extra, **self._guide_inputs(out)}
        keys, _ = unit_keys(batch, extra, gate_logits.shape[0])
        if e is None:
            e = self.e_step(self._started(args, keys), kwargs, keys)  # E-step (once; reused by later M-steps)
        loss = self.m_step_loss(e, out, args, kwargs)  # M-step: a sum over the pairs
        guide_elbo = None
        if self.guide is not None:  # the guide follows the exact posterior
            detached_args = (h.detach(), gate_logits.detach(), *args[2:])
            nesting = self.max_plate_nesting
            if self.schedule == "svi":  # the ELBO already trains the guide: add the KL(p || q) half only
                guide_loss, guide_elbo = forward_kl(self.guide, e.post, *detached_args, **kwargs), -loss.detach()
            else:
                guide_loss, guide_elbo = guide_fit_loss(
                    self.model, self.guide, e.post, *detached_args, max_plate_nesting=nesting, **kwargs
                )
            if self.schedule in ("em", "gumbel"):
                guide_loss = guide_loss + self._guide_on_subsets(detached_args, kwargs, batch, keys)
            loss = loss + guide_loss
        if penalty is not None:  # scaled like the sums over pairs: one batch gives weight * Phi(P_bar)
            loss = loss + total * penalty.share(gate_logits)
        (loss / total).backward()
        if leaves:  # expert update: margins came without a graph; the experts backpropagate
            self.experts.backward(batch, *(leaf.grad for leaf in leaves))
        record = self._record(e, detached(out), h.detach(), gate_logits)
        if guide_elbo is not None:
            record["guide/kl"] = float(e.post.log_evidence - guide_elbo)
        return record, e

    def _guide_on_subsets(self, args, kwargs, batch, keys: list | None) -> torch.Tensor | float:
        """User scope: also fit the guide to the exact posterior of a random subset of each annotator's pairs
        (each pair kept with a per-annotator probability drawn uniformly, at least one kept), so that q(z_u | D_u)
        is right for annotators with few pairs too (new users personalised from k pairs), not only for the
        sizes training batches happen to have. The margins are known, so this costs no expert forward. Not under
        ``routed``: there the guide's confidence is what makes the experts specialise (measured: with it, the
        built-in world's routed run lost its types, ARI 0.0 against 1.0). The subsets are drawn per annotator and
        pair (:class:`~moedpo.inference.draws.UnitDraws`) where the batch names them."""
        if "user_index" not in kwargs or "guide_features" not in kwargs:
            return 0.0
        h, g, beta, obs = args
        users = kwargs["user_index"]
        per_pair, per_user = self._subset_uniforms(batch, keys, h.shape[0], g.shape[0], h.device)
        keep = per_pair < per_user[users]
        keep[first_pairs(users, g.shape[0])] = True  # every annotator keeps a pair
        sub = {**kwargs, "user_index": users[keep], "guide_features": kwargs["guide_features"][keep]}
        sub_args = (h[keep], g, beta, obs[keep])
        post = posterior(self.model, *sub_args, max_plate_nesting=self.max_plate_nesting, **sub)
        return guide_fit_loss(self.model, self.guide, post, *sub_args, max_plate_nesting=self.max_plate_nesting, **sub)[
            0
        ]

    def _subset_uniforms(self, batch, keys, num_pairs: int, num_users: int, device) -> tuple:
        """(per pair, per annotator) uniforms of the guide's subset fit."""
        pairs, _ = unit_keys(batch, {}, num_pairs)  # the pairs' own keys (None without an index)
        if keys is None or pairs is None:
            return torch.rand(num_pairs, device=device), torch.rand(num_users, device=device)
        return tuple(self.draws.uniform(k, 1, self.draw_index, "subset")[:, 0].to(device) for k in (pairs, keys))

    def routed_update(self, batch, total: float) -> tuple[dict, EStep, tuple]:
        """Sparse update routed by the guide: no expert runs before z is drawn, then only the drawn one. Returns
        the record, the routing as an E-step, and (unit keys, pair counts, learning signals) for the baselines."""
        ref = self.experts.reference(batch)  # cached features of the frozen base: no expert forward
        if "ranking" in ref or (isinstance(batch, dict) and "ranking" in batch):  # an LLM bank's ranking batch
            raise ValueError("schedule='routed' takes pairs; for rankings use schedule 'em', 'gumbel' or 'svi'")
        gate_logits, extra = gate_output(self.gate(batch, ref))  # gate
        kwargs = {"label_smoothing": self.label_smoothing, **extra, **self._guide_inputs(ref)}
        placeholder = torch.zeros(num_pairs(batch), self.experts.num_experts, device=gate_logits.device)
        obs = torch.ones(placeholder.shape[0], device=gate_logits.device)
        keys, counts = unit_keys(batch, extra, gate_logits.shape[0])
        keyed = KeyedSampling(self.draws, keys, self.draw_index) if keys is not None else contextlib.nullcontext()
        with keyed:  # z ~ q_phi, per unit
            trace = draw_from_guide(self.guide, placeholder, gate_logits, self.beta, obs, **kwargs)
        drawn = latent_site(trace)["value"].reshape(-1)
        route = drawn[extra["user_index"].to(drawn.device)] if "user_index" in extra else drawn
        out = as_dict(self.experts.margins(batch, route=route))  # only the drawn experts run, with a graph
        h, leaves = margins_with_leaves(out)
        routed = torch.nn.functional.one_hot(route, h.shape[-1]).to(h)
        h = h * routed  # other experts' entries: zero, constant
        args = (h, gate_logits, self.beta, obs.to(h))
        loss = routed_loss(self.model, trace, *args, baseline=self.baseline(keys, counts), **kwargs)
        (loss.surrogate / total).backward()
        if leaves:
            self.experts.backward(batch, *(leaf.grad for leaf in leaves))
        q = torch.softmax(latent_site(trace)["fn"].logits.detach().reshape(-1, h.shape[-1]), -1)
        record = routed_record(q, drawn, route, h.detach(), gate_logits, float(loss.elbo), detached(out))
        return record, EStep(None, q, routed, None), (keys, counts.tolist(), loss.signal.detach().cpu().tolist())

    def update_baseline(self, signals: list[tuple]) -> None:
        """The score-function baselines after a routed step: each micro-batch's signals in order, over every
        process's share of it (so the baselines are the same on every process, and one process's), applied once the
        step is done: within a step every micro-batch is centred by the baselines of the steps before."""
        gathered = [entry for part in self._gather(signals) for entry in part]
        for _, group in itertools.groupby(sorted(gathered, key=lambda e: e[:2]), key=lambda e: e[:2]):
            group = list(group)
            keys = None if any(e[2] is None for e in group) else [tuple(k) for e in group for k in e[2]]
            counts = torch.tensor([c for e in group for c in e[3]])
            self.baseline.update(keys, counts, torch.tensor([v for e in group for v in e[4]], dtype=torch.float64))

    def gate_penalty(self, batches) -> GatePenalty | None:
        """Load balance and usage entropy at the mean gate over every latent unit of the step (all micro-batches,
        all processes), from a no-grad gate pass before any backward: on the frozen base's cached features
        (``experts.reference``) where the experts have them, else on their margins. Once per M-step update: the
        gate moves between updates."""
        if not (self.load_balance or self.usage_entropy):
            return None
        with torch.no_grad():
            logits = [gate_output(self.gate(b, self._gate_inputs(b)))[0] for b in batches]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        device = logits[0].device if logits else params[0].device
        num_experts = self.experts.num_experts
        return gate_penalty(logits, self.load_balance, self.usage_entropy, num_experts, device, self.sync)

    def _gate_inputs(self, batch) -> dict:
        if hasattr(self.experts, "reference"):
            return self.experts.reference(batch)
        return as_dict(self.experts.margins(batch))

    def _guide_inputs(self, out: dict) -> dict:
        return {"guide_features": out["guide_features"]} if self.guide is not None and "guide_features" in out else {}

    # -- the pieces ----------------------------------------------------------------------------------------------
    def _check_rankings(self, out: dict) -> None:
        """Rankings have the Plackett–Luce link only: no TRL loss variant, and no guide (its features are a pair's)."""
        if "ranking" not in out:
            return
        if self.loss_type != "sigmoid":
            raise ValueError(f"loss_type={self.loss_type!r} is a pairwise loss; rankings train with 'sigmoid'")
        if self.guide is not None:
            raise ValueError("an amortized guide reads a pair's features; rankings train without a guide")

    def _started(self, args, keys: list | None) -> tuple:
        """The E-step's arguments with the data start's log prior added to the gate's logits (its first steps
        only; the gate's own M-step still sees its logits unchanged)."""
        if self.start is None:
            return args
        h, gate_logits = args[:2]
        shift = self.start.log_prior(keys, self.num_steps, gate_logits)
        return args if shift is None else (h, gate_logits.detach() + shift, *args[2:])

    def e_step(self, args, kwargs, keys: list | None = None) -> EStep:
        """The exact E-step; under ``gumbel`` with one posterior draw of the latents, per unit where ``keys``
        name the units (:func:`~moedpo.inference.draws.posterior_draw`)."""
        nesting = self.max_plate_nesting
        e = e_step(self.model, args, kwargs, self.beta, self.label_smoothing, nesting)
        if self.schedule == "gumbel":
            e.draw = posterior_draw(self.draws, self.model, e.post, args, kwargs, nesting, keys, self.draw_index)
        return e

    def m_step_loss(self, e: EStep, out: dict, args, kwargs) -> torch.Tensor:
        """The schedule's objective for one micro-batch, summed over its pairs."""
        nesting = self.max_plate_nesting
        if self.schedule in ("em", "routed"):  # routed: its dense exact steps are em steps
            loss, _ = em_loss(self.model, *args, max_plate_nesting=nesting, post=e.post, **kwargs)
        elif self.schedule == "svi":
            loss = marginal_loss(self.model, self.guide, *args, max_plate_nesting=nesting, **kwargs)
        else:
            loss = sampled_loss(self.model, e.draw, *args, max_plate_nesting=nesting, **kwargs)
        if self.loss_type != "sigmoid":  # swap the BT term of the experts for the q-weighted TRL loss
            h = args[0]
            loss = loss + self._loss_type_shift(e, out, h)
        return loss

    def _loss_type_shift(self, e: EStep, out: dict, h: torch.Tensor) -> torch.Tensor:
        """sum_ik r_ik [loss_type(h_ik) + log sigmoid(beta h_ik)]: added to -E_q[log p], it replaces the experts'
        Bradley-Terry term by the q-weighted TRL loss (K = 1: exactly TRL's loss)."""
        expert_loss = dpo_loss(loss_margins(out, h, self.loss_type), self.beta, self.loss_type, self.label_smoothing)
        return (e.pair_q * (expert_loss + log_likelihood(h, self.beta, self.label_smoothing))).sum()

    def _record(self, e: EStep, out: dict, h: torch.Tensor, gate_logits: torch.Tensor) -> dict:
        shift = float(self._loss_type_shift(e, out, h)) if self.loss_type != "sigmoid" else 0.0
        return step_record(e, out, h, gate_logits, self.beta, shift)

    def state_dict(self) -> dict:
        """What a resumed run needs beyond parameters and optimizer (plain JSON): the score-function baselines and
        the start its first E-steps lean on (``em.restarts`` may have kept one that the config does not rebuild)."""
        start = {"start": self.start.to_json()} if self.start is not None else {}
        return {"baseline": self.baseline.state_dict(), **start}

    def load_state_dict(self, state: dict) -> None:
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])
        if "start" in state:
            self.start = Start.from_json(state["start"])

    def apply_gradients(self) -> None:
        """Sum gradients over processes, clip, step the optimizer. A guide's parameters are clipped on their own:
        its score-function gradient is large and noisy, and must not scale the experts' step down."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.sync is not None:
            self.sync.sum_gradients(params)
        if self.clip_grad_norm is not None:
            guide = {id(p) for p in self.guide.parameters()} if isinstance(self.guide, torch.nn.Module) else set()
            rest = [p for p in params if id(p) not in guide]
            self.grad_norm = clip_grad_norm(rest, self.clip_grad_norm)
            if guide:
                clip_grad_norm([p for p in params if id(p) in guide], self.clip_grad_norm)
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

    def _idle_slots(self, counts: list[int]) -> list[int]:
        """Under the experts' ``lockstep`` (sharded layers: every process runs the same passes, so every process
        passes as many micro-batches), the positions where this process has no pairs and another process has some.
        Without it processes may pass different numbers of micro-batches."""
        if getattr(self.experts, "lockstep", None) is None:
            return []
        everywhere = self.sync.sum(torch.tensor(counts, dtype=torch.float64))  # (micro-batches,) over processes
        return [i for i, (mine, anyone) in enumerate(zip(counts, everywhere.tolist())) if mine == 0 and anyone > 0]

    def _gather(self, value) -> list:
        """``value`` of every process, in rank order ([value] in one process)."""
        return [value] if self.sync is None else self.sync.gather(value)

    def _global_sum(self, value: float) -> float:
        if self.sync is None:
            return float(value)
        return float(self.sync.sum(torch.tensor(float(value), dtype=torch.float64)))
