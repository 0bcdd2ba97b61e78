"""moedpo: Mix- and MoE-DPO. K expert policies and a gate learned from preference pairs by variational EM
on a latent-class Bradley–Terry model written in Pyro (Bohne et al., arXiv 2510.08256).

``moedpo.train(config)`` trains LLM experts and returns the run directory; the math lives in
:mod:`moedpo.losses`, the Pyro programs in :mod:`moedpo.models`, the EM loop in :mod:`moedpo.inference`.
"""

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "train"]


def __getattr__(name):
    # Lazy, so `import moedpo.losses` does not pull in transformers and peft.
    if name == "train":
        from moedpo.training import train

        return train
    if name in ("Config", "load_config"):
        from moedpo import config

        return getattr(config, name)
    raise AttributeError(f"module 'moedpo' has no attribute {name!r}")
