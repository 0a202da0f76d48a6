"""Optuna objectives for the three stages: one trial = one :class:`models.training.Run`.

Each trial records what a user needs to trust and reproduce it (user attrs): ``stage``,
``seed``, ``device``, ``epochs_run``, ``wall_time_s``, ``images_per_second``, the per-epoch
``curve``, and ``fail_reason`` or ``prune_reason`` when it did not complete. Checkpoints are
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
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch
from omegaconf import DictConfig

from models.checkpoints import load_checkpoint
from models.data import ImageSplits, load_splits
from models.training import EpochReport, Run
from search.config import metric_of, resolved_paths, to_dataclasses
from search.naming import FINAL_METRIC, PRETRAIN_FILE, long_budget, trial_dir
from search.space import apply, suggest
from storage.claims import default_owner

# (running trial, its Run, the trial's resolved config, {"history"|"results"|"pruned"|...}).
TrialHook = Callable[[optuna.Trial, Run, DictConfig, dict[str, Any]], None]
# (Optuna study name, trial number) -> that trial, for a final trial's source.
TrialLookup = Callable[[str, int], "optuna.trial.FrozenTrial | None"]


def stored(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The stored view of a running trial (system attrs included), through the public API."""
    running = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return next(t for t in running if t.number == trial.number)


