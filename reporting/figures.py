"""Figures shared by the per-trial artifacts and the study report (matplotlib, Agg, no pyplot).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so figures can
be made in worker processes and threads without touching a GUI backend or global state; save
them with :func:`save_png`. The figures carry titles, axis labels and (for class-coloured plots)
a class legend.

Two kinds of helpers:

- plotting: :func:`learning_curves`, :func:`image_rows`, :func:`interpolation_strip`,
  :func:`tsne_panels`;
- computing what the report's figures show from a trained :class:`models.training.Run`:
  :func:`reconstructions`, :func:`interpolate`, :func:`tsne_embedding`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.utils import make_grid

DPI = 90
ACCURACY_METRICS = ("knn_accuracy", "val_accuracy")
METRIC_LABELS = {
    "knn_accuracy": "kNN accuracy (val)",
    "val_accuracy": "classifier accuracy (val)",
    "val_mae": "reconstruction MAE (val)",
}


def new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    """A pyplot-free figure; ``layout="constrained"`` where fixed margins do not fit."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


# ---- learning curves -------------------------------------------------------------------


def _as_dict(entry: Any) -> dict[str, Any]:
    if isinstance(entry, dict):
        return entry
    return {k: getattr(entry, k) for k in ("phase", "epoch", "epochs", "train_loss", "metrics")}


def learning_curves(curve: Sequence[Any], title: str) -> Figure:
    """Training loss and validation metrics per epoch, one line per phase.

    ``curve`` holds :class:`~models.training.EpochReport` objects or their dicts (the trial's
    ``curve`` user attr). Panels: training loss; accuracies (kNN and classifier, in %); and
    reconstruction MAE where present.
    """
    rows = [_as_dict(c) for c in curve]
    has_mae = any("val_mae" in r.get("metrics", {}) for r in rows)
    panels = 3 if has_mae else 2
    fig = new_figure(4.2 * panels, 3.4)
    # Fixed margins: a layout engine would double the drawing cost of this per-trial figure.
    fig.subplots_adjust(left=0.22 / panels, right=0.98, bottom=0.15, top=0.8, wspace=0.32)
    axes = fig.subplots(1, panels)
    fig.suptitle(title)
    phases = [p for p in ("pretrain", "probe") if any(r["phase"] == p for r in rows)]
    for phase in phases:
        pts = sorted((r for r in rows if r["phase"] == phase), key=lambda r: r["epoch"])
        epochs = [r["epoch"] for r in pts]
        axes[0].plot(epochs, [r["train_loss"] for r in pts], marker="o", label=phase)
        for metric in ACCURACY_METRICS:
            values = [(r["epoch"], r["metrics"][metric]) for r in pts if metric in r["metrics"]]
            if values:
                axes[1].plot(
                    [e for e, _ in values],
                    [100 * v for _, v in values],
                    marker="o",
                    label=f"{phase}: {METRIC_LABELS[metric]}",
                )
        if has_mae:
            values = [
                (r["epoch"], r["metrics"]["val_mae"]) for r in pts if "val_mae" in r["metrics"]
            ]
            if values:
                axes[2].plot(
                    [e for e, _ in values], [v for _, v in values], marker="o", label=phase
                )
    axes[0].set(title="training loss", xlabel="epoch", ylabel="loss")
    axes[1].set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if has_mae:
        axes[2].set(title="validation reconstruction", xlabel="epoch", ylabel="MAE")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    if not rows:
        axes[0].text(0.5, 0.5, "no epoch finished", ha="center", transform=axes[0].transAxes)
    return fig


# ---- image grids -----------------------------------------------------------------------


