"""The reference cache of an expert bank: the frozen base's log-probs and pooled features of every example,
computed once per dataset (what TRL calls ``precompute_ref_log_probs``), kept as small CPU copies keyed by the
example's index, and saved with the run (``reference_state``, safetensors) so that ``--resume`` reads them back."""

from __future__ import annotations

import torch

from moedpo.data.tokenize import collate_examples


def by_completion(values: torch.Tensor, num: int) -> torch.Tensor:
    """Rows of a ranking batch's blocks, (M * B, ...), as (B, M, ...)."""
    return values.reshape(-1, num, *values.shape[1:]).transpose(0, 1)


def _padded_to(values: torch.Tensor, width: int) -> torch.Tensor:
    """A ranking's (n, ...) cached values with zeros for the batch's missing completions: (width, ...)."""
    return torch.cat([values, values.new_zeros(width - values.shape[0], *values.shape[1:])])


def _reference_dict(chosen, rejected, features, completions) -> dict:
    out = {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected, "features": features}
    if completions is not None:  # (B, 3D): prompt, chosen and rejected completions, pooled
        out["guide_features"] = torch.cat([features, completions], -1)
    return out


class ReferenceCache:
    """Shared by every bank; the bank gives ``reference_pass``, ``eval_mode``, ``autocast`` and ``to_device``."""

    def __init__(self):
        self._ref_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._feature_cache: dict[int, torch.Tensor] = {}
        self._completion_cache: dict[int, torch.Tensor] = {}
        self._ranking_cache: dict[int, torch.Tensor] = {}  # rankings: each completion's reference log-prob

    @torch.no_grad()
    def reference(self, batch: dict) -> dict:
        """The frozen base's view of a batch, cached per example: ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,)
        or (B, K), pooled prompt ``features`` (B, D) for the gate, and ``guide_features`` (B, 3D): the pooled prompt,
        chosen and rejected completions, for the amortized guide.

        The cache holds small CPU copies keyed by ``batch["index"]`` (no views that would pin whole batches on the
        device); examples with a negative index (routing probes) are never cached.
        """
        if "ranking" in batch:
            return self._ranking_reference(batch)
        index = batch["index"].tolist()
        cacheable = all(i >= 0 for i in index)
        if not cacheable or any(i not in self._ref_cache for i in index):
            self.eval_mode()
            with self.autocast():
                logps, pooled = self.reference_pass(batch)
            chosen, rejected = logps.float().chunk(2)
            pooled = pooled.float()
            width = pooled.shape[-1] // 2
            features = pooled[: len(index), :width]  # chosen half: the prompt's features
            completions = torch.cat([pooled[: len(index), width:], pooled[len(index) :, width:]], -1)
            if not cacheable:
                return _reference_dict(chosen, rejected, features, completions)
            for j, i in enumerate(index):
                self._ref_cache[i] = (chosen[j].cpu().clone(), rejected[j].cpu().clone())
                self._feature_cache[i] = features[j].cpu().clone()
                self._completion_cache[i] = completions[j].cpu().clone()

        def stack(rows):
            return torch.stack(list(rows)).to(self.device)

        chosen = stack(self._ref_cache[i][0] for i in index)
        rejected = stack(self._ref_cache[i][1] for i in index)
        features = stack(self._feature_cache[i] for i in index)
        known = all(i in self._completion_cache for i in index)
        completions = stack(self._completion_cache[i] for i in index) if known else None
        return _reference_dict(chosen, rejected, features, completions)

    @torch.no_grad()
    def _ranking_reference(self, batch: dict) -> dict:
        """A ranking batch's ``ref_completion_logps`` (B, M) or (B, M, K) and the prompt ``features`` (B, D), cached
        per example like pairs' (no guide features: an amortized guide reads pairs)."""
        index, width = batch["index"].tolist(), batch["ranking"].shape[1]
        cacheable = all(i >= 0 for i in index)
        if not cacheable or any(i not in self._ranking_cache for i in index):
            self.eval_mode()
            with self.autocast():
                logps, pooled = self.reference_pass(batch)
            logps = by_completion(logps.float(), len(index))
            features = pooled.float()[: len(index), : pooled.shape[-1] // 2]  # block 0's prompt
            if not cacheable:
                return {"ref_completion_logps": logps, "features": features}
            for j, (i, n) in enumerate(zip(index, batch["ranking_mask"].sum(-1).tolist())):
                self._ranking_cache[i] = logps[j, :n].cpu().clone()
                self._feature_cache[i] = features[j].cpu().clone()
        logps = torch.stack([_padded_to(self._ranking_cache[i], width) for i in index]).to(self.device)
        features = torch.stack([self._feature_cache[i] for i in index]).to(self.device)
        return {"ref_completion_logps": logps, "features": features}

    @torch.no_grad()
    def precompute_reference(self, examples: list[dict], pad_token_id: int, batch_size: int = 32, progress=None):
        """Reference log-probs and features of every example, once per dataset (what TRL calls
        ``precompute_ref_log_probs``); then no step runs the reference."""
        cache = self._ranking_cache if examples and "completion_ids" in examples[0] else self._ref_cache
        missing = [e for e in examples if e["index"] not in cache]
        for start in range(0, len(missing), batch_size):
            self.reference(self.to_device(collate_examples(missing[start : start + batch_size], pad_token_id)))
            if progress is not None:
                progress(len(missing[start : start + batch_size]))

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The reference cache as tensors (for safetensors): index (N,), chosen/rejected (N,) or (N, K), features
        (N, D), completion_features (N, 2D); for rankings ranking_index (N,), completion_counts (N,),
        ref_completion_logps (N, M) or (N, M, K) (zeros past each count) and ranking_features (N, D)."""
        if self._ranking_cache:
            return self._ranking_state()
        index = sorted(self._ref_cache)
        if not index:
            return {}
        state = {
            "index": torch.tensor(index),
            "ref_chosen_logps": torch.stack([self._ref_cache[i][0] for i in index]),
            "ref_rejected_logps": torch.stack([self._ref_cache[i][1] for i in index]),
            "features": torch.stack([self._feature_cache[i] for i in index]),
        }
        if all(i in self._completion_cache for i in index):
            state["completion_features"] = torch.stack([self._completion_cache[i] for i in index])
        return state

    def _ranking_state(self) -> dict[str, torch.Tensor]:
        index = sorted(self._ranking_cache)
        counts = [self._ranking_cache[i].shape[0] for i in index]
        return {
            "ranking_index": torch.tensor(index),
            "completion_counts": torch.tensor(counts),
            "ref_completion_logps": torch.stack([_padded_to(self._ranking_cache[i], max(counts)) for i in index]),
            "ranking_features": torch.stack([self._feature_cache[i] for i in index]),
        }

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        if "ranking_index" in state:
            for j, (i, n) in enumerate(zip(state["ranking_index"].tolist(), state["completion_counts"].tolist())):
                self._ranking_cache[i] = state["ref_completion_logps"][j, :n].clone()
                self._feature_cache[i] = state["ranking_features"][j].clone()
            return
        for j, i in enumerate(state["index"].tolist()):
            self._ref_cache[i] = (state["ref_chosen_logps"][j].clone(), state["ref_rejected_logps"][j].clone())
            self._feature_cache[i] = state["features"][j].clone()
            if "completion_features" in state:  # runs saved before the amortized guide lack them
                self._completion_cache[i] = state["completion_features"][j].clone()
