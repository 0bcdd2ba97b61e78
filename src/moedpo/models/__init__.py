"""Pyro programs over tensors: latent Bradley–Terry models, guides and gate networks."""

from moedpo.models.bt import mixture_bt_model, relaxed_bt_model, user_bt_model, user_slots
from moedpo.models.gates import FixedGate, MLPGate, Router, UserGate, top1_route
from moedpo.models.guides import AmortizedGuide, RelaxedGuide, empty_guide

__all__ = [
    "AmortizedGuide",
    "FixedGate",
    "MLPGate",
    "RelaxedGuide",
    "Router",
    "UserGate",
    "empty_guide",
    "mixture_bt_model",
    "relaxed_bt_model",
    "top1_route",
    "user_bt_model",
    "user_slots",
]
