"""What a step logs, by hand: TRL's ``logps/chosen`` / ``logps/rejected`` for a mixture (posterior-weighted over
experts) and per expert, from the step's sums over micro-batches."""

from types import SimpleNamespace

import pytest
import torch

from moedpo.inference.metrics import routed_record, step_record, summarise

CHOSEN = torch.tensor([[-3.0, -5.0], [-2.0, -4.0]])  # log pi_k(y+|x), (B, K)
REJECTED = torch.tensor([[-6.0, -4.0], [-7.0, -1.0]])
Q = torch.tensor([[0.75, 0.25], [0.5, 0.5]])  # responsibilities


def _record(rows):
    out = {
        "chosen_logps": CHOSEN[rows],
        "rejected_logps": REJECTED[rows],
        "ref_chosen_logps": torch.tensor([-4.0, -3.0])[rows],
        "ref_rejected_logps": torch.tensor([-5.0, -5.0])[rows],
    }
    e = SimpleNamespace(gate_q=Q[rows], pair_q=Q[rows], post=SimpleNamespace(log_evidence=torch.tensor(-1.0)))
    h = torch.tensor([[2.0, -2.0], [3.0, -5.0]])[rows]
    return step_record(e, out, h, torch.zeros(len(rows), 2), beta=0.5, shift=0.0)


@pytest.mark.parametrize("micro_batches", [[[0, 1]], [[0], [1]]])
def test_logps_are_posterior_weighted_means_over_experts(micro_batches):
    """Pair 0: 0.75 * -3 + 0.25 * -5 = -3.5; pair 1: 0.5 * -2 + 0.5 * -4 = -3; mean -3.25.
    Rejected: 0.75 * -6 + 0.25 * -4 = -5.5 and 0.5 * -7 + 0.5 * -1 = -4; mean -4.75.
    Per expert: chosen (-3 - 2) / 2 = -2.5 and (-5 - 4) / 2 = -4.5; rejected -6.5 and -2.5."""
    metrics = summarise([_record(rows) for rows in micro_batches])
    assert metrics["logps/chosen"] == pytest.approx(-3.25)
    assert metrics["logps/rejected"] == pytest.approx(-4.75)
    assert metrics["expert_0/logps/chosen"] == pytest.approx(-2.5)
    assert metrics["expert_1/logps/chosen"] == pytest.approx(-4.5)
    assert metrics["expert_0/logps/rejected"] == pytest.approx(-6.5)
    assert metrics["expert_1/logps/rejected"] == pytest.approx(-2.5)
    # the neighbours keep their names: beta * mean log-ratio, and per-expert accuracy
    assert metrics["expert_0/rewards/chosen"] == pytest.approx(0.5 * ((-3 + 4) + (-2 + 3)) / 2)
    assert metrics["expert_1/rewards/accuracies"] == 0.0 and metrics["expert_0/rewards/accuracies"] == 1.0


def test_a_routed_step_logs_the_drawn_experts_logps():
    """Pair 0 drawn to expert 1 (-5, rejected -4), pair 1 to expert 0 (-2, rejected -7): means -3.5 and -5.5."""
    route = torch.tensor([1, 0])
    out = {"chosen_logps": CHOSEN * torch.eye(2)[route], "rejected_logps": REJECTED * torch.eye(2)[route]}
    record = routed_record(torch.eye(2)[route], route, route, torch.zeros(2, 2), torch.zeros(2, 2), -1.0, out)
    metrics = summarise([record])
    assert metrics["logps/chosen"] == pytest.approx(-3.5) and metrics["logps/rejected"] == pytest.approx(-5.5)
    assert "expert_0/logps/chosen" not in metrics
