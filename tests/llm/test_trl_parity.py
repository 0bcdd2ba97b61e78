"""K=1 reproduces TRL 1.16's ``DPOTrainer`` loss and gradients for every ``train.loss_type`` (sigmoid, ipo, hinge,
robust), each side starting from the same raw preference rows.

TRL tokenizes the rows itself (``DPOTrainer`` on a ``datasets.Dataset``) and we take one batch of its train
dataloader; moedpo tokenizes them with its own ``normalise_row`` -> ``tokenize_rows`` -> ``collate``. Two
datasets of what users bring, tokenized by a GPT-2 style byte-level BPE: HH-style implicit rows (one multi-turn,
one whose rejected answer is a prefix of the chosen one) and explicit rows (one whose prompt's trailing space
merges into the completion's first token), each with a completion cut at ``max_length``. The whole dataset is
one batch, so the loss (a mean over pairs) and the gradients (sums over pairs) do not depend on the order in
which TRL's sampler draws the rows.
"""

import copy

import pytest
import torch

from moedpo.data.builtin import tiny_causal_lm
from moedpo.data.formats import normalise_row
from moedpo.data.tokenize import collate, tokenize_rows
from moedpo.experts import IndependentBank
from moedpo.inference import VariationalEM
from moedpo.losses.dpo import margins
from moedpo.models import FixedGate

trl = pytest.importorskip("trl")

BETA = 0.5
MAX_LENGTH = 40
HH = "\n\nHuman: {}\n\nAssistant: {}"
IMPLICIT = [
    {
        "chosen": HH.format("What color is the sky?", "It is blue, sure thing."),
        "rejected": HH.format("What color is the sky?", "No."),
    },
    {  # the rejected answer is a prefix of the chosen one
        "chosen": HH.format("Can you help me?", "Sure thing, please wait."),
        "rejected": HH.format("Can you help me?", "Sure"),
    },
    {  # multi-turn: the prompt runs to the last "Assistant:"
        "chosen": HH.format("Why is the sea blue?", "It is the sky.") + HH.format("Is it?", "Yes, sure."),
        "rejected": HH.format("Why is the sea blue?", "It is the sky.") + HH.format("Is it?", "No, it is red."),
    },
    {"chosen": HH.format("Help me, please.", "Maybe."), "rejected": HH.format("Help me, please.", "I can not.")},
    {  # the chosen answer is cut at max_length
        "chosen": HH.format("Tell me about the sea.", "The sea is blue and calm, " * 6),
        "rejected": HH.format("Tell me about the sea.", "It is red."),
    },
]
EXPLICIT = [
    {"prompt": "Answer: ", "chosen": "Yes it is.", "rejected": "No it is not."},  # 'Ġ' + 'Yes' -> 'ĠYes'
    {"prompt": "Why is the sun warm?", "chosen": " Because it is a star.", "rejected": " It is green."},
    {"prompt": "What color is the sea?", "chosen": " Blue, sure thing.", "rejected": " Red."},
    {"prompt": "Tell me about the sea.", "chosen": " The sea is blue and calm" * 6, "rejected": " No."},  # cut
    {"prompt": "Can you help me? ", "chosen": "Maybe.", "rejected": "Please help me, you can."},
]
FORMATS = {"implicit": IMPLICIT, "explicit": EXPLICIT}  # one format per dataset, as TRL requires
# loss_type -> (label_smoothing, the loss at h = 0 for beta = 0.5, which the comparison must stay away from).
# TRL 1.16's sigmoid is -logsigmoid(beta * delta) and never reads label_smoothing (DPOTrainer._compute_loss; the
# DPOConfig help says label_smoothing is for robust and exo_pair only), so sigmoid is compared at 0.
LOSS_TYPES = {"sigmoid": (0.0, 0.6931472), "ipo": (0.0, 1.0), "hinge": (0.0, 1.0), "robust": (0.2, 0.6931472)}


def _perturbed(model, scale: float = 0.1, seed: int = 5):
    """A copy of ``model`` moved off it by Gaussian noise, so the margins are not zero."""
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return policy


