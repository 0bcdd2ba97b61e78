"""moedpo: Mix- and MoE-DPO. K expert policies and a gate learned from preference pairs by variational EM
on a latent-class Bradley–Terry model written in Pyro (Bohne et al., arXiv 2510.08256)."""

__version__ = "0.1.0"
