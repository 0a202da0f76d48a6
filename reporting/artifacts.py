"""Per-trial figures in Optuna's artifact store, for optuna-dashboard and the report.

Artifacts can only be attached to a *running* trial, so :func:`make_trial_artifact_hook` builds a
:class:`search.objective.TrialRunner` hook that runs just before a trial returns and uploads:

- every trial: ``learning_curves.png`` (training loss and validation metrics per epoch);
- autoencoder trials: ``val_reconstructions.png`` (validation images over their reconstructions);
- the final trial additionally: ``test_reconstructions.png`` and ``interpolation.png``
  (autoencoder), and ``tsne.png``: t-SNE of (at most ``TRIAL_TSNE_POINTS``) test images in the
  trial's latent space, coloured by class (the report adds raw image space and other tasks).

A final trial's learning curves start with the pretraining of the promoted trial it continues,
which the objective passes to the hooks as ``extra["source_trial"]``.

The store is a plain folder (``<runs_dir>/artifacts`` by default); each upload is recorded in
the trial's system attrs (``artifacts:<id>``), which is how optuna-dashboard finds it::

    optuna-dashboard sqlite:///runs/ssl-search.db --artifact-dir runs/artifacts

A figure that cannot be made never fails the trial: the reason is kept in the trial's
``artifact_error`` user attr and logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from reporting import figures
from search import TrialHook

_LOG = logging.getLogger(__name__)
ARTIFACT_ATTR_PREFIX = "artifacts:"  # how optuna records an upload in system attrs
RECONSTRUCTION_COUNT = 8  # validation images per trial in the reconstruction grid
TRIAL_TSNE_POINTS = 500  # test images in the final trial's t-SNE of its latent space, at most


def artifact_store(artifacts_dir: str | Path) -> FileSystemArtifactStore:
    """The file-system artifact store at ``artifacts_dir`` (created when missing)."""
    path = Path(artifacts_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(path)


def upload_file(
    trial: optuna.Trial | optuna.trial.FrozenTrial, store: FileSystemArtifactStore, path: Path
) -> str:
    """Upload one file to ``store`` as an artifact of the running ``trial``; its artifact id."""
    return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)


def upload_figure(
    trial: optuna.Trial | optuna.trial.FrozenTrial,
    store: FileSystemArtifactStore,
    fig: Any,
    filename: str,
) -> str:
    """Save a matplotlib figure as PNG named ``filename`` and upload it; the artifact id."""
    with tempfile.TemporaryDirectory(prefix="ssl-artifact-") as tmp:
        path = figures.save_png(fig, Path(tmp) / filename)
        return upload_file(trial, store, path)


def trial_artifacts(trial: optuna.trial.FrozenTrial) -> dict[str, str]:
    """filename -> artifact id of the artifacts recorded on a trial (read from system attrs)."""
    out: dict[str, str] = {}
    for key, value in trial.system_attrs.items():
        if key.startswith(ARTIFACT_ATTR_PREFIX):
            meta = json.loads(value) if isinstance(value, str) else value
            out[meta["filename"]] = meta["artifact_id"]
    return out


def _pretrain_curve(trial: optuna.trial.FrozenTrial | None) -> list[dict[str, Any]]:
    """The pretrain epochs of a trial's curve (none for None)."""
    if trial is None:
        return []
    return [c for c in trial.user_attrs.get("curve", []) if c["phase"] == "pretrain"]


def trial_figures(trial: optuna.Trial, run: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """filename -> matplotlib figure for one trial (see the module docstring)."""
    attrs = trial.user_attrs
    stage = attrs.get("stage", "")
    study = trial.study.study_name
    curve = list(attrs.get("curve") or [])
    if not curve and extra.get("history"):
        curve = list(extra["history"])
    if stage == "final":
        source = _pretrain_curve(extra.get("source_trial"))
        curve = source + [c for c in curve if _phase(c) == "probe"]
    out: dict[str, Any] = {
        "learning_curves.png": figures.learning_curves(
            curve, f"{study} trial #{trial.number}: learning curves ({run.task})"
        )
    }
    splits = run.splits
    if run.task == "autoencoder" and len(splits.val_x):
        idx = figures.sample_indices(len(splits.val_x), RECONSTRUCTION_COUNT)
        originals, recon = figures.reconstructions(run, splits.val_x[idx.to(splits.val_x.device)])
        out["val_reconstructions.png"] = figures.image_rows(
            [originals, recon],
            ["original", "reconstruction"],
            f"{study} trial #{trial.number}: validation images over their reconstructions",
        )
    if stage == "final":
        out.update(final_figures(run, f"{study} trial #{trial.number}"))
    return out


def _phase(entry: Any) -> str:
    return entry["phase"] if isinstance(entry, dict) else entry.phase


def final_figures(run: Any, label: str, tsne_points: int = TRIAL_TSNE_POINTS) -> dict[str, Any]:
    """The report's figures on the test set for a trained run (those cheap enough for a hook).

    ``tsne_points`` below 5 leaves the t-SNE out.
    """
    splits = run.splits
    out: dict[str, Any] = {}
    n_test = len(splits.test_y)
    if run.task == "autoencoder" and n_test >= 2:
        idx = figures.sample_indices(n_test, 5)
        originals, recon = figures.reconstructions(run, splits.test_x[idx.to(splits.test_x.device)])
        out["test_reconstructions.png"] = figures.image_rows(
            [originals, recon],
            ["original", "reconstruction"],
            f"{label}: 5 test images over their reconstructions",
        )
        a, b = figures.pick_two_classes(splits.test_y.cpu())
        start, decoded, end, alphas = figures.interpolate(run, splits.test_x[a], splits.test_x[b])
        out["interpolation.png"] = figures.interpolation_strip(
            start,
            decoded,
            end,
            alphas,
            f"{label}: linear interpolation between two test images' latents, decoded",
        )
    if tsne_points >= 5 and n_test >= 5:
        idx = figures.sample_indices(n_test, tsne_points)
        labels = splits.test_y[idx.to(splits.test_y.device)].cpu().numpy()
        latent = run.embed(splits.test_x[idx.to(splits.test_x.device)]).cpu().numpy()
        title = f"{run.task} latent space ({len(idx)} test images)"
        out["tsne.png"] = figures.tsne_panels(
            [(title, figures.tsne_embedding(latent), labels)], splits.classes
        )
    return out


def make_trial_artifact_hook(artifacts_dir: str | Path) -> TrialHook:
    """A TrialRunner hook uploading the trial's figures to the store at ``artifacts_dir``."""
    store = artifact_store(artifacts_dir)

    def hook(trial: optuna.Trial, run: Any, tcfg: Any, extra: dict[str, Any]) -> None:  # noqa: ARG001
        started = time.perf_counter()
        try:
            for filename, fig in trial_figures(trial, run, extra).items():
                upload_figure(trial, store, fig, filename)
        except Exception as error:  # a figure must never cost a trained trial
            reason = f"{type(error).__name__}: {error}"[:500]
            _LOG.warning("trial %d: artifacts not uploaded: %s", trial.number, reason)
            with contextlib.suppress(Exception):  # the storage itself may be the problem
                trial.set_user_attr("artifact_error", reason)
        finally:
            with contextlib.suppress(Exception):
                trial.set_user_attr("artifact_seconds", time.perf_counter() - started)

    return hook
