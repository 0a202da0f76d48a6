"""Per-trial figures in Optuna's artifact store, for optuna-dashboard and the report.

:func:`make_trial_artifact_hook` builds a :class:`search.objective.TrialRunner` hook that runs just
before a trial returns and attaches:

- every trial: ``learning_curves.png`` (training loss and validation metrics per epoch);
- autoencoder trials: ``val_reconstructions.png`` (validation images over their reconstructions);
- the final trial additionally: ``test_reconstructions.png`` and ``interpolation.png``
  (autoencoder), and ``tsne.png``: t-SNE of (at most ``TRIAL_TSNE_POINTS``) test images in the
  trial's latent space, coloured by class (the report adds raw image space and other tasks).

A final trial's learning curves start with the pretraining of the configuration it continues,
every leg of it, which the objective passes to the hooks as ``extra["source_curve"]`` (and the
promoted trial as ``extra["source_trial"]``).

Drawing off the trial's path
----------------------------
Optuna attaches an artifact to a trial only while the trial is *running* (a finished trial's
system attrs cannot change), and optuna-dashboard 0.21 shows a trial's artifacts on that trial's
page, while study-level artifacts (``upload_artifact(study_or_trial=study)``, allowed at any
time) only appear in one list on the study's page. To keep every figure on its trial's page
without making the trial wait for matplotlib, the hook splits an upload in two:

1. in the trial (fast): whatever needs the trained networks (a few reconstructions, the final
   trial's latents and their t-SNE) is computed into plain arrays, and for each figure a small
   placeholder PNG ("being drawn") is uploaded to the running trial, which records the artifact
   id in the trial's system attrs (``artifacts:<id>``), where the dashboard and the report look;
2. in a background thread (:class:`BackgroundRenderer`): each figure is drawn and its PNG
   replaces the placeholder under the same artifact id (``ArtifactStore.write``), while the
   next trial already trains.

The thread is not a daemon and exits once its queue is empty, so a process that returns from
its main function waits for the figures still queued (the interpreter joins it before exiting);
:meth:`TrialArtifactHook.flush` waits for them explicitly (a worker loop can call it before it
returns). A process killed outright leaves the placeholders of the figures not yet drawn.

The store is a plain folder (``<runs_dir>/artifacts`` by default)::

    optuna-dashboard sqlite:///runs/ssl-search.db --artifact-dir runs/artifacts

A figure that cannot be made never fails the trial: in the trial, the reason is kept in the
trial's ``artifact_error`` user attr and logged; in the background thread (the trial has finished
by then), it is logged and the placeholder is replaced by a figure stating the error. The hook's
own time per trial is kept in the ``artifact_seconds`` user attr.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from reporting import figures
from search import learning_curve

_LOG = logging.getLogger(__name__)
ARTIFACT_ATTR_PREFIX = "artifacts:"  # how optuna records an upload in system attrs
RECONSTRUCTION_COUNT = 8  # validation images per trial in the reconstruction grid
TRIAL_TSNE_POINTS = 500  # test images in the final trial's t-SNE of its latent space, at most


def artifact_store(artifacts_dir: str | Path, create: bool = True) -> FileSystemArtifactStore:
    """The file-system artifact store at ``artifacts_dir``, its folder created when missing
    (``create``; else by the first upload: see :class:`TrialArtifactHook`)."""
    path = Path(artifacts_dir).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(path)


def upload_file(
    trial: optuna.Trial | optuna.trial.FrozenTrial, store: FileSystemArtifactStore, path: Path
) -> str:
    """Upload one file to ``store`` as an artifact of the running ``trial``; its artifact id."""
    return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (at :data:`reporting.figures.DPI`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=figures.DPI)
    return buffer.getvalue()


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


# ---- what each trial shows: data taken in the trial, drawn later -----------------------

# A figure to draw: everything it needs is already captured (plain arrays and lists, no network).
Drawing = Callable[[], Any]


def _plain(entry: Any) -> dict[str, Any]:
    """A curve entry (EpochReport or its dict) as a dict of its own (safe to keep and draw)."""
    if isinstance(entry, dict):
        return {**entry, "metrics": dict(entry.get("metrics", {}))}
    return {
        "phase": entry.phase,
        "epoch": entry.epoch,
        "epochs": entry.epochs,
        "train_loss": entry.train_loss,
        "metrics": dict(entry.metrics),
    }


def _pretrain_curve(trial: optuna.trial.FrozenTrial | None) -> list[dict[str, Any]]:
    """The pretrain epochs of a trial's curve (none for None)."""
    if trial is None:
        return []
    return learning_curve(trial.user_attrs, "pretrain")


