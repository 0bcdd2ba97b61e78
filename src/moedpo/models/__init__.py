"""Pyro programs over tensors: latent Bradley–Terry and Plackett–Luce models, guides and gate networks."""

from moedpo.models.bt import mixture_bt_model, relaxed_bt_model, user_bt_model, user_slots
from moedpo.models.gates import FixedGate, MLPGate, Router, UserGate, top1_route
from moedpo.models.guides import AmortizedGuide, RelaxedGuide, empty_guide
from moedpo.models.pl import PlackettLuce, mixture_pl_model, user_pl_model

__all__ = [
    "AmortizedGuide",
    "FixedGate",
    "MLPGate",
    "PlackettLuce",
    "RelaxedGuide",
    "Router",
    "UserGate",
    "empty_guide",
    "mixture_bt_model",
    "mixture_pl_model",
    "relaxed_bt_model",
    "top1_route",
    "user_bt_model",
    "user_pl_model",
    "user_slots",
]
