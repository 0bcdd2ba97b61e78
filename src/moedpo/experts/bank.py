"""Expert banks: K policies that turn a collated batch into per-expert margins h (B, K).

All banks share one protocol, used by the EM loop's ``forward``:

- :meth:`ExpertBank.margins` — every expert's sequence log-probs (B, K) without a graph (no activations kept,
  dropout off), the reference log-probs (computed once per example and cached:
  :mod:`moedpo.experts.reference_cache`) and pooled prompt features;
- :meth:`ExpertBank.backward` — given d loss / d log-probs (B, K), runs each expert's forward and backward in
  turn (only on the pairs with a non-zero gradient: sparse routing skips work), so memory does not grow with K;
  or, in a ``batched`` bank, every expert's rows in one grouped forward and backward
  (:mod:`moedpo.experts.grouped_lora`: one pass through the shared base, K experts' activations at once).

Modes: :class:`LoRABank` (K PEFT LoRA adapters on one base), :class:`HeadsBank` (shared frozen trunk run once
per batch; each expert owns LoRA on the top layers), :class:`IndependentBank` (K full models).
"""

from __future__ import annotations

import contextlib

import torch

from moedpo.experts.reference_cache import ReferenceCache, by_completion


def stacked_rows(batch: dict, rows: torch.Tensor) -> torch.Tensor:
    """The sequence rows of units ``rows`` (B',) in a batch stacked in blocks, [chosen; rejected] for pairs or one
    block per completion for rankings: (blocks * B',)."""
    num = batch["index"].shape[0]
    blocks = batch["input_ids"].shape[0] // max(num, 1)
    return torch.cat([rows + b * num for b in range(blocks)])


def select_pairs(batch: dict, rows: torch.Tensor) -> dict:
    """The sub-batch of pairs (or rankings) ``rows`` (B',) from a [chosen; rejected] (or per-completion) batch."""
    num_pairs = batch["index"].shape[0]
    both = stacked_rows(batch, rows)
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