def trial_drawings(trial: optuna.Trial, run: Any, extra: dict[str, Any]) -> dict[str, Drawing]:
    """filename -> :data:`Drawing` for one trial (see the module docstring).

    Whatever needs ``run``'s networks is computed here; the drawings only hold arrays.
    """
    attrs = trial.user_attrs
    stage = attrs.get("stage", "")
    study = trial.study.study_name
    curve = learning_curve(attrs)
    if not curve and extra.get("history"):
        curve = list(extra["history"])
    curve = [_plain(c) for c in curve]
    if stage == "final":
        # Every leg of the promoted configuration (a leg holds only the epochs it added).
        joined = extra.get("source_curve")
        if joined is None:
            joined = _pretrain_curve(extra.get("source_trial"))
        source = [_plain(c) for c in joined]
        curve = source + [c for c in curve if c["phase"] == "probe"]
    title = f"{study} trial #{trial.number}: learning curves ({run.task})"
    out: dict[str, Drawing] = {
        "learning_curves.png": lambda: figures.learning_curves(curve, title),
    }
    splits = run.splits
    if run.task == "autoencoder" and len(splits.val_x):
        idx = figures.sample_indices(len(splits.val_x), RECONSTRUCTION_COUNT)
        originals, recon = figures.reconstructions(run, splits.val_x[idx.to(splits.val_x.device)])
        label = f"{study} trial #{trial.number}: validation images over their reconstructions"
        out["val_reconstructions.png"] = lambda: figures.image_rows(
            [originals, recon], ["original", "reconstruction"], label
        )
    if stage == "final":
        out.update(final_drawings(run, f"{study} trial #{trial.number}"))
    return out