def _pairs(batch) -> list[tuple]:
    """The batch's (chosen ids, rejected ids) pairs, padding stripped, sorted: a row-order-free fingerprint."""
    num_pairs = batch["input_ids"].shape[0] // 2
    ids = [seq[mask.bool()].tolist() for seq, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    return sorted(zip(ids[:num_pairs], ids[num_pairs:], strict=True))


def _trl_loss_and_grads(records, policy, reference, tokenizer, loss_type, label_smoothing, tmp_path):
    from datasets import Dataset

    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,  # TRL 1.16 defaults to bf16 autocast, even on CPU; compare in float32
        beta=BETA,
        per_device_train_batch_size=len(records),
        report_to=[],
        max_length=MAX_LENGTH,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        seed=0,
    )
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=copy.deepcopy(tokenizer),  # DPOTrainer sets a pad token on the tokenizer it is given
    )
    batch = next(iter(trainer.get_train_dataloader()))  # all rows, in the sampler's order
    trainer.model.train()  # TRL disables dropout by default, as moedpo does
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}  # what TRL's next log holds
    return batch, loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}, logged


def _moedpo_loss_and_grads(records, policy, reference, tokenizer, loss_type, label_smoothing):
    rows = [normalise_row(record, "rows", i) for i, record in enumerate(records)]
    tokenized = tokenize_rows(rows, tokenizer, source="rows", max_length=MAX_LENGTH)
    assert tokenized.num_dropped == 0 and tokenized.num_truncated >= 1  # one completion is cut, none dropped
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate(tokenized.examples, pad)  # (2B, T) [chosen; rejected], B = len(records)
    bank = IndependentBank(copy.deepcopy(reference), 1)
    bank.experts[0].load_state_dict(policy.state_dict())
    gate = FixedGate(1, learnable=False)
    optimizer = torch.optim.SGD(list(bank.trainable_parameters().values()), lr=0.0)  # keeps the gradients
    loop = VariationalEM(
        bank,
        lambda b, margins: gate(b["index"].shape[0]),  # (B, 1)
        optimizer,
        beta=BETA,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    out = bank.margins(batch)
    h = margins(out["chosen_logps"], out["rejected_logps"], out["ref_chosen_logps"], out["ref_rejected_logps"])
    loss = loop.step(batch)
    assert loss == loop.metrics["loss"]
    return batch, loss, {n: p.grad for n, p in bank.experts[0].named_parameters()}, h[:, 0], loop.metrics


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_k1_matches_trl_dpo_trainer_from_raw_rows(fmt, loss_type, gpt2_tokenizer, tmp_path):
    label_smoothing, trivial = LOSS_TYPES[loss_type]
    tok, records = gpt2_tokenizer, FORMATS[fmt]
    reference = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, seed=0, pad_token_id=tok.pad_token_id)
    policy = _perturbed(reference)
    trl_batch, trl_loss, trl_grads, trl_logged = _trl_loss_and_grads(
        records, policy, reference, tok, loss_type, label_smoothing, tmp_path
    )
    batch, loss, grads, h, logged = _moedpo_loss_and_grads(records, policy, reference, tok, loss_type, label_smoothing)

    worst = max((grads[n] - g).abs().max().item() for n, g in trl_grads.items())
    largest = max(g.abs().max().item() for g in trl_grads.values())
    print(
        f"{fmt} {loss_type}: TRL loss {trl_loss:.7f}, ours {loss:.7f} (difference {abs(loss - trl_loss):.2g}), "
        f"max gradient difference {worst:.3g} (largest gradient {largest:.3g})"
    )
    assert _pairs(batch) == _pairs(trl_batch)  # the same sequences, in some row order
    # away from the trivial point: margins of both signs, pairs on both sides of the hinge (beta * h = 1)
    reward = BETA * h  # (B,)
    assert (reward < 0).any() and ((reward > 0) & (reward < 1)).any() and (reward > 1).any(), reward
    assert abs(trl_loss - trivial) > 1e-2, f"loss {trl_loss} is its value at zero margins"
    assert abs(loss - trl_loss) <= 1e-5
    assert sorted(grads) == sorted(trl_grads)
    assert worst <= 1e-5, f"max gradient difference {worst:.3g}"
    assert largest > 1e-4  # gradients are not trivially zero
    for key in ("logps/chosen", "logps/rejected"):  # TRL's mean policy log-prob of each side (sums of ~20 tokens)
        assert abs(logged[key] - trl_logged[key]) <= 1e-5 * abs(trl_logged[key]), (key, logged[key], trl_logged[key])
    assert logged["logps/chosen"] < -1.0
