"""Optuna objectives for the three stages: one trial = one :class:`models.training.Run`.

Each trial records what a user needs to trust and reproduce it (user attrs): ``stage``,
``seed``, ``device``, ``epochs_run``, ``wall_time_s``, ``images_per_second``, the per-epoch
``curve:<phase>:<epoch>`` rows, and ``fail_reason`` or ``prune_reason`` when it did not complete. Checkpoints are
keyed by the *original* trial number, so a retry of a killed trial resumes from the killed
trial's last epoch instead of epoch 0.

Hooks (:data:`TrialHook`) run just before a trial returns, while it can still take artifacts::

    runner = TrialRunner(cfg, progress=False)
    runner.hooks.append(lambda trial, run, tcfg, extra: print(trial.number, run.task))
    study.optimize(runner.objective("screen"), n_trials=1)
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch
from omegaconf import DictConfig
from optuna.trial import TrialState
from tqdm.auto import tqdm

from models.checkpoints import (
    CheckpointError,
    check_identity,
    load_checkpoint,
    set_aside,
)
from models.data import ImageSplits, load_splits
from models.training import (
    EpochReport,
    NonFiniteLossError,
    Run,
    describe_device,
    resolve_device,
)
from search.config import checkpoint_store, direction_of, metric_of, to_dataclasses
from search.naming import (
    BEST_PRETRAIN_FILE,
    CHECKPOINT_EVERY_ATTR,
    DATA_SOURCE_ATTR,
    FINAL_METRIC,
    PRETRAIN_FILE,
    PROBE_FILE,
    RUNG_FROM_ATTR,
    RUNG_TO_ATTR,
    STUDY_UID_ATTR,
    WRITTEN_BY_ATTR,
    checkpoint_identity,
    curve_attr,
    is_continuation,
    learning_curve,
    long_budget,
    new_study_uid,
    rung_ladder,
    trial_dir_relative,
    uses_rungs,
)
from search.space import apply, suggest
from storage.claims import default_owner, owner_host

# (running trial, its Run, the trial's resolved config, {"history"|"results"|"pruned"|...}).
TrialHook = Callable[[optuna.Trial, Run, DictConfig, dict[str, Any]], None]
# (Optuna study name, trial number) -> that trial, for a final trial's source.
TrialLookup = Callable[[str, int], "optuna.trial.FrozenTrial | None"]
# The pretraining rows of the configuration a promoted trial trains (every leg of it).
CurveLookup = Callable[["optuna.trial.FrozenTrial"], list[dict[str, Any]]]


# A configuration that ran out of memory and was retried at half its batch size.
OOM_BATCH_ATTR = "oom_batch_size"


def carried_attrs(source: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """What a configuration's later trials (its continuations, promotion, final) take from the
    trial that trained it: its seed, and the batch size it fell back to after running out of
    memory, if it did."""
    carried: dict[str, Any] = {"seed": source.user_attrs.get("seed")}
    if OOM_BATCH_ATTR in source.user_attrs:
        carried[OOM_BATCH_ATTR] = source.user_attrs[OOM_BATCH_ATTR]
    return carried


def release_trial_memory(raised: bool) -> None:
    """Between trials, outside every frame that held the trial's exception: free its Run.

    A trial that raised (failed, pruned, interrupted) leaves its exception in a reference
    cycle with Optuna's frames, and the traceback keeps the training loop's frames and through
    them the Run, its batches and activations: only the cycle collector frees those, so it runs
    now rather than whenever it next would. A completed trial's Run went with its last
    reference; the collection then runs on CUDA only (it costs tens of ms a trial), where the
    cached blocks are handed back for the next trial or another process on the GPU.
    """
    on_cuda = torch.cuda.is_available()
    if raised or on_cuda:
        gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()


def stored(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The stored view of a running trial (system attrs included), through the public API."""
    running = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return next(t for t in running if t.number == trial.number)


# A trial stopped by Ctrl-C or SIGTERM fails with this reason and is queued again at once.
# What became of it (its retry, the epoch that resumed) is told by search.stages.failure_reason.
INTERRUPTED_REASON = "interrupted (Ctrl-C or SIGTERM)"