def mosaic(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of (N,C,H,W) images in [0,1] (same N) tiled into one (H', W'[, 3]) image.

    ``pad`` white pixels between images, none around them; grey images stay one channel.
    """
    images = torch.from_numpy(np.concatenate([np.asarray(r, dtype=np.float32) for r in rows]))
    grid = make_grid(images.clamp(0.0, 1.0), nrow=len(rows[0]), padding=pad, pad_value=1.0)
    grid = grid[:, pad:-pad, pad:-pad] if pad else grid  # make_grid also pads the border
    return grid[0].numpy() if images.shape[1] == 1 else grid.permute(1, 2, 0).numpy()


def _mosaic_axes(
    fig: Figure,
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str],
    column_labels: Sequence[str] | None,
    pad: int = 2,
) -> Any:
    """One axes showing the tiled rows, labelled per row (y) and per column (x)."""
    ax = fig.add_subplot(1, 1, 1)
    left = 1.15 / fig.get_figwidth() if row_labels else 0.01  # room for the row labels
    fig.subplots_adjust(left=left, right=0.99, bottom=0.12, top=0.85)
    tiled = mosaic(rows, pad)
    ax.imshow(tiled, cmap="gray" if tiled.ndim == 2 else None, vmin=0.0, vmax=1.0)
    h, w = rows[0].shape[2:4]
    if row_labels:
        ax.set_yticks([r * (h + pad) + h / 2 for r in range(len(rows))], list(row_labels))
    else:
        ax.set_yticks([])
    if column_labels:
        ax.set_xticks(
            [c * (w + pad) + w / 2 for c in range(len(column_labels))],
            list(column_labels),
            fontsize="small",
        )
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return ax


def image_rows(
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str],
    title: str,
    column_labels: Sequence[str] | None = None,
) -> Figure:
    """Rows of images ((N,C,H,W) in [0,1], same N), e.g. originals over reconstructions."""
    n = len(rows[0])
    fig = new_figure(max(1.1 * n + 1.6, 5.0), 1.15 * len(rows) + 0.7)
    _mosaic_axes(fig, rows, row_labels, column_labels)
    fig.suptitle(title, fontsize="medium")
    return fig


def interpolation_strip(
    start: np.ndarray, decoded: np.ndarray, end: np.ndarray, alphas: Sequence[float], title: str
) -> Figure:
    """Image A, the decoded interpolation steps, image B (all (C,H,W)/(N,C,H,W) in [0,1])."""
    steps = len(decoded)
    row = np.concatenate([start[None], decoded, end[None]])
    labels = ["image A", *(f"\u03b1={a:.2f}" for a in alphas), "image B"]
    fig = new_figure(1.05 * (steps + 2) + 1.0, 2.3)
    ax = _mosaic_axes(fig, [row], [], labels)
    ax.set_xlabel(
        "A and B are the test images; between them, the decoder's output for "
        "(1-\u03b1)\u00b7z_A + \u03b1\u00b7z_B"
    )
    fig.suptitle(title, fontsize="medium")
    return fig


def tsne_panels(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]], classes: Sequence[str]
) -> Figure:
    """One scatter per (title, 2-d points, labels), coloured by class with one shared legend."""
    count = len(panels)
    cols = min(count, 2)
    rows = math.ceil(count / cols)
    fig = new_figure(5.0 * cols + 1.4, 4.6 * rows, layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    handles = []
    for ax, (title, points, labels) in zip(axes, panels, strict=False):
        for k, name in enumerate(classes):
            mask = labels == k
            if not mask.any():
                continue
            handle = ax.scatter(
                points[mask, 0], points[mask, 1], s=6, color=cmap(k % cmap.N), label=str(name)
            )
            if len(handles) < len(classes) and str(name) not in [h.get_label() for h in handles]:
                handles.append(handle)
        ax.set(title=title, xlabel="t-SNE 1", ylabel="t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[count:]:
        ax.set_visible(False)
    handles.sort(key=lambda h: list(map(str, classes)).index(h.get_label()))
    fig.legend(handles=handles, title="class", loc="outside right center", markerscale=2.5)
    fig.suptitle("t-SNE of the test set, coloured by class")
    return fig


# ---- what a trained run shows ----------------------------------------------------------


def to_unit(run: Any, x: torch.Tensor) -> np.ndarray:
    """Network-space images (normalized for CIFAR) -> numpy (N,C,H,W) in [0,1]."""
    return run.splits.denormalize(x.float()).clamp(0, 1).cpu().numpy()


@torch.inference_mode()
def reconstructions(run: Any, x_uint8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Originals and their autoencoder reconstructions, both (N,C,H,W) in [0,1]."""
    with run.eval_mode(run.nets.encoder, run.nets.decoder):
        x = run.prepare_images(x_uint8.to(run.device))
        recon = run.nets.decoder(run.nets.encoder(x))
    return to_unit(run, x), to_unit(run, recon)


@torch.inference_mode()
def interpolate(
    run: Any, a_uint8: torch.Tensor, b_uint8: torch.Tensor, steps: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """Decode ``steps`` points on the line between the latents of images A and B.

    Returns (A, decoded steps (steps,C,H,W), B, alphas); images in [0,1].
    """
    with run.eval_mode(run.nets.encoder, run.nets.decoder):
        pair = run.prepare_images(torch.stack([a_uint8, b_uint8]).to(run.device))
        z = run.nets.encoder(pair).float()
        alphas = torch.linspace(0.0, 1.0, steps, device=z.device)
        path = (1 - alphas)[:, None] * z[0] + alphas[:, None] * z[1]
        decoded = run.nets.decoder(path)
    unit = to_unit(run, pair)
    return unit[0], to_unit(run, decoded), unit[1], [float(a) for a in alphas]


def pick_two_classes(y: torch.Tensor, seed: int = 0) -> tuple[int, int]:
    """Indices of two test images of different classes (chosen with a fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    first = int(order[0])
    for idx in order[1:]:
        if int(y[idx]) != int(y[first]):
            return first, int(idx)
    return first, int(order[1]) if len(order) > 1 else first


def sample_indices(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``min(n, k)`` distinct indices in ``range(n)``, drawn with a fixed seed, sorted."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(n, k)].sort().values


def tsne_embedding(features: np.ndarray, seed: int = 0, threads: int | None = None) -> np.ndarray:
    """2-d t-SNE of ``features`` (N, D), N >= 5; PCA to 50 dims first when D is larger.

    ``threads`` caps the BLAS/OpenMP threads; by default one thread below 1000 points, where
    more threads only spin against each other (or against training in the same process).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    if np.isfinite(x).all() and np.ptp(x, axis=0).max(initial=0.0) == 0.0:
        # Every point the same (a collapsed encoder): t-SNE's PCA start would divide by a zero
        # spread, and the Barnes-Hut step then crashes the process; they all sit at one point.
        return np.zeros((len(x), 2), dtype=np.float32)
    limit = threads if threads is not None else (1 if len(x) < 1000 else None)
    with threadpool_limits(limits=limit):
        if x.shape[1] > 50 and len(x) > 50:
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500
        ).fit_transform(x)
