"""K=1 with the sigmoid loss reproduces TRL's DPOTrainer loss and gradients on the same model and batch."""

import copy

import pytest
import torch

from moedpo.data.builtin import make_builtin_rows
from moedpo.experts import IndependentBank
from moedpo.inference import VariationalEM
from moedpo.models import FixedGate

trl = pytest.importorskip("trl")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_k1_matches_trl_dpo_trainer(tokenizer, tiny_model, tmp_path):
    from datasets import Dataset

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_builtin_rows(2, 4, seed=1)]
    reference = copy.deepcopy(tiny_model)
    policy = copy.deepcopy(tiny_model)  # move the policy off the reference so the margins are not zero
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for param in policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        beta=0.5,
        per_device_train_batch_size=6,
        report_to=[],
        max_length=64,
        loss_type=["sigmoid"],
        seed=0,
        bf16=False,
    )  # TRL 1.16 defaults to bf16 autocast, even on CPU; compare in float32
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    bank = IndependentBank(reference, 1)
    bank.experts[0].load_state_dict(policy.state_dict())
    gate = FixedGate(1, learnable=False)
    ours_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    ours_batch["index"] = torch.arange(batch["input_ids"].shape[0] // 2)

    def forward(b):
        out = bank.margins(b)
        return {"h": out["h"], "gate_logits": gate(out["h"].shape[0]), "backward": lambda g: bank.push(b, g)}

    params = list(bank.trainable_parameters().values())
    loop = VariationalEM(forward, torch.optim.SGD(params, lr=0.0), beta=0.5)
    loop.optimizer.zero_grad()
    loop.backward(ours_batch)
    assert abs(trl_loss.item() - 0.6931) > 1e-2  # h != 0: the comparison is not at the trivial point
    assert abs(loop.metrics["loss"] - trl_loss.item()) <= 1e-5
    ours = dict(bank.experts[0].named_parameters())
    worst = max((ours[n].grad - g).abs().max().item() for n, g in trl_grads.items())
    print(f"TRL loss {trl_loss.item():.7f}, ours {loop.metrics['loss']:.7f}, max gradient difference {worst:.3g}")
    assert worst <= 1e-5, f"max gradient difference {worst:.3g}"
    assert any(g.abs().max() > 1e-4 for g in trl_grads.values())  # gradients are not trivially zero