def encoder_epoch(attrs: Mapping[str, Any]) -> int | None:
    """The promoted run's epoch whose encoder a final trial took, when it took the best one:
    user attr ``encoder_epoch``, or for a trial stored before that attr, its
    ``encoder_checkpoint`` (``"best: epoch N (...)"``, written by :class:`TrialRunner`)."""
    if attrs.get("encoder_epoch") is not None:
        return int(attrs["encoder_epoch"])
    found = re.match(r"best: epoch (\d+)", str(attrs.get("encoder_checkpoint", "")))
    return int(found.group(1)) if found else None


def original_number(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the first trial in a retry chain (itself when it is no retry)."""
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if retried is None else int(retried)


def config_number(trial: optuna.trial.FrozenTrial) -> int:
    """The configuration a trial trains: the screen trial that first sampled it (user attr
    ``config`` on rung legs), else the first trial of its retry chain."""
    return int(trial.user_attrs.get("config", original_number(trial)))


class CheckpointUnreachableError(CheckpointError):
    """A checkpoint another leg wrote is not where this worker looks: its ``checkpoints_dir``
    is not the one the study's other workers share. The trial fails, is queued again for a
    worker that can read it, and this worker stops (see ``search.stages``)."""


def configuration_pretrain_curve(
    source: optuna.trial.FrozenTrial, legs: Iterable[optuna.trial.FrozenTrial]
) -> list[dict[str, Any]]:
    """The pretraining rows (by epoch) of the configuration trial ``source`` trains: under rungs
    (its legs carry user attr ``config``), joined over every completed leg of it in ``legs``, in
    order, since a leg holds only the epochs it added; otherwise ``source``'s own."""
    if "config" not in source.user_attrs:
        return learning_curve(source.user_attrs, "pretrain")
    number = config_number(source)
    rows: dict[int, dict[str, Any]] = {}
    for leg in legs:
        if (
            leg.state == TrialState.COMPLETE
            and config_number(leg) == number
            and "duplicate_of" not in leg.user_attrs
        ):
            rows.update({r["epoch"]: r for r in learning_curve(leg.user_attrs, "pretrain")})
    return [rows[epoch] for epoch in sorted(rows)]


class TrialRunner:
    """Runs trials of one study in this process; loads the data once (unless given ``splits``,
    the study's data loaded by the caller) and reuses it."""

    def __init__(
        self,
        cfg: DictConfig,
        device: str | None = None,
        progress: bool = True,
        find_trial: TrialLookup | None = None,
        source_curve: CurveLookup | None = None,
        splits: ImageSplits | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device or cfg.train.device
        self.progress = progress
        self.metric = metric_of(cfg)
        # checkpoints_dir, shared by every worker: a folder, or a URL mirrored in a local cache.
        self.store = checkpoint_store(cfg)
        self.find_trial = find_trial
        self.source_curve = source_curve
        self._splits = splits  # None: loaded at first use
        # Called before a trial returns (artifacts must be uploaded while it is running).
        self.hooks: list[TrialHook] = []

    @property
    def splits(self) -> ImageSplits:
        if self._splits is None:
            data_cfg, _, _ = to_dataclasses(self.cfg)
            self._splits = load_splits(data_cfg)
        return self._splits

    @staticmethod
    def checkpoint_dir_relative(study: optuna.Study, number: int) -> Path:
        uid = study.user_attrs.get(STUDY_UID_ATTR)
        if uid is None:  # a study not opened through open_studies: identify it now
            uid = new_study_uid()
            study.set_user_attr(STUDY_UID_ATTR, uid)
        return trial_dir_relative(study.study_name, str(uid), number)

    def baselines(self) -> dict[str, float]:
        """The study's baselines on its validation split: raw pixels and its own (the report's)
        configuration's encoder untrained, both scored by kNN accuracy."""
        return self._make_run(self.cfg, None, None).baselines()

    def objective(self, stage: str) -> Callable[[optuna.Trial], float]:
        """The Optuna objective of ``stage`` (screen, promote or final)."""
        return {"screen": self.screen, "promote": self.promote, "final": self.final}[stage]

    # ---- stage objectives -----------------------------------------------------------------

    def screen(self, trial: optuna.Trial) -> float:
        if uses_rungs(self.cfg):
            return self._train_to_rung(trial, "screen")
        epochs = int(self.cfg.stages.screen.epochs)
        return self._train(trial, "screen", epochs, prune=True)

    def promote(self, trial: optuna.Trial) -> float:
        if uses_rungs(self.cfg):
            return self._train_to_rung(trial, "promote")
        return self._train(trial, "promote", long_budget(self.cfg), prune=False)

    def _train_to_rung(self, trial: optuna.Trial, stage: str) -> float:
        """Train a configuration to its rung (``rung_to``; a new one: the first rung), from
        the checkpoint where it stopped (``rung_from``), the schedule over the long budget."""
        to = int(trial.user_attrs.get(RUNG_TO_ATTR, rung_ladder(self.cfg)[0]))
        if RUNG_TO_ATTR not in trial.user_attrs:
            trial.set_user_attr(RUNG_TO_ATTR, to)
        return self._train(trial, stage, long_budget(self.cfg), prune=False, stop_at=to)

    def final(self, trial: optuna.Trial) -> float:
        """Train the frozen-encoder classifier on the best promoted encoder; test numbers."""
        run = None
        started = time.perf_counter()
        try:
            self._begin(trial, "final")
            attrs = trial.user_attrs
            params = suggest(trial, self.cfg.search.space)
            tcfg = apply(self.cfg, params)
            tcfg.train.epochs = long_budget(self.cfg)
            tcfg.train.seed = int(attrs.get("seed", self.cfg.train.seed))
            source = self._final_encoder(trial)
            own = self.checkpoint_dir_relative(trial.study, original_number(stored(trial)))
            trial.set_user_attr("checkpoint_dir", own.as_posix())
            folder = self._fetch(own)
            # A classifier trained on the best epoch's encoder is not resumed on the last's,
            # taken when the best file is gone (and the other way round).
            fallback = self.cfg.stages.final.checkpoint == "best" and source.name == PRETRAIN_FILE
            variant = "/last-epoch-encoder" if fallback else ""
            previous, fingerprint = self._resumable(
                trial, tcfg, folder / PROBE_FILE, variant=variant
            )
            if previous is not None:  # a retry: the classifier resumes from its checkpoint
                trial.set_user_attr("resumed_from_epoch", int(previous["epoch"]))
            run = self._make_run(tcfg, folder, fingerprint)
            run.load_pretrained(source)
            if run.needs_probe:
                run.train_probe(on_epoch=lambda r: self._record_epoch(trial, r))
            results = run.evaluate()
            for key, value in results.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            source_trial = (
                self.find_trial(attrs["source_study"], int(attrs["source_trial"]))
                if self.find_trial and "source_trial" in attrs
                else None
            )
            extra = {"results": results, "source_trial": source_trial}
            if source_trial is not None and self.source_curve is not None:
                extra["source_curve"] = self.source_curve(source_trial)
            self._run_hooks(trial, run, tcfg, extra)
            return results[FINAL_METRIC]
        except BaseException as error:
            self._fail(trial, error)
            raise

    # ---- shared machinery -----------------------------------------------------------------

    def _begin(self, trial: optuna.Trial, stage: str) -> None:
        # A retry inherits its original's user attrs; these say what this attempt did.
        said = ("fail_reason", "resumed_from_epoch", "checkpoint_discarded")
        for attr in (*said, "encoder_checkpoint", "encoder_epoch"):
            if trial.user_attrs.get(attr) is not None:
                trial.set_user_attr(attr, None)
        trial.set_user_attr("stage", stage)
        trial.set_user_attr("worker", default_owner())
        trial.set_user_attr("device", describe_device(resolve_device(self.device)))
        if self.splits.source:  # what the numbers rest on, when not the original images
            trial.set_user_attr(DATA_SOURCE_ATTR, self.splits.source)

    def _fetch(self, relative: Path) -> Path:
        """The local folder of checkpoint folder ``relative``, its files brought up to date
        from ``checkpoints_dir`` first when that is a URL."""
        self.store.pull(relative)
        return self.store.local(relative)

    def _unreachable(
        self, relative: Path, name: str, what: str, configuration: int | None = None
    ) -> CheckpointUnreachableError:
        """A checkpoint this worker needs and cannot read: where it should be, how to share it,
        and, for a leg of ``configuration``, how to go on without it if it is lost."""
        lost = "" if configuration is None else f"; {self._give_up_hint(configuration, 'lost')}"
        return CheckpointUnreachableError(
            self.store.where(relative, name),
            f"{what} but this worker cannot read its checkpoint: it was deleted or moved, or "
            "checkpoints_dir is not one location every worker reaches (it must be a shared "
            "folder or mount at the same path on every machine, or a URL such as "
            f"s3://bucket/prefix with its backend installed); nothing was retrained{lost}",
        )

    def _give_up_hint(self, configuration: int | str, how: str) -> str:
        """How to go on without ``configuration`` when its checkpoint is ``how`` for good."""
        return (
            f"if it is {how} for good, python -m search.give_up study={self.cfg.name} "
            f"configuration={configuration} (with the study's storage= or runs_dir=) lets the "
            "study go on without it"
        )

    def _check_retry_finds_its_checkpoint(
        self,
        trial: optuna.Trial,
        this: optuna.trial.FrozenTrial,
        relative: Path,
        stop: int,
        worker: str | None,
        every: int | None,
    ) -> None:
        """Raise :class:`CheckpointUnreachableError` when retry ``trial`` finds no checkpoint
        although its original surely wrote one: never retrain a leg silently from epoch 0.

        Surely: the original reported epoch ``2 * every`` (its ``checkpoint_every``; a second
        checkpoint write waits for the first, so the first was on disk), or its stop epoch
        (flushed before it is reported). Not known (an original from before it was recorded):
        not checked.
        """
        original = original_number(this)
        trained = int(trial.user_attrs.get("epochs_run") or 0)
        if original == trial.number or every is None or trained < min(2 * int(every), stop):
            return
        host = owner_host(str(worker)) if worker else None
        if host:
            trial.set_user_attr(WRITTEN_BY_ATTR, host)
        raise self._unreachable(
            relative,
            PRETRAIN_FILE,
            f"trial #{trial.number} retries trial #{original}, which trained {trained} "
            f"epoch{'s' if trained != 1 else ''}",
            configuration=config_number(this),
        )

    def _final_encoder(self, trial: optuna.Trial) -> Path:
        """The promoted encoder the final classifier trains on (``stages.final.checkpoint``):
        its best epoch on validation, or its last; recorded as ``encoder_checkpoint``."""
        relative = Path(str(trial.user_attrs["source_checkpoint_dir"]))
        folder = self._fetch(relative)
        last = folder / PRETRAIN_FILE
        if not last.is_file() and not (folder / BEST_PRETRAIN_FILE).is_file():
            source = trial.user_attrs.get("source_trial", "?")
            raise self._unreachable(
                relative, PRETRAIN_FILE, f"the final stage trains on promoted trial #{source}"
            )
        if self.cfg.stages.final.checkpoint == "best":
            best = folder / BEST_PRETRAIN_FILE
            try:
                state = load_checkpoint(best)
            except CheckpointError as error:
                # Not replaced by the last epoch on its own: that would report another encoder.
                raise CheckpointError(
                    self.store.where(relative, BEST_PRETRAIN_FILE),
                    f"{error.problem}; the final stage trains on it (stages.final.checkpoint="
                    f"best): restore it, or delete it to train on the configuration's last "
                    f"epoch ({PRETRAIN_FILE}) instead, then run the study again",
                ) from error
            if state is not None:
                trial.set_user_attr(
                    "encoder_checkpoint", f"best: epoch {state['epoch']} ({best.name})"
                )
                trial.set_user_attr("encoder_epoch", int(state["epoch"]))  # for the report
                return best
            trial.set_user_attr("encoder_checkpoint", f"last: no {best.name} was kept")
            return last
        trial.set_user_attr("encoder_checkpoint", f"last ({last.name})")
        return last

    def _make_run(self, tcfg: DictConfig, ckpt_dir: Path | None, fingerprint: str | None) -> Run:
        _, model_cfg, train_cfg = to_dataclasses(tcfg)
        train_cfg.device = self.device
        train_cfg.progress = self.progress
        return Run(
            tcfg.task,
            self.splits,
            model_cfg,
            train_cfg,
            checkpoint_dir=ckpt_dir,
            identity=fingerprint,
            # Each file is uploaded on the writer thread once written; a rung's before its
            # result is reported (the writer is flushed there).
            on_checkpoint=self.store.push if self.store.remote else None,
        )

    def _resumable(
        self,
        trial: optuna.Trial,
        tcfg: DictConfig,
        path: Path,
        shown: str | None = None,
        variant: str = "",
    ) -> tuple[dict[str, Any] | None, str]:
        """The checkpoint at ``path`` if this trial may resume from it (else None), and the
        identity a run on settings ``tcfg`` resumes and writes it under
        (:func:`search.naming.checkpoint_identity`: that of a checkpoint written before the
        image digest, else the current one; ``variant`` appended, where the settings alone do
        not tell runs apart). The file is read once.

        An unreadable file is kept as ``<name>.corrupt``, one written for other settings (another
        study's, or changed settings under the same name) as ``<name>.mismatch``; either way
        the trial trains from epoch 0 and records why in ``checkpoint_discarded``. A leg that
        continues a configuration (``shown``: where its checkpoint lives, for the message)
        must resume: there the error is raised, the file left in place, nothing retrained.
        """
        digest, classes = self.splits.digest, self.splits.num_classes
        fingerprint = checkpoint_identity(tcfg, digest, None, classes) + variant
        try:
            state = load_checkpoint(path)
            if state is not None:
                written = state.get("identity")
                if variant and isinstance(written, str):
                    written = written.removesuffix(variant)
                fingerprint = checkpoint_identity(tcfg, digest, written, classes) + variant
                check_identity(path, state, fingerprint)
            return state, fingerprint
        except CheckpointError as error:
            if shown is not None:
                configuration = trial.user_attrs.get("config", "?")
                raise CheckpointError(
                    shown,
                    f"{error.problem}; this leg continues configuration #{configuration} from "
                    "it, so it fails instead of training from epoch 0 (the file is left in "
                    f"place; {self._give_up_hint(configuration, 'unreadable')})",
                ) from error
            kept = set_aside(path, "mismatch" if "other settings" in error.problem else "corrupt")
            note = f"{error}; kept as {kept.name}, trained from epoch 0"
            trial.set_user_attr("checkpoint_discarded", note[:1000])
            tqdm.write(f"trial #{trial.number}: {note}")
            return None, fingerprint

    @staticmethod
    def _duplicate_of(
        trial: optuna.Trial, this: optuna.trial.FrozenTrial, params: dict[str, Any]
    ) -> int | None:
        """A sampled trial whose configuration another trial of the study already has."""
        if trial.user_attrs.get("baseline") or is_continuation(trial.user_attrs) or not params:
            return None  # enqueued on purpose (the report's configuration, a continuation)
        if original_number(this) != trial.number:
            return None  # a retry continues its original
        for other in trial.study.get_trials(deepcopy=False):
            if other.number != trial.number and other.params == params:
                return other.number
        return None

    def _train(
        self,
        trial: optuna.Trial,
        stage: str,
        epochs: int,
        prune: bool,
        stop_at: int | None = None,
    ) -> float:
        run = None
        started = time.perf_counter()
        continued = is_continuation(trial.user_attrs)
        # A retry's: its original's machine and how often it saved (both per worker).
        inherited_worker = trial.user_attrs.get("worker")
        inherited_every = trial.user_attrs.get(CHECKPOINT_EVERY_ATTR)
        try:
            self._begin(trial, stage)
            params = suggest(trial, self.cfg.search.space)
            this = stored(trial)
            new_sample = prune or (stop_at is not None and not continued)
            if new_sample and (same := self._duplicate_of(trial, this, params)) is not None:
                reason = f"skipped: same configuration as trial #{same}"
                trial.set_user_attr("duplicate_of", same)
                trial.set_user_attr("prune_reason", reason)
                raise optuna.TrialPruned(reason)
            tcfg = apply(self.cfg, params)
            tcfg.train.epochs = epochs
            # A configuration is keyed by the screen trial that first sampled it.
            number = config_number(this)
            if stop_at is not None and "config" not in trial.user_attrs:
                trial.set_user_attr("config", number)
            seed = trial.user_attrs.get("seed")
            if seed is None:  # promoted trials carry their source's seed
                seed = int(self.cfg.train.seed) + number
                trial.set_user_attr("seed", seed)
            tcfg.train.seed = int(seed)
            if OOM_BATCH_ATTR in trial.user_attrs:  # this configuration ran out of memory once
                tcfg.train.batch_size = int(trial.user_attrs[OOM_BATCH_ATTR])
            if continued:  # the configuration's own folder, wherever it was started
                relative = Path(str(trial.user_attrs["checkpoint_dir"]))
            else:
                relative = self.checkpoint_dir_relative(trial.study, number)
            trial.set_user_attr("checkpoint_dir", relative.as_posix())
            ckpt_dir = self._fetch(relative)  # a retry or continuation resumes from there
            if continued and not (ckpt_dir / PRETRAIN_FILE).exists():
                raise self._unreachable(
                    relative,
                    PRETRAIN_FILE,
                    f"configuration #{number} is to continue from epoch "
                    f"{trial.user_attrs[RUNG_FROM_ATTR]}",
                    configuration=number,
                )
            if not continued and not (ckpt_dir / PRETRAIN_FILE).exists():
                self._check_retry_finds_its_checkpoint(
                    trial,
                    this,
                    relative,
                    min(stop_at or epochs, epochs),
                    inherited_worker,
                    inherited_every,
                )
            trial.set_user_attr(CHECKPOINT_EVERY_ATTR, int(tcfg.train.checkpoint_every))

            reported: list[int] = []  # epochs this trial reported to Optuna

            def on_epoch(report: EpochReport) -> None:
                reported.append(report.epoch)
                self._record_epoch(trial, report)
                value = report.metrics[self.metric]
                trial.report(value, report.epoch)
                # After the last screen epoch the budget is spent: a trial that got there
                # completes, so it can be promoted.
                if prune and report.epoch < epochs and trial.should_prune():
                    reason = (
                        f"pruned after epoch {report.epoch}/{epochs}: {self.metric} {value:.4f}"
                    )
                    trial.set_user_attr("prune_reason", reason)
                    raise optuna.TrialPruned(reason)

            for _ in range(2):  # a second time only after running out of memory
                shown = self.store.where(relative, PRETRAIN_FILE) if continued else None
                previous, fingerprint = self._resumable(
                    trial, tcfg, ckpt_dir / PRETRAIN_FILE, shown
                )
                reached = int(trial.user_attrs.get(RUNG_FROM_ATTR) or 0) if continued else 0
                if previous is not None and int(previous["epoch"]) < reached:
                    raise CheckpointError(
                        str(shown),
                        f"holds epoch {int(previous['epoch'])}, but configuration #{number} "
                        f"reached epoch {reached}, the rung it continues from: a newer checkpoint "
                        "was lost; this leg fails instead of training those epochs again (the "
                        "file is left in place)",
                    )
                if previous is not None:
                    trial.set_user_attr("resumed_from_epoch", int(previous["epoch"]))
                elif trial.user_attrs.get("epochs_run"):  # a retry's, of its original's run
                    trial.set_user_attr("epochs_run", 0)  # this attempt starts from epoch 0
                run = self._make_run(tcfg, ckpt_dir, fingerprint)
                # The final stage may pick the best epoch of the configuration it takes: of
                # its promoted retrain, or under rungs of all its legs (a continuation resumes
                # the best so far from the rung checkpoint).
                if stage == "promote" or uses_rungs(self.cfg):
                    run.keep_best_by(self.metric, direction_of(self.cfg) == "maximize")
                try:
                    history = run.pretrain(on_epoch=on_epoch, stop_at=stop_at)
                    break
                except torch.cuda.OutOfMemoryError as error:
                    started_before = continued or previous is not None or bool(reported)
                    if not self._halve_batch_after_oom(trial, tcfg, started_before, error):
                        raise
                # Out of the except clause, nothing holds the failed attempt: free it first.
                run = None
                release_trial_memory(raised=True)
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            if stop_at is not None:
                first = int(trial.user_attrs.get(RUNG_FROM_ATTR, 0))
                trial.set_user_attr("epochs_added", max(0, min(stop_at, epochs) - first))
                history = [h for h in history if h.epoch <= stop_at]
            value = float(history[-1].metrics[self.metric])
            if not math.isfinite(value):
                # The configuration broke (a result for the search, ranked last), not a fault:
                # Optuna would fail it without a reason, and a failure without one is retried.
                raise NonFiniteLossError(
                    f"{self.metric} became {value} in epoch {history[-1].epoch}"
                )
            self._run_hooks(trial, run, tcfg, {"history": history})
            return value
        except optuna.TrialPruned:
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            if run is not None:  # a pruned trial's curves explain why it stopped
                self._run_hooks(trial, run, tcfg, {"history": None, "pruned": True})
            raise
        except BaseException as error:
            self._fail(trial, error)
            raise

    def _halve_batch_after_oom(
        self, trial: optuna.Trial, tcfg: DictConfig, started_before: bool, error: BaseException
    ) -> bool:
        """After CUDA ran out of memory: whether to train again at half the batch size.

        Only where the study allows it (``oom_half_batch``), once per configuration, and only
        before the configuration recorded anything (``started_before``: a continuation, a
        resumed checkpoint, an epoch reported): its checkpoints, its curve and the pruner's
        values must all come from one batch size. Running out of memory happens in the first
        steps, where the peak is reached, so that is where it applies. The new batch size is
        recorded (``oom_batch_size``, with ``oom_reason``) and every later leg of the
        configuration trains with it.
        """
        half = int(tcfg.train.batch_size) // 2
        if not self.cfg.oom_half_batch or started_before or OOM_BATCH_ATTR in trial.user_attrs:
            return False
        if half < 2:  # BatchNorm needs two samples a batch
            return False
        tcfg.train.batch_size = half
        trial.set_user_attr(OOM_BATCH_ATTR, half)
        trial.set_user_attr("oom_reason", f"CUDA out of memory: {str(error).splitlines()[0]}"[:500])
        tqdm.write(f"trial #{trial.number}: out of memory; training again at batch size {half}")
        return True

    @staticmethod
    def _record_epoch(trial: optuna.Trial, report: EpochReport) -> None:
        """Append the epoch's row to the trial's curve (one attr per epoch: nothing rewritten;
        a retry that trains an epoch again overwrites that epoch's row)."""
        trial.set_user_attr(curve_attr(report.phase, report.epoch), asdict(report))
        if report.phase == "pretrain":
            trial.set_user_attr("epochs_run", report.epoch)
        speeds = [
            c["images_per_second"]
            for c in learning_curve(trial.user_attrs)
            if c["images_per_second"] > 0
        ]
        if speeds:
            trial.set_user_attr("images_per_second", sum(speeds) / len(speeds))

    def _run_hooks(self, trial: optuna.Trial, run: Run, tcfg: DictConfig, extra: dict) -> None:
        for hook in self.hooks:
            hook(trial, run, tcfg, extra)

    @staticmethod
    def _fail(trial: optuna.Trial, error: BaseException) -> None:
        if isinstance(error, KeyboardInterrupt):
            reason = INTERRUPTED_REASON
        elif isinstance(error, torch.cuda.OutOfMemoryError):
            reason = f"CUDA out of memory: {str(error).splitlines()[0]}"
        else:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        # The storage itself may be what failed: keep the original error, not this one.
        with contextlib.suppress(Exception):
            trial.set_user_attr("fail_reason", reason[:1000])
