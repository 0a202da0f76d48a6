"""LARS as SimCLR uses it: the trust ratio always applied to weights, never to biases or norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.config import OptimConfig
from models.optim import build_optimizer

TRUST = 0.001  # timm's default trust coefficient, SimCLR's eta


def one_step(name: str, weight_decay: float, lr: float = 2.0) -> tuple[nn.Module, dict, dict]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optim = build_optimizer(
        net.parameters(), OptimConfig(name=name, lr=lr, momentum=0.9, weight_decay=weight_decay)
    )
    loss = net(torch.randn(8, 3, 4, 4)).square().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    optim.step()
    updates = {n: (before[n] - p.detach()) for n, p in net.named_parameters()}
    return net, before, {"grads": grads, "updates": updates}


@pytest.mark.parametrize("weight_decay", [0.0, 1e-6])
def test_a_lars_step_is_not_sgd_even_at_weight_decay_0(weight_decay: float) -> None:
    _, _, lars = one_step("lars", weight_decay)
    _, _, sgd = one_step("sgd", weight_decay)
    for name in ("0.weight", "3.weight"):
        ratio = lars["updates"][name].norm() / sgd["updates"][name].norm()
        assert ratio < 0.1, (name, float(ratio))  # adapted: far smaller than SGD's at lr 2


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_the_lars_step_matches_the_update_computed_by_hand(weight_decay: float) -> None:
    lr = 2.0
    _, before, lars = one_step("lars", weight_decay, lr)
    for name, w in before.items():
        g = lars["grads"][name]
        if w.ndim > 1:  # weights: trust ratio and weight decay
            ratio = TRUST * w.norm() / (g.norm() + w.norm() * weight_decay + 1e-8)
            expected = lr * ratio * (g + weight_decay * w)
        else:  # biases and BatchNorm parameters: plain SGD, no weight decay
            expected = lr * g
        torch.testing.assert_close(lars["updates"][name], expected, rtol=1e-5, atol=1e-7)
