"""LARS as SimCLR uses it: the trust ratio always applied to weights, never to biases or norms."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from models.config import OptimConfig
from models.optim import build_optimizer, build_scheduler

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


# ---- the schedule's exact rates ---------------------------------------------------------


def _rates(epochs: int, warmup: int, schedule: str = "cosine") -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(name="sgd", lr=1.0, schedule=schedule, warmup_epochs=warmup)
    opt = build_optimizer([param], cfg)
    sched = build_scheduler(opt, cfg, epochs=epochs)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_from_1_over_w_plus_1_then_cosine_over_the_rest() -> None:
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # 4 epochs after warm-up
    assert _rates(6, 2) == pytest.approx([1 / 3, 2 / 3, *cosine])


def test_a_warmup_as_long_as_the_budget_still_ends_at_the_full_rate() -> None:
    assert _rates(3, 5, "none") == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_a_resumed_optimizer_keeps_the_kernel_chosen_for_this_device() -> None:
    """A checkpoint written on a CPU worker (fused=False) continued on a CUDA worker keeps the
    fused Adam kernel, and one from a GPU (fused=True) does not force it on a CPU: the state
    (moments, step) is loaded, the kernel settings stay this optimizer's. Played on the CPU
    with both settings built by hand, as a GPU's would be."""
    from models.optim import load_optimizer_state

    def adam(fused: bool) -> torch.optim.Adam:
        layer = nn.Linear(3, 2)
        torch.manual_seed(0)
        for p in layer.parameters():
            p.data.normal_()
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, fused=fused)
        layer(torch.ones(4, 3)).sum().backward()
        optimizer.step()
        return optimizer

    written_on_cpu, on_gpu = adam(fused=False), adam(fused=True)
    load_optimizer_state(on_gpu, written_on_cpu.state_dict())
    assert on_gpu.param_groups[0]["fused"] is True
    assert on_gpu.state_dict()["state"][0]["exp_avg"].equal(
        written_on_cpu.state_dict()["state"][0]["exp_avg"]
    )
    on_cpu = adam(fused=False)
    load_optimizer_state(on_cpu, adam(fused=True).state_dict())
    assert on_cpu.param_groups[0]["fused"] is False


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ),
    ],
)
def test_a_checkpoint_written_on_a_cpu_worker_continues_with_the_fused_kernel(device: str) -> None:
    """Continued where Adam is fused (a CUDA worker; on the CPU, fused Adam built by hand), the
    step after loading a CPU worker's state runs (a fused kernel takes step counts on the
    parameters' device only) and takes the same step the CPU worker would have."""
    from models.optim import load_optimizer_state

    def layer_on(where: str) -> nn.Linear:
        torch.manual_seed(0)
        return nn.Linear(3, 2).to(where)

    x = torch.ones(4, 3)
    written = layer_on("cpu")
    cpu_adam = torch.optim.Adam(written.parameters(), lr=0.1, fused=False)
    written(x).sum().backward()
    cpu_adam.step()
    saved = {k: v.clone() for k, v in written.state_dict().items()}
    state = torch.load(_roundtrip(cpu_adam.state_dict()), weights_only=True, map_location="cpu")

    continued = layer_on(device)
    continued.load_state_dict(saved)
    fused = torch.optim.Adam(continued.parameters(), lr=0.1, fused=True)
    load_optimizer_state(fused, state)
    assert fused.param_groups[0]["fused"] is True
    for name, p in (("weight", continued.weight), ("bias", continued.bias)):
        assert fused.state[p]["step"].device == p.device, name
    continued(x.to(device)).sum().backward()
    fused.step()
    cpu_adam.zero_grad()
    written(x).sum().backward()
    cpu_adam.step()
    assert torch.allclose(continued.weight.detach().cpu(), written.weight.detach(), atol=1e-6)


def _roundtrip(state: dict) -> io.BytesIO:
    """``state`` as a checkpoint file holds it (saved, to be read back)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
