"""Contrastive loss: SimCLR's NT-Xent (normalized temperature-scaled cross entropy).

Losses and metrics are computed in float32 even inside an autocast region: at a low
temperature, bf16 cosine similarities shift the loss by a fraction of a percent.
:func:`full_precision` is the region they run in.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from models.config import check_temperature


def full_precision(device_type: str) -> contextlib.AbstractContextManager[object]:
    """A region where autocast is off for ``device_type`` (cpu, cuda, ...): ops run in the
    dtype of their inputs, so float32 inputs give float32 results."""
    return torch.autocast(device_type=device_type, enabled=False)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent over the 2N views of a batch; ``z1[i]`` and ``z2[i]`` are a positive pair.

    The 2N embeddings are L2-normalized; for each view the logits are its cosine similarities
    to the other 2N-1 views divided by ``temperature``, the target is its pair, and the loss is
    the cross entropy averaged over all 2N views. It is computed in float32 (float64 inputs in
    float64), autocast or not.
    """
    t = check_temperature(temperature)
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1, z2: need two (N, D) tensors of the same shape, got {tuple(z1.shape)} "
            f"and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    if n < 1:
        raise ValueError("z1, z2: need at least one pair")
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    with full_precision(z1.device.type):
        z = F.normalize(torch.cat([z1.to(dtype), z2.to(dtype)], dim=0), dim=1)
        logits = z @ z.T / t
        # A view is trivially most similar to itself; -inf drops it from the softmax denominator.
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        # View i (< N) pairs with i + N, and view i + N with i.
        targets = torch.arange(2 * n, device=z.device).roll(n)
        return F.cross_entropy(logits, targets)
