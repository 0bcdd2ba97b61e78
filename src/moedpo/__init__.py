"""moedpo: Mix- and MoE-DPO. K expert policies and a gate learned from preference pairs by variational EM
on a latent-class Bradley–Terry model written in Pyro (Bohne et al., arXiv 2510.08256).

``moedpo.train(config)`` trains LLM experts and returns the run directory; the math lives in
:mod:`moedpo.losses`, the Pyro programs in :mod:`moedpo.models`, the EM loop in :mod:`moedpo.inference`.
"""

from moedpo.config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "train"]


def __getattr__(name):
    # Lazy: `moedpo.train` pulls in transformers and peft (heavy), which `import moedpo.losses` must not import.
    if name == "train":
        from moedpo.training import train

        return train
    raise AttributeError(f"module 'moedpo' has no attribute {name!r}")