def original_number(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the first trial in a retry chain (itself when it is no retry)."""
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if retried is None else int(retried)


class TrialRunner:
    """Runs trials of one study in this process; loads the data once and reuses it."""

    def __init__(
        self,
        cfg: DictConfig,
        device: str | None = None,
        progress: bool = True,
        find_trial: TrialLookup | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device or cfg.train.device
        self.progress = progress
        self.metric = metric_of(cfg)
        self.paths = resolved_paths(cfg)
        self.find_trial = find_trial
        self._splits: ImageSplits | None = None
        # Called before a trial returns (artifacts must be uploaded while it is running).
        self.hooks: list[TrialHook] = []

    @property
    def splits(self) -> ImageSplits:
        if self._splits is None:
            data_cfg, _, _ = to_dataclasses(self.cfg)
            self._splits = load_splits(data_cfg)
        return self._splits

    def checkpoint_dir(self, study_name: str, number: int) -> Path:
        return trial_dir(self.paths["checkpoints"], study_name, number)

    def objective(self, stage: str) -> Callable[[optuna.Trial], float]:
        """The Optuna objective of ``stage`` (screen, promote or final)."""
        return {"screen": self.screen, "promote": self.promote, "final": self.final}[stage]

    # ---- stage objectives -----------------------------------------------------------------

    def screen(self, trial: optuna.Trial) -> float:
        epochs = int(self.cfg.stages.screen.epochs)
        return self._train(trial, "screen", epochs, prune=True)

    def promote(self, trial: optuna.Trial) -> float:
        return self._train(trial, "promote", long_budget(self.cfg), prune=False)

    def final(self, trial: optuna.Trial) -> float:
        """Train the frozen-encoder classifier on the best promoted encoder; test numbers."""
        self._begin(trial, "final")
        attrs = trial.user_attrs
        params = suggest(trial, self.cfg.search.space)
        tcfg = apply(self.cfg, params)
        tcfg.train.epochs = long_budget(self.cfg)
        tcfg.train.seed = int(attrs.get("seed", self.cfg.train.seed))
        source_dir = self.checkpoint_dir(attrs["source_study"], int(attrs["source_checkpoint"]))
        run = self._make_run(
            tcfg, self.checkpoint_dir(trial.study.study_name, original_number(stored(trial)))
        )
        started = time.perf_counter()
        try:
            run.load_pretrained(source_dir / PRETRAIN_FILE)
            if run.needs_probe:
                run.train_probe(on_epoch=lambda r: self._record_epoch(trial, r))
            results = run.evaluate()
            for key, value in results.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            source = (
                self.find_trial(attrs["source_study"], int(attrs["source_trial"]))
                if self.find_trial and "source_trial" in attrs
                else None
            )
            self._run_hooks(trial, run, tcfg, {"results": results, "source_trial": source})
            return results[FINAL_METRIC]
        except BaseException as error:
            self._fail(trial, error)
            raise
        finally:
            self._release(run)

    # ---- shared machinery -----------------------------------------------------------------

    def _begin(self, trial: optuna.Trial, stage: str) -> None:
        trial.set_user_attr("stage", stage)
        trial.set_user_attr("worker", default_owner())
        trial.set_user_attr(
            "device",
            str(torch.device(self.device))
            if self.device != "auto"
            else ("cuda" if torch.cuda.is_available() else "cpu"),
        )
        if "fail_reason" in trial.user_attrs:  # inherited by a retry from its original
            trial.set_user_attr("fail_reason", None)

    def _make_run(self, tcfg: DictConfig, ckpt_dir: Path) -> Run:
        _, model_cfg, train_cfg = to_dataclasses(tcfg)
        train_cfg.device = self.device
        train_cfg.progress = self.progress
        return Run(tcfg.task, self.splits, model_cfg, train_cfg, checkpoint_dir=ckpt_dir)

    def _train(self, trial: optuna.Trial, stage: str, epochs: int, prune: bool) -> float:
        self._begin(trial, stage)
        params = suggest(trial, self.cfg.search.space)
        tcfg = apply(self.cfg, params)
        tcfg.train.epochs = epochs
        number = original_number(stored(trial))
        seed = trial.user_attrs.get("seed")
        if seed is None:  # promoted trials carry their source's seed
            seed = int(self.cfg.train.seed) + number
            trial.set_user_attr("seed", seed)
        tcfg.train.seed = int(seed)
        ckpt_dir = self.checkpoint_dir(trial.study.study_name, number)
        trial.set_user_attr("checkpoint", number)
        previous = load_checkpoint(ckpt_dir / PRETRAIN_FILE)
        if previous is not None:
            trial.set_user_attr("resumed_from_epoch", int(previous["epoch"]))
        run = None
        started = time.perf_counter()
        try:
            run = self._make_run(tcfg, ckpt_dir)

            def on_epoch(report: EpochReport) -> None:
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

            history = run.pretrain(on_epoch=on_epoch)
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            self._run_hooks(trial, run, tcfg, {"history": history})
            return float(history[-1].metrics[self.metric])
        except optuna.TrialPruned:
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            if run is not None:  # a pruned trial's curves explain why it stopped
                self._run_hooks(trial, run, tcfg, {"history": None, "pruned": True})
            raise
        except BaseException as error:
            self._fail(trial, error)
            raise
        finally:
            self._release(run)

    def _record_epoch(self, trial: optuna.Trial, report: EpochReport) -> None:
        curve = list(trial.user_attrs.get("curve", []))
        curve = [
            c for c in curve if not (c["phase"] == report.phase and c["epoch"] >= report.epoch)
        ]
        curve.append(asdict(report))
        trial.set_user_attr("curve", curve)
        if report.phase == "pretrain":
            trial.set_user_attr("epochs_run", report.epoch)
        speeds = [c["images_per_second"] for c in curve if c["images_per_second"] > 0]
        if speeds:
            trial.set_user_attr("images_per_second", sum(speeds) / len(speeds))

    def _run_hooks(self, trial: optuna.Trial, run: Run, tcfg: DictConfig, extra: dict) -> None:
        for hook in self.hooks:
            hook(trial, run, tcfg, extra)

    @staticmethod
    def _fail(trial: optuna.Trial, error: BaseException) -> None:
        if isinstance(error, KeyboardInterrupt):
            reason = "interrupted (Ctrl-C or SIGTERM); retried and resumed from its checkpoint"
        elif isinstance(error, torch.cuda.OutOfMemoryError):
            reason = f"CUDA out of memory: {str(error).splitlines()[0]}"
        else:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        # The storage itself may be what failed: keep the original error, not this one.
        with contextlib.suppress(Exception):
            trial.set_user_attr("fail_reason", reason[:1000])

    @staticmethod
    def _release(run: Run | None) -> None:
        """Free the trial's device memory before the next trial (after OOM especially)."""
        del run
        if torch.cuda.is_available():  # on the CPU reference counting already freed the run
            gc.collect()
            torch.cuda.empty_cache()
