"""Expert banks: the side that turns a batch into per-expert margins (B, K) for the EM loop."""

from moedpo.experts.bank import ExpertBank, select_pairs
from moedpo.experts.heads import HeadsBank, IndependentBank
from moedpo.experts.logprobs import pooled_prompt_features, selective_log_softmax, sequence_logps
from moedpo.experts.lora import LoRABank
from moedpo.experts.tabular import TabularExperts, optimal_policy

__all__ = [
    "ExpertBank",
    "HeadsBank",
    "IndependentBank",
    "LoRABank",
    "TabularExperts",
    "optimal_policy",
    "pooled_prompt_features",
    "select_pairs",
    "selective_log_softmax",
    "sequence_logps",
]
