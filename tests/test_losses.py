"""NT-Xent against a loop-by-loop reference, its ordering on easy/hard pairs, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import nt_xent


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's loss written out view by view: -log(exp(s_ip/t) / sum_{k != i} exp(s_ik/t))."""
    views = [v.double() for v in torch.cat([z1, z2]).unbind(0)]
    n2 = len(views)
    n = n2 // 2

    def sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.dot(a, b) / (a.norm() * b.norm())

    total = torch.zeros((), dtype=torch.float64)
    for i in range(n2):
        pos = (i + n) % n2
        denom = torch.zeros((), dtype=torch.float64)
        for k in range(n2):
            if k != i:
                denom = denom + torch.exp(sim(views[i], views[k]) / t)
        total = total - torch.log(torch.exp(sim(views[i], views[pos]) / t) / denom)
    return total / n2


# n >= 2: with a single pair there are no negatives and the loss is 0 for any input, so
# (1, d) cannot tell a right implementation from a wrong one (see test_single_pair_is_zero).
@pytest.mark.parametrize("temperature", [0.5, 0.15])
@pytest.mark.parametrize(("n", "d"), [(6, 16), (2, 4), (3, 2)])
def test_matches_reference(temperature: float, n: int, d: int) -> None:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64)
    expected = reference_nt_xent(z1, z2, temperature)
    assert expected.item() > 0.1  # far from the trivial 0 of a single pair
    torch.testing.assert_close(nt_xent(z1, z2, temperature), expected)


@pytest.mark.parametrize("temperature", [0.5, 0.15])
def test_orthonormal_pairs_closed_form(temperature: float) -> None:
    # Two identical pairs along orthogonal axes: each view's positive has similarity 1, its two
    # negatives 0, so every term is -log(e^(1/t) / (e^(1/t) + 2)) = log(1 + 2 e^(-1/t)).
    z = torch.eye(2, dtype=torch.float64)
    expected = math.log(1 + 2 * math.exp(-1 / temperature))
    assert nt_xent(z, z.clone(), temperature).item() == pytest.approx(expected, rel=1e-12)
    assert reference_nt_xent(z, z.clone(), temperature).item() == pytest.approx(expected, rel=1e-12)
    # Swapping the second views makes every positive a negative: similarity 0 vs 1 and 0.
    swapped = math.log(1 + math.exp(1 / temperature) + 1)
    assert nt_xent(z, z.flip(0), temperature).item() == pytest.approx(swapped, rel=1e-12)


def test_single_pair_is_zero() -> None:
    # No negatives: softmax over the positive alone. A property, not a check of the formula.
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(2, 1, 4, generator=g, dtype=torch.float64)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(0.0, abs=1e-12)


def test_matches_reference_float32_close_pairs() -> None:
    # Correlated pairs, as in training, at float32.
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(8, 32, generator=g)
    z2 = z1 + 0.3 * torch.randn(8, 32, generator=g)
    expected = reference_nt_xent(z1, z2, 0.15).float()
    torch.testing.assert_close(nt_xent(z1, z2, 0.15), expected, rtol=1e-4, atol=1e-5)


def test_symmetric_and_scale_invariant() -> None:
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(2, 5, 8, generator=g)
    base = nt_xent(z1, z2, 0.5)
    torch.testing.assert_close(nt_xent(z2, z1, 0.5), base)
    # Only directions matter (L2 normalization).
    torch.testing.assert_close(nt_xent(7.0 * z1, 0.1 * z2, 0.5), base)


@pytest.mark.parametrize("temperature", [0.5, 0.15])
def test_identical_views_beat_independent_and_shuffled(temperature: float) -> None:
    g = torch.Generator().manual_seed(3)
    n, d = 16, 256
    z1 = torch.randn(n, d, generator=g)  # nearly orthogonal in 256 dims
    identical = nt_xent(z1, z1.clone(), temperature)
    independent = nt_xent(z1, torch.randn(n, d, generator=g), temperature)
    shuffled = nt_xent(z1, z1.roll(1, dims=0), temperature)  # every pair is a wrong match
    assert identical < independent
    assert identical < shuffled
    # Identical views sit near the floor -log(e^(1/t) / (e^(1/t) + 2N - 2)).
    floor = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 2 * n - 2))
    assert identical.item() == pytest.approx(floor, abs=0.1)
    # Independent views are near chance, log(2N - 1).
    assert independent.item() == pytest.approx(math.log(2 * n - 1), abs=0.3)


def test_gradient_flows_to_both_views() -> None:
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(4, 8, generator=g).requires_grad_()
    z2 = torch.randn(4, 8, generator=g).requires_grad_()
    loss = nt_xent(z1, z2, 0.5)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for z in (z1, z2):
        assert z.grad is not None
        assert torch.isfinite(z.grad).all()
        assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_rejects_bad_temperature(temperature: float) -> None:
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, temperature)


@pytest.mark.parametrize(
    ("shape1", "shape2"), [((3, 4), (2, 4)), ((3, 4), (3, 5)), ((3,), (3,)), ((2, 3, 4), (2, 3, 4))]
)
def test_rejects_bad_shapes(shape1: tuple[int, ...], shape2: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="z1, z2"):
        nt_xent(torch.randn(shape1), torch.randn(shape2), 0.5)
