"""The built-in heterogeneous preference world for LLM experts: no downloads, seconds to generate.

Completions are short word sequences mixing "bright" words (set A), "dark" words (set B) and neutral words.
Two planted annotator types conflict: type ``bright`` prefers completions with more A than B words, type
``dark`` the opposite (Bradley–Terry with reward ``scale * (#A - #B)``, signed by type). Annotators have known
ids and hidden types and label ``pairs_per_annotator`` pairs each (identifiable with the user-scope latent).
With ``domain_reveals_type=True`` each type only labels prompts of its own domain, so the prompt alone tells
the type (the input-dependent gate with the pair-scope latent).

:func:`train_tokenizer` trains a word-level tokenizer on the world's words with ``tokenizers``, and
:func:`tiny_causal_lm` builds a small Llama-architecture model from a config with random weights.
"""

from __future__ import annotations

import random

from moedpo.data.worlds import Annotator, distinct_pair, label_pairs

A_WORDS = ["sunny", "bright", "warm", "gentle", "calm", "golden", "cheerful", "soft"]
B_WORDS = ["stormy", "dark", "cold", "fierce", "wild", "grey", "gloomy", "harsh"]
NEUTRAL = ["the", "a", "day", "sky", "road", "city", "river", "tree", "house", "light", "wind", "water"]
DOMAINS = {
    "bright": ["garden", "meadow", "beach", "picnic", "festival", "morning"],
    "dark": ["cellar", "tunnel", "winter", "harbour", "ruin", "midnight"],
}
PROMPT_VERBS = ["describe", "tell", "write", "imagine", "paint", "recall"]
TYPES = ("bright", "dark")
SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def draw_completion(rng: random.Random, length: int = 6) -> str:
    n_a, n_b = rng.randint(0, 3), rng.randint(0, 3)
    words = rng.sample(A_WORDS, n_a) + rng.sample(B_WORDS, n_b)
    words += [rng.choice(NEUTRAL) for _ in range(length - len(words))]
    rng.shuffle(words)
    return " " + " ".join(words)


def make_builtin_rows(
    annotators_per_type: int = 6,
    pairs_per_annotator: int = 32,
    scale: float = 1.5,
    domain_reveals_type: bool = False,
    seed: int = 0,
) -> list[dict]:
    """Rows in TRL's explicit-prompt format with ``user_id`` and ground-truth ``group`` columns."""

    def draw_pair(rng, kind):
        topics = DOMAINS[kind] if domain_reveals_type else DOMAINS["bright"] + DOMAINS["dark"]
        prompt = f"{rng.choice(PROMPT_VERBS)} the {rng.choice(topics)} :"
        return (prompt, *distinct_pair(rng, kind, draw_completion, reward))

    def reward(text, kind):
        return true_reward(text, kind, scale)

    annotators = [
        Annotator(f"annotator_{t * annotators_per_type + a:03d}", kind, kind)
        for t, kind in enumerate(TYPES)
        for a in range(annotators_per_type)
    ]
    rng = random.Random(seed)
    rows = label_pairs(annotators, pairs_per_annotator, draw_pair, reward, rng)
    rng.shuffle(rows)
    return rows


def vocabulary() -> list[str]:
    words = A_WORDS + B_WORDS + NEUTRAL + PROMPT_VERBS + [w for ws in DOMAINS.values() for w in ws]
    return list(dict.fromkeys([":", "user", "assistant", "system", *words]))


def train_tokenizer():
    """A word-level fast tokenizer trained locally on the built-in world's words (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL.values()), min_frequency=1)
    tok.train_from_iterator([" ".join(vocabulary())], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, pad_token_id=0):
    """A small Llama-architecture causal LM with random weights, built from a config (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def true_reward(completion: str, group: str, scale: float = 1.5) -> float:
    """The planted reward of a completion for an annotator of type ``group``: scale * (#A - #B), signed by type."""
    words = completion.split()
    difference = sum(w in A_WORDS for w in words) - sum(w in B_WORDS for w in words)
    return scale * difference * (1 if group == "bright" else -1)


def bayes_oracle_accuracy(rows: list[dict]) -> float:
    """Held-out accuracy of the Bayes oracle, which knows each annotator's type and reward: it predicts that the
    response with the higher true reward is chosen (the most any model can reach on these labels)."""
    right = [true_reward(r["chosen"], r["group"]) > true_reward(r["rejected"], r["group"]) for r in rows]
    return sum(right) / len(right)