def placeholder_batch() -> dict:
    """One pair of two tokens (id 0), the second a completion token: what a process with no pairs runs in
    lockstep (:meth:`ExpertBank.idle`); its negative index is never cached."""
    ids = torch.zeros(2, 2, dtype=torch.long)
    completion = torch.tensor([[0, 1], [0, 1]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": completion,
        "index": -torch.ones(1, dtype=torch.long),
    }


class ExpertBank(ReferenceCache):
    """Shared logic; subclasses implement ``expert_logps(k, batch)`` and ``reference_pass(batch)``."""

    num_experts: int
    device: torch.device
    lockstep = None  # train.parallel=fsdp: the processes (``sum``) that must run the same expert passes
    grouped = False  # the bank can run several experts' rows in one pass (grouped_logps)

    def __init__(self, autocast_dtype: torch.dtype | None = None, reuse_graph: bool = False):
        super().__init__()
        self.autocast_dtype, self.reuse_graph = autocast_dtype, reuse_graph

    # -- subclasses ---------------------------------------------------------------------------------------------
    def expert_logps(self, k: int, batch: dict) -> torch.Tensor:
        """Sequence log-probs (2B,) of expert k on the [chosen; rejected] batch (with a graph if grad is on)."""
        raise NotImplementedError

    def reference_pass(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (2B,) or (2B, K) and pooled prompt features (2B, D) of the frozen base."""
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def grouped_logps(self, batch: dict, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Sequence log-probs (R,) of the batch's sequence rows ``rows`` (R,), row j under expert ``experts[j]``,
        in one pass (banks with ``grouped``)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------
    @property
    def batched(self) -> bool:
        """Experts' rows run in one grouped pass; never under ``lockstep`` (a sharded layer's collectives are
        checked with one expert per forward only)."""
        return self.grouped and self.lockstep is None

    def pass_note(self, sharded: bool = False) -> str:
        """How a step runs the experts, for the run's first log line ("" for one expert); ``sharded``: the bank
        is about to be put in lockstep (train.parallel=fsdp)."""
        if self.num_experts == 1:
            return ""
        if self.batched and not sharded:
            return f"{self.num_experts} experts in one grouped pass (experts.batched)"
        why = "train.parallel=fsdp" if sharded or self.lockstep is not None else getattr(self, "grouped_reason", None)
        return f"experts in turn ({why or 'independent models'})"

    def autocast(self):
        if self.autocast_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def ranking_margins(self, batch: dict) -> dict:
        """Every expert's log-prob of every completion of a ranking batch: {"completion_logps" (B, M, K),
        "completion_lengths" (B, M), "ranking", "ranking_mask", "ranked", plus :meth:`reference`'s keys}; a
        missing completion's entries are 0. Without a graph unless ``reuse_graph`` and grad is on."""
        batch = self.to_device(batch)
        out = self.reference(batch)
        logps, num = self._dense_logps(batch), batch["index"].shape[0]
        return {
            "completion_logps": by_completion(logps, num),
            "completion_lengths": by_completion(batch["completion_mask"].sum(-1).float(), num),
            **{key: batch[key] for key in ("ranking", "ranking_mask", "ranked")},
            **out,
        }

    def margins(self, batch: dict, route: torch.Tensor | None = None) -> dict:
        """Every expert's log-probs on the batch: {"chosen_logps", "rejected_logps": (B, K), "chosen_lengths",
        "rejected_lengths": (B,) completion tokens, plus :meth:`reference`'s keys}.

        Without a graph (eval mode: the E-step pass), unless ``reuse_graph`` and grad is on: then the log-probs keep
        their graph (train mode) and the loop backpropagates through them, so no expert runs twice.

        ``route`` (B,) long: sparse routing. Each pair runs only its routed expert, with a graph (train mode); the
        other experts' entries are zero and constant. Expert k's forward sees only its own pairs.
        """
        self.begin_pass()
        if "ranking" in batch:
            if route is not None:
                raise ValueError("routing by a guide takes pairs; a ranking batch has no routed path")
            return self.ranking_margins(batch)
        batch = self.to_device(batch)
        out = self.reference(batch)
        if route is not None:
            chosen, rejected = self._routed_logps(batch, route.to(self.device))
        else:
            chosen, rejected = self._dense_logps(batch).chunk(2)  # (B, K) each
        lengths = batch["completion_mask"].sum(-1).float()
        return {
            "chosen_logps": chosen,
            "rejected_logps": rejected,
            "chosen_lengths": lengths[: chosen.shape[0]],
            "rejected_lengths": lengths[chosen.shape[0] :],
            **out,
        }

    def _dense_logps(self, batch: dict) -> torch.Tensor:
        """Every expert on every sequence row of a batch, (rows, K): without a graph (eval mode: the E-step pass),
        unless ``reuse_graph`` and grad is on (train mode, the loop backpropagates through them). Never a graph
        under ``lockstep``: each expert's forward of a sharded layer needs its own backward (:meth:`backward`)."""
        graph = self.reuse_graph and self.lockstep is None and torch.is_grad_enabled()
        self.train_mode() if graph else self.eval_mode()
        every = torch.arange(batch["index"].shape[0], device=self.device)
        with torch.set_grad_enabled(graph), self.autocast():
            return torch.stack(self.experts_logps(batch, [every] * self.num_experts), -1)

    def experts_logps(self, batch: dict, units: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Each expert k's sequence log-probs (blocks * B'_k,) float32 on its pairs (rankings) ``units[k]`` (B'_k,),
        None where ``units[k]`` is: in one grouped pass when ``batched``, else expert after expert."""
        if not self.batched:
            return [None if u is None else self.rows_logps(k, batch, u).float() for k, u in enumerate(units)]
        rows = [None if u is None else stacked_rows(batch, u) for u in units]
        present = [(k, r) for k, r in enumerate(rows) if r is not None]
        if not present:
            return [None] * len(units)
        experts = torch.cat([torch.full_like(r, k) for k, r in present])
        logps = self.grouped_logps(batch, torch.cat([r for _, r in present]), experts).float()
        out: list[torch.Tensor | None] = [None] * len(units)
        for (k, _), values in zip(present, logps.split([r.numel() for _, r in present])):
            out[k] = values
        return out

    def _routed_logps(self, batch: dict, route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed experts' log-probs (2B, K) with a graph (train mode); under ``lockstep`` without one (eval
        mode), and :meth:`backward` runs each expert's forward and backward: a sharded layer's gradients are wrong
        when several experts' forwards share one backward (measured with FSDP2: 0.03 off after 3 steps)."""
        num_pairs = route.shape[0]
        logps = torch.zeros(2 * num_pairs, self.num_experts, device=self.device)
        graph = self.lockstep is None and torch.is_grad_enabled()
        self.train_mode() if graph else self.eval_mode()
        rows = [torch.nonzero(route == k).squeeze(-1) for k in range(self.num_experts)]
        agreed = self.agreed(rows)
        with torch.set_grad_enabled(graph), self.autocast():
            per_expert = self.experts_logps(batch, agreed)  # (2B'_k,) each
        for k, (expert_rows, values) in enumerate(zip(agreed, per_expert)):
            if values is None or rows[k].numel() == 0:  # lockstep's stand-in row: run for the collectives only
                continue
            both = torch.cat([expert_rows, expert_rows + num_pairs])
            logps = logps.index_put((both, torch.full_like(both, k)), values)
        return logps.chunk(2)

    def rows_logps(self, k: int, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        """Expert k's sequence log-probs on the pairs ``rows`` of a batch: (2B',) as [chosen; rejected]."""
        return self.expert_logps(k, batch if rows.numel() == batch["index"].shape[0] else select_pairs(batch, rows))

    def backward(self, batch: dict, *grads: torch.Tensor) -> None:
        """Backpropagate d loss / d log-probs into the experts, one expert's forward+backward at a time (train
        mode: configured dropout is active), only on the pairs (rankings) whose gradient is non-zero. ``grads``:
        d chosen, d rejected (B, K) each, or for a ranking batch d completion_logps (B, M, K)."""
        batch = self.to_device(batch)
        if len(grads) == 1:  # rankings: (B, M, K) -> (M * B, K), rows as in the batch
            grad = grads[0].transpose(0, 1).reshape(-1, grads[0].shape[-1]).to(self.device)
        else:
            grad = torch.cat(grads).to(self.device)  # (2B, K)
        num = batch["index"].shape[0]
        per_unit = grad.reshape(-1, num, grad.shape[-1])  # (blocks, B, K)
        rows = [torch.nonzero((per_unit[..., k] != 0).any(0)).squeeze(-1) for k in range(self.num_experts)]
        self.train_mode()
        if self.batched:  # one grouped forward and backward
            with self.autocast():
                per_expert = self.experts_logps(batch, self.agreed(rows))
            ran = [(k, v) for k, v in enumerate(per_expert) if v is not None]
            grads = [grad[stacked_rows(batch, rows[k]), k].to(v.dtype) for k, v in ran]
            torch.autograd.backward([v for _, v in ran], grads)
            return
        for k, expert_rows in enumerate(self.agreed(rows)):
            if expert_rows is None:
                continue  # sparse routing: expert k got no pair
            with self.autocast():
                logps = self.rows_logps(k, batch, expert_rows).float()  # (blocks * B',)
            logps.backward(grad[stacked_rows(batch, expert_rows), k].to(logps.dtype))

    def begin_pass(self) -> None:
        """A micro-batch's passes start (:meth:`margins`, :meth:`idle`): what a bank caches across them must not
        spare one process a forward that another runs (under ``lockstep``)."""

    def agreed(self, rows: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each expert's rows (B',) to run, from this process's (None: the expert does not run). Under ``lockstep``
        an expert that any process runs, every process runs, on row 0 (whose gradient for it is zero here) where
        it has no rows of its own, and one that no process runs, none."""
        if self.lockstep is None:
            return [r if r.numel() else None for r in rows]
        counts = self.lockstep.sum(torch.tensor([float(r.numel()) for r in rows], dtype=torch.float64)).tolist()
        first = torch.zeros(1, dtype=torch.long, device=self.device)
        return [None if count == 0 else (r if r.numel() else first) for r, count in zip(rows, counts)]

    def idle(self, routed: bool = False) -> None:
        """Under ``lockstep``, a process with no pairs in a micro-batch that other processes have: the same expert
        passes as theirs (every expert's no-grad pass, or ``routed`` the routed experts', then each agreed expert's
        forward and backward) on a placeholder pair, with zero gradient."""
        self.begin_pass()
        batch = self.to_device(placeholder_batch())
        if routed:
            self._routed_logps(batch, torch.full((1,), -1, device=self.device))
        else:
            self._dense_logps(batch)
        zeros = torch.zeros(1, self.num_experts, device=self.device)
        self.backward(batch, zeros, zeros)

    def train_mode(self) -> None:
        """Dropout on for the update's forward (only what the config left in: ``disable_dropout``)."""
        for module in self.modules():
            module.train()

    def eval_mode(self) -> None:
        """Dropout off for no-grad passes: the E-step and the reference."""
        for module in self.modules():
            module.eval()

    def modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError
