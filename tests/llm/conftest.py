"""Tiny LLM fixtures: a word-level tokenizer trained locally and a random tiny Llama (no hub, no GPU)."""

import pytest

from moedpo.data.builtin import tiny_causal_lm, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_causal_lm(len(tokenizer), hidden_size=32, num_layers=2, seed=0, pad_token_id=tokenizer.pad_token_id)
