"""Training objectives as differentiable Pyro losses (a plain torch optimizer steps them; never PyroOptim).

- :func:`marginal_loss` — exact -log p(obs) by enumerating z in the model (``svi`` schedule, no guide), or
  the negative ELBO of an enumerated guide (``svi`` with :class:`~moedpo.models.AmortizedGuide`).
- :func:`em_loss` — the M-step objective -E_q[log p(obs, z)] - H(q) with q the fixed E-step posterior (its
  clique marginals, so nested latents are exact). Its gradient is the weighted DPO loss of the experts plus
  the gate's cross-entropy to q.
- :func:`sampled_loss` — -log p(obs, z) at one posterior draw of z (``gumbel``: sparse top-1 updates).
- :func:`routed_loss` — the ELBO at one draw of z from a guide, with a score-function (REINFORCE) term and a
  baseline for the guide: sparse updates routed by the guide, where only the drawn expert's margin exists.
- :func:`relaxed_loss` — the Gumbel-Softmax Monte Carlo ELBO (for relaxed models and guides).
- :func:`gate_cross_entropy` — -sum_k q_k log w_k, the gate M-step for networks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.poutine.util import site_is_subsample

from moedpo.inference.estep import Posterior, expected_log_joint, log_joint, plate_nesting, posterior
from moedpo.models.guides import empty_guide


def marginal_loss(model, guide=None, *args, max_plate_nesting: int | None = None, **kwargs) -> torch.Tensor:
    """Negative (exact, enumerated) ELBO summed over the batch; equals -log p(obs) when ``guide`` is None.

    Something must require grad (Pyro refuses a constant); for a plain number use
    :func:`moedpo.inference.marginal_nll`.
    """
    elbo = TraceEnum_ELBO(max_plate_nesting=plate_nesting(model, max_plate_nesting))
    return elbo.differentiable_loss(model, guide or empty_guide, *args, **kwargs)


def em_loss(
    model, *args, max_plate_nesting: int | None = None, post: Posterior | None = None, **kwargs
) -> tuple[torch.Tensor, Posterior]:
    """M-step loss under the E-step posterior, shifted by H(q) so that it equals -log p(obs) where q was
    computed. Returns (loss, posterior); pass ``post`` to reuse an E-step over several updates."""
    nesting = plate_nesting(model, max_plate_nesting)
    if post is None:
        post = posterior(model, *args, max_plate_nesting=nesting, **kwargs)
    expected = expected_log_joint(model, post, *args, max_plate_nesting=nesting, **kwargs)
    return -(expected + post.entropy), post


def sampled_loss(model, values: dict, *args, max_plate_nesting: int | None = None, **kwargs) -> torch.Tensor:
    """-log p(obs, z = values): stochastic EM with one exact posterior draw (only the drawn experts learn)."""
    return -log_joint(model, values, *args, max_plate_nesting=max_plate_nesting, **kwargs)


def draw_from_guide(guide, *args, **kwargs) -> poutine.Trace:
    """Run the guide once outside enumeration: one draw of its latents, log q with a graph to its parameters."""
    trace = poutine.trace(guide).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    return trace


def _latent_sites(trace) -> list[dict]:
    sites = [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]
    return [s for s in sites if not s["is_observed"]]


def latent_site(trace) -> dict:
    """The one latent sample site of a guide trace (routing needs exactly one: which expert runs)."""
    sites = _latent_sites(trace)
    if len(sites) != 1:
        raise ValueError(
            f"routing by a guide needs one latent site, the expert index; found {[s['name'] for s in sites]}"
        )
    return sites[0]


def guide_fit_loss(model, guide, post: Posterior, *args, max_plate_nesting: int | None = None, **kwargs):
    """The guide's objective where the exact posterior p is known (every expert's margin computed):
    -ELBO(q) + KL(p || q), summed over the batch. Returns (loss, ELBO).

    The ELBO (enumerated in the guide, :func:`marginal_loss`) alone is mode-seeking: a q that became confident
    in the wrong expert while the experts were still moving gets a gradient of order q_right, which vanishes, and
    stays wrong. KL(p || q) has gradient q - p, which does not; both terms are zero exactly at q = p.
    """
    negative_elbo = marginal_loss(model, guide, *args, max_plate_nesting=max_plate_nesting, **kwargs)
    return negative_elbo + forward_kl(guide, post, *args, **kwargs), -negative_elbo.detach()


def forward_kl(guide, post: Posterior, *args, **kwargs) -> torch.Tensor | float:
    """KL(p || q) of the guide's q to the exact posterior p, summed over the batch (a graph to the guide). Zero for
    a guide that is not one categorical site of the model's latents (e.g. one that enumerates several): its
    ELBO alone trains it."""
    sites = _latent_sites(draw_from_guide(guide, *args, **kwargs))
    if len(sites) != 1 or sites[0]["name"] not in post.marginals or not hasattr(sites[0]["fn"], "logits"):
        return 0.0
    site = sites[0]
    exact = post.marginals[site["name"]]
    log_q = torch.log_softmax(site["fn"].logits, -1).reshape(-1, exact.shape[-1])
    exact = exact.reshape(-1, exact.shape[-1]).to(log_q)
    return (torch.special.xlogy(exact, exact) - exact * log_q).sum()


@dataclass
class RoutedLoss:
    surrogate: torch.Tensor  # minimise: its gradient is the ELBO's (pathwise for experts and gate, REINFORCE for q)
    elbo: torch.Tensor  # scalar: the single-draw ELBO estimate, sum over units
    signal: torch.Tensor  # (units,): log p(obs_u, z_u) - log q(z_u), detached (the REINFORCE learning signal)


def routed_loss(model, guide_trace, *args, baseline=None, **kwargs) -> RoutedLoss:
    """Single-draw ELBO with z from ``guide_trace`` (a :func:`draw_from_guide` trace) and a score-function term.

    Per latent unit u (a pair, or an annotator in user scope), the learning signal is
    s_u = log p(obs_u, z_u) - log q(z_u), with log p summed over the unit's own sites (Rao-Blackwellised: other
    units' costs do not enter). The surrogate is -[sum_u s_u + sum_u (s_u - b_u) log q(z_u)] with s_u - b_u
    held constant, where ``baseline`` b (units,) is any value independent of z_u (variance reduction; the
    expectation of the gradient does not change). The model's margins h need only be right in the drawn column.
    """
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    model_trace.compute_log_prob()
    site = latent_site(guide_trace)
    log_q = site["log_prob"]  # (unit shape,), e.g. (B,) or (U, 1)
    log_p = torch.zeros_like(log_q)
    rest = 0.0
    for node in model_trace.nodes.values():
        if node["type"] != "sample" or site_is_subsample(node):
            continue
        lp = node["log_prob"]
        if lp.dim() >= log_q.dim() and all(a in (b, 1) for a, b in zip(log_q.shape, lp.shape[-log_q.dim() :])):
            log_p = log_p + lp.sum_to_size(log_q.shape)  # this unit's cost
        else:
            rest = rest + lp.sum()  # sites outside the units' plate: in the ELBO, not in any unit's signal
    signal = (log_p - log_q).detach()
    centred = signal - (0.0 if baseline is None else baseline.reshape(signal.shape).to(signal))
    elbo = (log_p - log_q).sum() + rest
    surrogate = -(elbo + (centred * log_q).sum())
    return RoutedLoss(surrogate, elbo.detach(), signal.reshape(-1))


class SignalBaseline:
    """Baselines for :func:`routed_loss`: decaying averages of the learning signal.

    Per latent unit where units recur (an annotator across steps, a pair across epochs): b_u is the average of
    u's own past signals, whichever experts were drawn, so it removes what differs between units (how many
    pairs, how easy) and leaves what the drawn expert adds. Units seen for the first time get the running
    average per pair times their number of pairs. b_u never depends on the current draw of z_u (unbiased).
    """

    def __init__(self, decay: float = 0.8):
        self.decay = decay
        self.per_unit: dict = {}
        self.per_pair: float | None = None

    def __call__(self, keys: list | None, counts: torch.Tensor) -> torch.Tensor | None:
        """b (units,) for units ``keys`` (hashable ids, or None) with ``counts`` pairs each."""
        if self.per_pair is None and not self.per_unit:
            return None
        default = (self.per_pair or 0.0) * counts.double()
        if keys is None:
            return default
        own = [self.per_unit.get(k) for k in keys]
        return torch.tensor([d if o is None else o for o, d in zip(own, default.tolist())], dtype=torch.float64)

    def update(self, keys: list | None, counts: torch.Tensor, signal: torch.Tensor) -> None:
        signal = signal.double().cpu()
        per_pair = float(signal.sum() / counts.sum())
        self.per_pair = per_pair if self.per_pair is None else self._mix(self.per_pair, per_pair)
        for key, value in zip(keys or [], signal.tolist()):
            old = self.per_unit.get(key)
            self.per_unit[key] = value if old is None else self._mix(old, value)

    def state_dict(self) -> dict:
        """Plain JSON: the running averages (a resumed run continues with the same baselines)."""
        return {"per_pair": self.per_pair, "per_unit": [[*key, value] for key, value in self.per_unit.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.per_pair = state["per_pair"]
        self.per_unit = {tuple(item[:-1]): item[-1] for item in state["per_unit"]}

    def _mix(self, old: float, new: float) -> float:
        return self.decay * old + (1 - self.decay) * new


def relaxed_loss(model, guide, *args, num_particles: int = 1, **kwargs) -> torch.Tensor:
    """Reparameterised Monte Carlo negative ELBO (Gumbel-Softmax z): model/guide with the same signature."""
    nesting = plate_nesting(model, kwargs.pop("max_plate_nesting", None))
    elbo = Trace_ELBO(num_particles=num_particles, max_plate_nesting=nesting, vectorize_particles=False)
    return elbo.differentiable_loss(model, guide, *args, **kwargs)


def gate_cross_entropy(gate_logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-sum_k q_k log softmax(g)_k: (N, K), (N, K) -> (N,). Minimised by softmax(g) = q."""
    return -(q.detach() * torch.log_softmax(gate_logits, -1)).sum(-1)
