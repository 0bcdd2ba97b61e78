"""Tiny LLM fixtures: tokenizers trained locally in seconds and a random tiny Llama (no hub, no GPU).

Besides the built-in word-level tokenizer, three byte-level BPE tokenizers like the ones users bring (a
word-level toy tokenizer hides prompt/completion boundary bugs): GPT-2 style (no special tokens added), Llama-3
style (its post-processor adds BOS) and ChatML style (a chat template whose turns end with ``<|im_end|>``).
"""

import random

import pytest

from moedpo import threads
from moedpo.data.builtin import A_WORDS, B_WORDS, NEUTRAL, tiny_causal_lm, train_tokenizer, vocabulary
from moedpo.inference import VariationalEM

HH_WORDS = "what why how is it the sky sun sea blue green red yes no sure thing maybe please help me you can".split()
LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Short sentences over the built-in world's words and HH-style dialogue words."""
    rng = random.Random(seed)
    words = vocabulary() + HH_WORDS + A_WORDS + B_WORDS + NEUTRAL
    sentences = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        sentences.append(text[0].upper() + text[1:] + rng.choice([".", "?", "!", " :"]))
    dialogue = "\n\nHuman: What color is the sky?\n\nAssistant: It is blue, sure thing."
    return sentences + ["Answer: Yes it is.", dialogue] * 20


def _byte_level_bpe(special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2 style: byte-level BPE, ``<|endoftext|>`` as BOS/EOS/UNK, no pad, nothing added by its post-processor."""
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe([special]), bos_token=special, eos_token=special, unk_token=special
    )


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Llama-3 style: byte-level BPE whose post-processor prepends ``<|begin_of_text|>``; a chat template that
    writes BOS itself and ends turns with ``<|eot_id|>``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = _byte_level_bpe([bos, eos, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.chat_template = LLAMA3_CHAT
    return fast


@pytest.fixture(scope="session")
def chat_tokenizer():
    """ChatML style: byte-level BPE, EOS ``<|im_end|>`` (the end of turn), pad ``<|endoftext|>``, no BOS."""
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_causal_lm(len(tokenizer), hidden_size=32, num_layers=2, seed=0, pad_token_id=tokenizer.pad_token_id)


def _crash():
    raise KeyboardInterrupt("simulated crash")


@pytest.fixture
def at_step(monkeypatch):
    """``at_step(n, action=crash)``: run ``action()`` as ``VariationalEM.step`` begins step n (its 0-based
    ``num_steps``): a simulated crash by default, or e.g. a signal. ``monkeypatch.undo()`` restores the loop."""
    original = VariationalEM.step

    def hook(n: int, action=_crash):
        def step(self, *batches):
            if self.num_steps == n:
                action()
            return original(self, *batches)

        monkeypatch.setattr(VariationalEM, "step", step)

    return hook


@pytest.fixture(autouse=True)
def one_thread_count_per_test():
    """``train.num_threads=auto`` samples the machine's load when each run starts, and runs are repeatable bit for
    bit only at one thread count (:mod:`moedpo.threads`: 2e-4 apart after 40 steps between 1 and 2). Tests compare
    an interrupted and resumed run with a whole one bit for bit; beside a busy process the two drew different
    counts and such a test failed. Here a test's first ``auto`` choice holds for the rest of the test. (Not through
    ``monkeypatch``: those tests call ``monkeypatch.undo()`` before they resume.)"""
    chosen, choose = {}, threads.choose

    def first_choice(setting, processes=1):
        if setting != threads.AUTO:
            return choose(setting, processes)
        if processes not in chosen:
            chosen[processes] = choose(setting, processes)
        return chosen[processes]

    threads.choose = first_choice
    yield
    threads.choose = choose
