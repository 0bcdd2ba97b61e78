"""Held-out evaluation uses the training E-step (label smoothing included) and log-space mixture likelihoods."""

from types import SimpleNamespace

import torch

from moedpo.config import load_config
from moedpo.eval.evaluate import evaluate
from moedpo.losses import log_likelihood, user_responsibilities
from moedpo.models import FixedGate, Router, user_bt_model


class TableBank:
    """Stands in for an expert bank: per-example margins from a table (chosen log-prob = h, rejected = 0)."""

    def __init__(self, h):
        self.h, self.device, self.num_experts = h, torch.device("cpu"), h.shape[1]

    def margins(self, batch):
        h = self.h[batch["index"]]
        zeros = torch.zeros(h.shape[0])
        return {
            "chosen_logps": h,
            "rejected_logps": torch.zeros_like(h),
            "ref_chosen_logps": zeros,
            "ref_rejected_logps": zeros,
            "features": torch.zeros(h.shape[0], 1),
        }


def example(index, user, group):
    ids = [1, 2]
    return {
        "index": index, "prompt_chosen_ids": ids, "prompt_rejected_ids": ids, "chosen_ids": [3], "rejected_ids": [4],
        "user": user, "group": group, "user_features": None,
    }  # fmt: skip


def test_user_posteriors_use_label_smoothing_and_the_nll_stays_finite():
    """Two annotators; smoothing 0.3 changes the posterior (it caps each pair's evidence), and a held-out pair
    with |beta h| = 5000 gives a finite mixture NLL (a clamp in linear space gave 69 = -log 1e-30)."""
    torch.manual_seed(0)
    h = torch.cat([torch.randn(8, 2) * 3, torch.tensor([[1e4, -1e4], [-1e4, 1e4]])])
    users = [0, 0, 0, 0, 1, 1, 1, 1, 0, 1]
    examples = [example(i, u, "ab"[u]) for i, u in enumerate(users)]
    config = load_config(overrides=["em.label_smoothing=0.3", "em.beta=0.5", "experts.num_experts=2"])
    gate = Router(FixedGate(2, weights=torch.tensor([0.7, 0.3]), learnable=False), "fixed", "user")
    run = SimpleNamespace(
        config=config, bank=TableBank(h), gate=gate, model=user_bt_model, tokenizer=SimpleNamespace(pad_token_id=0)
    )
    metrics, details = evaluate(run, examples[:8], examples[8:])
    logits = torch.log(torch.tensor([[0.7, 0.3], [0.7, 0.3]]))
    expected = user_responsibilities(h[:8].double(), logits.double(), 0.5, torch.tensor(users[:8]), 0.3)
    assert torch.allclose(details["user_responsibilities"].double(), expected, atol=1e-5)
    without = user_responsibilities(h[:8], logits, 0.5, torch.tensor(users[:8]))
    assert (without - expected.float()).abs().max() > 1e-2  # smoothing matters on these margins
    q = expected.float()
    nll = -torch.logsumexp(q.log() + log_likelihood(h[8:], 0.5, 0.3), -1).mean()
    assert abs(metrics["eval/mixture_nll"] - float(nll)) < 1e-4 and metrics["eval/mixture_nll"] < 5


def test_an_annotator_without_training_pairs_gets_the_gate_prior():
    torch.manual_seed(1)
    h = torch.randn(6, 2) * 3
    examples = [example(i, u, None) for i, u in enumerate([0, 0, 1, 1, 2, 2])]  # annotator 2: held out only
    config = load_config(overrides=["em.beta=0.5", "experts.num_experts=2"])
    gate = Router(FixedGate(2, weights=torch.tensor([0.7, 0.3]), learnable=False), "fixed", "user")
    run = SimpleNamespace(
        config=config, bank=TableBank(h), gate=gate, model=user_bt_model, tokenizer=SimpleNamespace(pad_token_id=0)
    )
    _, details = evaluate(run, examples[:4], [examples[1], examples[4], examples[5]])
    assert torch.allclose(details["weights"][1:], torch.tensor([[0.7, 0.3]] * 2), atol=1e-6)
    assert torch.allclose(details["weights"][0], details["user_responsibilities"][0])


def test_user_scope_router_reads_each_annotators_own_features():
    """Pairs of annotators [1, 0, 1, 2] with distinct feature rows: row u of the logits uses annotator u's."""
    from moedpo.models import UserGate

    net = UserGate(3, num_users=0, user_feature_dim=2, hidden=4)
    router = Router(net, "user", "user", user_features=True)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [5.0, -5.0]])  # annotator 1, 0, 1, 2
    batch = {"user": torch.tensor([1, 0, 1, 2]), "user_features": features}
    logits, extra = router.logits(batch, None)
    own = {1: features[0], 0: features[1], 2: features[3]}
    expected = torch.stack([net(user_features=own[u].unsqueeze(0))[0] for u in (0, 1, 2)])
    assert torch.allclose(logits, expected) and extra["user_index"].tolist() == [1, 0, 1, 2]


def test_ari_comes_with_its_confidence_and_only_for_data_with_groups():
    """Near-uniform posteriors: ARI may read 1.0, but eval/posterior_confidence shows they are ~0.5; held-out data
    without a group column gets no ARI (before: the training annotators' ARI was reported for any data)."""
    h = torch.tensor([[0.01, 0.0], [0.01, 0.0], [0.0, 0.01], [0.0, 0.01]] * 2)
    users = [0, 0, 1, 1, 0, 0, 1, 1]
    labelled = [example(i, u, "ab"[u]) for i, u in enumerate(users)]
    config = load_config(overrides=["em.beta=0.5", "experts.num_experts=2"])
    gate = Router(FixedGate(2, learnable=False), "fixed", "user")
    run = SimpleNamespace(
        config=config, bank=TableBank(h), gate=gate, model=user_bt_model, tokenizer=SimpleNamespace(pad_token_id=0)
    )
    metrics, _ = evaluate(run, labelled[:4], labelled[4:])
    assert metrics["eval/ari"] == 1.0 and metrics["eval/posterior_confidence"] < 0.51
    unlabelled = [example(i, u, None) for i, u in enumerate(users)]
    metrics, _ = evaluate(run, labelled[:4], unlabelled[4:])
    assert "eval/ari" not in metrics and "eval/posterior_confidence" not in metrics
