"""Optimizers and learning-rate schedules the report tried: Adam, SGD with momentum, LARS.

LARS is timm's implementation, configured as SimCLR uses it: the layer-wise trust ratio is always
applied to weights (timm applies it only when weight decay is non-zero unless ``always_adapt``),
and biases and normalization parameters (every 1-D parameter) are excluded from both the
adaptation and weight decay. The schedule steps once per epoch: optional LinearLR warm-up
(the report used 10 epochs before LARS' cosine), then CosineAnnealingLR over the remaining
epochs, or a constant rate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from models.config import OptimConfig, check_optim


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, key: str = "optim"
) -> torch.optim.Optimizer:
    """Create the optimizer named by ``cfg.name`` for ``params``; ``key`` names ``cfg`` in
    error messages (``train.optim``, ``train.probe.optim``)."""
    check_optim(cfg, key)
    params = list(params)
    if cfg.name == "adam":
        # On CUDA the fused kernel updates every tensor in one launch (the loop's per-step
        # launches are what bounds a small model); the state dict is the same either way.
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.name == "lars":
        from timm.optim import Lars  # timm is slow to import; only LARS runs need it

        weights = [p for p in params if p.ndim > 1]
        excluded = [p for p in params if p.ndim <= 1]  # biases, BatchNorm scales and shifts
        groups = [
            {"params": weights, "weight_decay": cfg.weight_decay, "always_adapt": True},
            # Weight decay 0 and always_adapt False: plain SGD with momentum for these.
            {"params": excluded, "weight_decay": 0.0, "always_adapt": False},
        ]
        return Lars([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum)
    raise AssertionError(cfg.name)  # pragma: no cover - check_optim allows only the above


# Settings of a parameter group that pick a kernel for this device, not the training's maths.
_DEVICE_SETTINGS = ("fused", "foreach", "capturable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the kernel settings :func:`build_optimizer`
    chose for this device: a checkpoint written on a CPU worker carries ``fused=False``, which
    would otherwise cost a CUDA worker that continues it the fused Adam kernel (and one from a
    GPU would ask a CPU worker for it). The moments and step counts are the same either way.

    The settings go into the state before it is loaded: torch places each parameter's step
    count by the loaded group's settings (on the parameter's device for a fused kernel, which
    takes nothing else), so set afterwards a fused kernel would be handed CPU step counts.
    """
    chosen = [{k: g[k] for k in _DEVICE_SETTINGS if k in g} for g in optimizer.param_groups]
    groups = state["param_groups"]
    if len(groups) != len(chosen):  # load_state_dict's own error names the mismatch
        optimizer.load_state_dict(state)
        return
    optimizer.load_state_dict(
        {**state, "param_groups": [{**g, **c} for g, c in zip(groups, chosen, strict=True)]}
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, key: str = "optim"
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: ``warmup_epochs`` of LinearLR, then cosine or constant. A warm-up as
    long as ``epochs`` or longer ends one epoch before it (a study file refuses such a fixed
    value; a searched range may reach it, its top values then train alike)."""
    check_optim(cfg, key)
    warmup = min(max(cfg.warmup_epochs, 0), max(epochs - 1, 0))
    rest = max(epochs - warmup, 1)
    if cfg.schedule == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=rest)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