def trial_figures(trial: optuna.Trial, run: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """filename -> matplotlib figure for one trial, drawn now (:func:`trial_drawings`)."""
    return {name: draw() for name, draw in trial_drawings(trial, run, extra).items()}


def final_drawings(
    run: Any, label: str, tsne_points: int = TRIAL_TSNE_POINTS
) -> dict[str, Drawing]:
    """The report's figures on the test set for a trained run (those cheap enough for a hook),
    as :data:`Drawing` s: the reconstructions, interpolation and t-SNE are computed here.

    ``tsne_points`` below 5 leaves the t-SNE out.
    """
    splits = run.splits
    out: dict[str, Drawing] = {}
    n_test = len(splits.test_y)
    if run.task == "autoencoder" and n_test >= 2:
        idx = figures.sample_indices(n_test, 5)
        originals, recon = figures.reconstructions(run, splits.test_x[idx.to(splits.test_x.device)])
        out["test_reconstructions.png"] = lambda: figures.image_rows(
            [originals, recon],
            ["original", "reconstruction"],
            f"{label}: 5 test images over their reconstructions",
        )
        a, b = figures.pick_two_classes(splits.test_y.cpu())
        start, decoded, end, alphas = figures.interpolate(run, splits.test_x[a], splits.test_x[b])
        out["interpolation.png"] = lambda: figures.interpolation_strip(
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
        # sklearn, not matplotlib: computed in the trial (once per study), where its thread
        # limits cannot slow down the next trial's training.
        points = figures.tsne_embedding(latent)
        title = f"{run.task} latent space ({len(idx)} test images)"
        classes = splits.classes
        out["tsne.png"] = lambda: figures.tsne_panels([(title, points, labels)], classes)
    return out


def final_figures(run: Any, label: str, tsne_points: int = TRIAL_TSNE_POINTS) -> dict[str, Any]:
    """:func:`final_drawings`, drawn now: filename -> matplotlib figure."""
    return {name: draw() for name, draw in final_drawings(run, label, tsne_points).items()}


# ---- drawing in the background ---------------------------------------------------------

PLACEHOLDER_TEXT = "this figure is being drawn: reload in a moment"


def placeholder_png(text: str = PLACEHOLDER_TEXT) -> bytes:
    """A small PNG saying ``text`` (uploaded first, replaced by the figure once drawn)."""
    fig = figures.new_figure(4.0, 0.6)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize="small")
    return figure_png(fig)


@dataclass
class RenderJob:
    """One figure to draw and the artifact whose placeholder it replaces."""

    artifact_id: str
    draw: Drawing
    what: str  # for messages: "<study> trial #N learning_curves.png"


class BackgroundRenderer:
    """Draws figures in one background thread and writes each to the store by artifact id.

    The thread starts on the first :meth:`submit`, is not a daemon (the interpreter waits for it
    at exit) and ends when its queue is empty; :meth:`flush` waits until all are written.
    """

    def __init__(self, store: FileSystemArtifactStore) -> None:
        self.store = store
        self.drawn = 0  # figures written
        self.failed: list[str] = []  # "<what>: <error>" of figures that could not be drawn
        self._jobs: deque[RenderJob] = deque()
        self._pending = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Figures submitted and not yet written."""
        with self._lock:
            return self._pending

    def submit(self, job: RenderJob) -> None:
        with self._lock:
            self._jobs.append(job)
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._drain, name="artifact-renderer", daemon=False
                )
                self._thread.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted figure is written; False if ``timeout`` ran out first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    return
                job = self._jobs.popleft()
            try:
                self._render(job)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()

    def _render(self, job: RenderJob) -> None:
        try:
            png = figure_png(job.draw())
        except Exception as error:  # a figure must never take the worker down
            reason = f"{type(error).__name__}: {error}"[:500]
            _LOG.warning("%s: figure not drawn: %s", job.what, reason)
            self.failed.append(f"{job.what}: {reason}")
            with contextlib.suppress(Exception):
                png = placeholder_png(f"this figure could not be drawn: {reason[:80]}")
                self.store.write(job.artifact_id, io.BytesIO(png))
            return
        try:
            self.store.write(job.artifact_id, io.BytesIO(png))
            self.drawn += 1
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"[:500]
            _LOG.warning("%s: figure not written: %s", job.what, reason)
            self.failed.append(f"{job.what}: {reason}")


class TrialArtifactHook:
    """The :data:`search.TrialHook` of :func:`make_trial_artifact_hook` (see the module
    docstring): uploads a placeholder per figure to the running trial and leaves the drawing
    to :attr:`renderer`."""

    def __init__(self, artifacts_dir: str | Path) -> None:
        # Its folder is made by the first trial's upload: a worker refused for its input
        # (its data, say, checked after this hook is made) writes nothing.
        self.folder = Path(artifacts_dir).expanduser()
        self.store = artifact_store(self.folder, create=False)
        self.renderer = BackgroundRenderer(self.store)
        self._placeholders: tempfile.TemporaryDirectory[str] | None = None
        self._placeholder_png: bytes | None = None

    def _placeholder(self, filename: str) -> Path:
        """A placeholder PNG file named ``filename`` (upload_artifact takes a file's name)."""
        if self._placeholders is None:
            self._placeholders = tempfile.TemporaryDirectory(prefix="ssl-artifact-")
            self._placeholder_png = placeholder_png()
        path = Path(self._placeholders.name) / filename
        if not path.is_file():
            path.write_bytes(self._placeholder_png or b"")
        return path

    def __call__(
        self,
        trial: optuna.Trial,
        run: Any,
        tcfg: Any,  # noqa: ARG002 - the TrialHook signature; figures need no config
        extra: dict[str, Any],
    ) -> None:
        started = time.perf_counter()
        try:
            drawings = trial_drawings(trial, run, extra)
            self.folder.mkdir(parents=True, exist_ok=True)
            for filename, draw in drawings.items():
                artifact_id = upload_file(trial, self.store, self._placeholder(filename))
                what = f"{trial.study.study_name} trial #{trial.number} {filename}"
                self.renderer.submit(RenderJob(artifact_id, draw, what))
        except Exception as error:  # a figure must never cost a trained trial
            reason = f"{type(error).__name__}: {error}"[:500]
            _LOG.warning("trial %d: artifacts not uploaded: %s", trial.number, reason)
            with contextlib.suppress(Exception):  # the storage itself may be the problem
                trial.set_user_attr("artifact_error", reason)
        finally:
            with contextlib.suppress(Exception):
                trial.set_user_attr("artifact_seconds", time.perf_counter() - started)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every figure submitted so far is drawn and written (see
        :meth:`BackgroundRenderer.flush`)."""
        return self.renderer.flush(timeout)


def make_trial_artifact_hook(artifacts_dir: str | Path) -> TrialArtifactHook:
    """A TrialRunner hook attaching the trial's figures to the store at ``artifacts_dir``; they
    are drawn in a background thread (call ``.flush()`` to wait for them)."""
    return TrialArtifactHook(artifacts_dir)
