"""The report's method as three Optuna studies per study name, coordinated only by storage.

With ``search.pruner: asha`` (the default), :func:`run_rungs` schedules rungs over the whole
budget: each Optuna trial is one *leg* of a configuration, trained from ``rung_from`` (absent:
from scratch) to ``rung_to`` and continued from its checkpoint when it ranks in the top
``1/eta`` of its rung (decisions: :mod:`search.scheduler`). Legs up to ``stages.screen.epochs``
live in ``<name>.screen``, the longer ones in ``<name>.promote``; the report's own configuration
is enqueued first. With the other pruners, the previous pipeline runs:

``<name>.screen``
    ``stages.screen.trials`` short runs, pruned per epoch; the report's own configuration is
    enqueued first, so every study holds the baseline.
``<name>.promote``
    the top-k completed screen trials re-run with identical params and seed for the long
    budget; lineage (``source_study``, ``source_trial``) is stored as user attrs.

Either way ``<name>.final`` gives the best encoder at the long budget its frozen-encoder
classifier (where the task has one) and train/val/test numbers; the test split is touched
only here.

Any number of processes may run :func:`run_stages` against the same storage at once: trial
slots, promotions and waiting trials are handed out through :class:`storage.claims.Claims`, so
nothing runs twice and there is no head process. Running it again after everything finished
trains nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from models.checkpoints import CheckpointWriteError
from models.data import ImageSplits
from models.errors import DataError, UsageError
from search.config import (
    ConfigError,
    changed_settings,
    direction_of,
    public_config,
    with_latest_budgets,
)
from search.database import StorageUnavailableError, redact
from search.naming import (
    BEYOND_PLACES_ATTR,
    DATA_DIGEST_ATTR,
    GIVEN_UP,
    NOTHING_QUEUED,
    RUNG_FROM_ATTR,
    RUNG_TO_ATTR,
    SKIPPED,
    STAGES,
    STUDY_UID_ATTR,
    WRITTEN_BY_ATTR,
    diverged,
    failed_as_given_up,
    given_up_attr,
    given_up_number,
    is_continuation,
    is_curve_attr,
    new_study_uid,
    rung_ladder,
    stage_metric,
    stage_study_name,
    trained_nothing,
    uses_rungs,
)
from search.objective import (
    INTERRUPTED_REASON,
    CheckpointUnreachableError,
    TrialRunner,
    carried_attrs,
    config_number,
    configuration_pretrain_curve,
    original_number,
    release_trial_memory,
    stored,
)
from search.sampling import FirstLegSampler, make_tpe, startup_trials
from search.scheduler import (
    Continue,
    Finished,
    StartNew,
    TrialRecord,
    decide,
    holds_long_budget_seat,
    may_start_new,
    merge_retries,
    rank_key,
    ranking,
)
from search.space import baseline_params
from storage.checkpoint_store import CheckpointTransferError
from storage.claims import Claims, owner_alive, owner_gone, owner_host
from storage.retry import FAILED_AT_ATTR
from storage.trial_retry import RetryFailedTrial, retry_allowed, retry_claim_key
from storage.urls import open_storage

POLL_S = 1.0
# Called after each trial this process ran: (stage, trial number).
TrialDone = Callable[[str, int], None]


class StageError(RuntimeError):
    """A stage cannot proceed (e.g. no screen trial completed); the message says why."""


class ConfigurationGivenUp(RuntimeError):
    """The leg a worker took belongs to a configuration the user gave up (:func:`give_up`): it
    fails at once, trains nothing and is not retried."""


@dataclass
class Studies:
    screen: optuna.Study
    promote: optuna.Study
    final: optuna.Study
    claims: Claims
    # When this process opened them (time.time()): what failed before belongs to an earlier run.
    opened_at: float = dataclasses.field(default_factory=time.time)

    def of(self, stage: str) -> optuna.Study:
        return getattr(self, stage)

    def pretrain_curve(self, source: optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
        """The pretraining rows of the configuration promoted trial ``source`` trains, over
        all its legs (:func:`configuration_pretrain_curve`)."""
        legs = [*self.screen.get_trials(deepcopy=False), *self.promote.get_trials(deepcopy=False)]
        return configuration_pretrain_curve(source, legs)

    def find_trial(self, study_name: str, number: int) -> optuna.trial.FrozenTrial | None:
        """Trial ``number`` of the stage study called ``study_name`` (None if absent)."""
        for stage in STAGES:
            study = self.of(stage)
            if study.study_name == study_name:
                return next(
                    (t for t in study.get_trials(deepcopy=False) if t.number == number), None
                )
        return None


def make_sampler(cfg: DictConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = int(cfg.train.seed) + seed_offset
    if cfg.search.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    ladder = rung_ladder(cfg) if uses_rungs(cfg) else None
    tpe = make_tpe(
        seed,
        startup_trials(
            cfg.search.sampler.n_startup_trials, ladder, int(cfg.search.pruner.reduction_factor)
        ),
        conditional=any(spec.when for spec in cfg.search.space.values()),
    )
    # Under rungs, one result per configuration: continuations are other budgets' values.
    return FirstLegSampler(tpe) if uses_rungs(cfg) else tpe


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    p = cfg.search.pruner
    epochs = int(cfg.stages.screen.epochs)
    if p.name == "asha":  # the rung scheduler stops trials at rungs; nothing is pruned
        return optuna.pruners.NopPruner()
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=int(p.min_resource),
            max_resource=epochs,
            reduction_factor=int(p.reduction_factor),
        )
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=int(p.min_resource), reduction_factor=int(p.reduction_factor)
        )
    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(p.n_startup_trials), n_warmup_steps=int(p.min_resource)
        )
    return optuna.pruners.NopPruner()


def open_studies(
    cfg: DictConfig,
    url: str,
    seed_offset: int | None = None,
    splits: ImageSplits | None = None,
) -> Studies:
    """Create (or load) the schema and the three studies; store the resolved config once.

    Each stage study gets its identity (``study_uid``) from the process that creates it.
    ``seed_offset`` None gives this process its own sampler seed (see :func:`sampler_offset`).
    ``splits``: this worker's images, checked against the study's (:func:`check_same_images`)
    before this run writes its budgets into the stored config or claims a seed, so a worker
    refused for its data changes nothing in an existing study.
    """
    storage = open_storage(
        url,
        heartbeat_interval=int(cfg.heartbeat_interval),
        grace_period=int(cfg.grace_period),
        max_retry=int(cfg.max_retries),
    )
    _check_same_settings(cfg, storage, url)
    claims = Claims(storage.engine)
    direction = direction_of(cfg)
    studies = {}
    for stage in STAGES:
        name = stage_study_name(cfg.name, stage)
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=name,
                direction=direction if stage != "final" else "maximize",
                load_if_exists=False,
            )
            # Claims left by a study of this name that was deleted (from the dashboard, say)
            # would hold this new one up: they belong to no study now. Released before the
            # identity is set, which other workers wait for: theirs are never released here.
            stale = claims.release_all(f"{name}/")
            if stale:
                warnings.warn(
                    f"{name}: released {stale} claim(s) left by a deleted study of this name",
                    stacklevel=2,
                )
            study.set_user_attr(STUDY_UID_ATTR, new_study_uid())
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage)
            _wait_for_identity(study)
        studies[stage] = study
    if splits is not None:
        check_same_images(Studies(**studies, claims=claims), splits)
    # Samplers and pruners are this process's own (Study.sampler is public and settable).
    if seed_offset is None:
        seed_offset = sampler_offset(claims, cfg.name)
    for stage, study in studies.items():
        study.sampler = make_sampler(cfg, seed_offset)
        study.pruner = make_pruner(cfg) if stage == "screen" else optuna.pruners.NopPruner()
    resolved = json.loads(json.dumps(public_config(cfg)))
    # The URL in use, masked: a worker's config leaves it out (it travels in the environment).
    resolved["storage"] = redact(url)
    for stage, study in studies.items():
        stored = study.user_attrs.get("config")
        if stored is None:
            study.set_user_attr("config", resolved)
            study.set_user_attr("stage", stage)
            study.set_metric_names([stage_metric(cfg, stage)])
        elif (latest := with_latest_budgets(stored, resolved)) != stored:
            # The creator's config, with the budgets this run gives the study (locations stay
            # the creator's: a worker elsewhere has its own folders).
            study.set_user_attr("config", latest)
    return Studies(**studies, claims=claims)


def load_studies(cfg: DictConfig, url: str) -> Studies:
    """The three stage studies of study ``cfg.name`` as stored, to read (``--status``) or to
    change one record of (``search.give_up``): unlike :func:`open_studies` it creates nothing,
    stores no config and claims no sampler seed. A stage study that is missing is a
    :class:`UsageError`."""
    storage = open_storage(url, create=False)
    studies = {}
    for stage in STAGES:
        name = stage_study_name(cfg.name, stage)
        try:
            studies[stage] = optuna.load_study(study_name=name, storage=storage)
        except KeyError as error:
            raise UsageError(f"study: no study {name!r} in {redact(url)}") from error
    return Studies(**studies, claims=Claims(storage.engine))


def _check_same_settings(cfg: DictConfig, storage: optuna.storages.BaseStorage, url: str) -> None:
    """Refuse (ConfigError) to run study ``cfg.name`` with settings that change what its trials
    compute: trials trained one way would be ranked, promoted and reported with another's."""
    try:
        study_id = storage.get_study_id_from_name(stage_study_name(cfg.name, "screen"))
    except KeyError:
        return  # a new study
    stored = storage.get_study_user_attrs(study_id).get("config")
    changes = changed_settings(stored, cfg) if isinstance(stored, dict) else []
    if not changes:
        return
    shown = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes[:3])
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    raise ConfigError(
        f"{changes[0][0]}: study {cfg.name!r} in {redact(url)} was made with other settings "
        f"({shown}{more}); its trials must all be trained alike: set them back, or start a "
        f"new study with name={cfg.name}-2"
    )


def _wait_for_identity(study: optuna.Study, timeout_s: float = 30.0) -> None:
    """Wait until the creating process has stored the study's identity (it does so at once)."""
    deadline = time.monotonic() + timeout_s
    while STUDY_UID_ATTR not in study.user_attrs:
        # A study made before identities existed, or whose creator died right after creating
        # it: identify it here.
        if "config" in study.user_attrs or time.monotonic() > deadline:
            study.set_user_attr(STUDY_UID_ATTR, new_study_uid())
            return
        time.sleep(0.2)


def sampler_offset(claims: Claims, name: str) -> int:
    """A sampler seed offset no other process of study ``name`` has had, ever.

    Processes take offsets 0, 1, 2, ... in the order they join: the first run of a fresh study
    always samples as seed ``train.seed`` (reproducible), while concurrent processes and reruns
    after a crash each get their own stream, so none proposes the same configurations again.
    """
    offset = 0
    while not claims.take(f"{stage_study_name(name, 'screen')}/sampler-offset/{offset}"):
        offset += 1
    return offset


def delete_stage_studies(name: str, url: str) -> None:
    """Delete study ``name``'s three stage studies and release their claims (a clean slate)."""
    storage = open_storage(url)
    claims = Claims(storage.engine)
    for stage in STAGES:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=stage_study_name(name, stage), storage=storage)
        # Each stage study's own keys only: ``exp.`` would also match study ``exp.v2``'s.
        claims.release_all(f"{stage_study_name(name, stage)}/")


# ---- trial bookkeeping shared by the stages and the summary ------------------------------


# The trial numbers a retry continues (its original and earlier retries), as Optuna records them.
_history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history


def failure_reason(trial: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial]) -> str:
    """Why a trial failed: its stored reason, and what became of it where it was retried (its
    retry, and the epoch the retry resumed from); one interrupted or whose worker died that was
    not retried says so (a failure of the configuration itself, such as a diverged loss, is
    not retried by design)."""
    stored = str(trial.user_attrs.get("fail_reason") or "")
    retry = next((t for t in trials if trial.number in _history(t)), None)
    if stored and not stored.startswith(INTERRUPTED_REASON):
        # A machine's fault (the storage or the checkpoint store out of reach) is retried.
        return stored if retry is None else f"{stored}; {_retry_told(retry)}"
    # (older versions stored a claim of the outcome after the cause: it is told below instead)
    cause = INTERRUPTED_REASON if stored else "worker stopped sending heartbeats (killed?)"
    if retry is None:
        return f"{cause}; not retried (retries exhausted)"
    return f"{cause}; {_retry_told(retry)}"


def _retry_told(retry: optuna.trial.FrozenTrial) -> str:
    """What became of a failed trial's ``retry``, as far as it is known yet."""
    told = f"retried as trial {retry.number}"
    if not retry.state.is_finished():  # queued or just begun: its attrs may be the original's
        return told
    # Skipped before training (its configuration given up, its leg queued twice or beyond the
    # long budget's places): its resumed_from_epoch, if any, is the original's, inherited.
    attrs = retry.user_attrs
    if trained_nothing(attrs) or failed_as_given_up(attrs):
        return f"{told}, which trained nothing"
    resumed = retry.user_attrs.get("resumed_from_epoch")  # set by the attempt itself
    if resumed is not None:
        return f"{told}, resumed from epoch {resumed}"
    if retry.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return f"{told}, from epoch 0 (no checkpoint yet)"
    return told


def _has_result(
    number: int, trials: list[optuna.trial.FrozenTrial], given_up: dict[int, str] | None = None
) -> bool:
    """Whether failed trial ``number``'s configuration still got a result: a retry carries it
    on; another attempt at the same work completed (a later run's final of the same promoted
    trial, tried again once its retries were spent); it failed on its own merits (training
    diverged), which is a result for a search; or the user gave it up (:func:`give_up`, its
    configuration in ``given_up``), which ends it on purpose."""
    if any(number in _history(t) for t in trials):
        return True
    trial = next(t for t in trials if t.number == number)
    attrs = trial.user_attrs

    # The same work: what it continues, and to which rung (a configuration's legs to several
    # rungs name the same source; a final has no rung).
    def work(a: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        return a.get("source_study"), a.get("source_trial"), a.get(RUNG_TO_ATTR)

    if attrs.get("source_trial") is not None and any(
        t.state == TrialState.COMPLETE and work(t.user_attrs) == work(attrs) for t in trials
    ):
        return True
    if given_up and config_number(trial) in given_up:
        return True
    return diverged(attrs) or failed_as_given_up(attrs)


def _count(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    return counts


def _fail_stale(study: optuna.Study) -> None:
    optuna.storages.fail_stale_trials(study)


# ---- running trials --------------------------------------------------------------------


# Why a trial Optuna sampled anew trains nothing (its prune reason, after NOTHING_QUEUED).
TAKEN_FIRST = "another worker took the queued trial first"
NO_SLOT_LEFT = "every slot for a new configuration is taken"
NO_LONGER_WANTED = (
    "the search no longer wanted a new configuration (its trial budget spent or long budget full)"
)


# Fail reasons (exception names) of a leg whose machine failed it, not its configuration: the
# shared checkpoint store out of reach past its retries, or a checkpoint this machine could not
# write. Its retry is free and its worker stops (see _run_one).
_MACHINE_FAULTS = (CheckpointTransferError.__name__, CheckpointWriteError.__name__)


def _run_one(
    studies: Studies,
    stage: str,
    runner: TrialRunner,
    max_retries: int,
    claimed: int | None = None,
    on_fresh: Callable[[int], str | None] | None = None,
) -> int | None:
    """Run one trial of ``stage``; its number. Ctrl-C re-enqueues it so it resumes later.

    Optuna pops the first waiting trial, or samples a new one when none is waiting.
    ``claimed``: the waiting trial this process claimed; if Optuna popped another one that no
    one had claimed yet, the claim moves to it. ``on_fresh``: called with its number when Optuna
    sampled a new trial; it answers why this process may not train it, or None if it may (a slot
    was taken for it and the search still wants a new configuration). A trial it refuses is
    pruned at once as "nothing queued", with that reason, and trains nothing.
    """
    study = studies.of(stage)
    objective = runner.objective(stage)
    started: list[int] = []
    # One entry per exception the objective raised: whether it was a stop on purpose (Ctrl-C,
    # SIGTERM). Not the exception itself: its traceback would keep the trial's Run (and its
    # device memory) alive past the trial.
    raised: list[bool] = []
    unreachable: list[str] = []  # the storage outage that stopped on_fresh's check, if any

    def tracked(trial: optuna.Trial) -> float:
        started.append(trial.number)
        moved = claimed is not None and trial.number != claimed
        if moved and studies.claims.take(_waiting_key(study, trial.number)):
            studies.claims.release(_waiting_key(study, claimed))
        config = config_number(stored(trial))
        queued_leg = stage != "final" and _was_queued(stored(trial))  # not a fresh sample
        given_up = given_up_configurations(studies).get(config) if queued_leg else None
        if given_up is not None:  # see give_up: fails at once, trains nothing, not retried
            trial.set_user_attr("fail_reason", f"{GIVEN_UP}: {given_up}")
            raise ConfigurationGivenUp(f"configuration #{config} {GIVEN_UP}")
        twin = _twin_of(stored(trial), study.get_trials(deepcopy=False)) if queued_leg else None
        if twin is not None:  # trains nothing, like a duplicate configuration; not retried
            trial.set_user_attr("duplicate_of", twin)
            reason = f"skipped: the same leg as trial #{twin}, queued twice"
            trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)
        beyond = _beyond_the_long_budget(studies, runner.cfg, stored(trial)) if queued_leg else None
        if beyond is not None:  # trains nothing; its configuration may be promoted again later
            trial.set_user_attr(BEYOND_PLACES_ATTR, True)
            trial.set_user_attr("prune_reason", beyond)
            raise optuna.TrialPruned(beyond)
        refused = None
        if on_fresh is not None and not _was_queued(stored(trial)):
            try:
                refused = on_fresh(trial.number)
            except StorageUnavailableError as error:
                # The check read the storage and found it gone past the retry bound: not the
                # configuration's fault. It trains nothing (failed, its retry would spend one
                # of max_retries and train it outside any slot) and this worker stops below.
                unreachable.append(str(error))
                refused = "the storage could not be reached to check that it is still wanted"
        if refused is not None:
            reason = f"{NOTHING_QUEUED}: {refused}"
            trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)
        try:
            return objective(trial)
        except BaseException as error:
            raised.append(isinstance(error, KeyboardInterrupt))
            raise

    try:
        try:
            study.optimize(tracked, n_trials=1, catch=(Exception,))
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, AssertionError):
            # Optuna could not record the end of a trial that is finished already: another
            # worker failed it as stale (its heartbeat could not reach the storage for
            # grace_period) and queued its retry, which resumes from its checkpoint. Not this
            # worker's to record; it goes on. (Optuna's tell says "Cannot tell a FAIL trial",
            # or fails the log of a failure it finds no error for with an AssertionError.)
            if not started or not _failed_by_another(study, started[0]):
                raise
            tqdm.write(
                f"trial #{started[0]} of {study.study_name}: another worker failed it as stale "
                "while this one trained it (no heartbeat reached the storage for grace_period); "
                "its retry resumes from its checkpoint"
                + ("" if _stopping(raised) else ", and this worker goes on")
            )
            if _stopping(raised):  # Ctrl-C or SIGTERM meanwhile: this worker stops all the same
                raise KeyboardInterrupt from None
    except KeyboardInterrupt:  # stopped on purpose: the retry is not counted
        _requeue(studies, study, started, max_retries, counted=False)
        if not started and claimed is not None:  # stopped before it had popped a trial
            studies.claims.release(_waiting_key(study, claimed))
        raise
    finally:  # out of every frame that held the trial's exception
        release_trial_memory(raised=bool(raised))
    if unreachable:
        raise StorageUnavailableError(unreachable[0])
    if started:
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == started[0])
        reason = str(trial.user_attrs.get("fail_reason") or "")
        if trial.state == TrialState.FAIL and reason.startswith(_MACHINE_FAULTS):
            # The shared checkpoint store kept failing for its whole retry window (a network
            # outage, say), or this machine could not write a checkpoint (a full disk), not the
            # configuration: queued again free, to resume from its last checkpoint that was
            # kept, and this worker stops. Every leg it took meanwhile would fail the same way:
            # counted, they would spend every configuration's retries in seconds and lose them
            # for good.
            _requeue(studies, study, started, max_retries, counted=False)
            raise StageError(reason.split(": ", 1)[-1] + "; this worker stopped")
        if trial.state == TrialState.FAIL and reason.startswith(
            CheckpointUnreachableError.__name__
        ):
            # This worker cannot see the checkpoints the others write: every leg it took over
            # would fail the same way and lose its configuration. The leg goes back to the
            # queue for a worker that can read it, and this worker stops. Free when another
            # machine wrote the checkpoint (this machine's setup is at fault, and its other
            # workers would otherwise spend the retries in seconds); counted when this machine
            # wrote it, or it is not known who did: then the checkpoint is gone, not unshared.
            _requeue(studies, study, started, max_retries, counted=not _free_retry(trial))
            raise StageError(reason.split(": ", 1)[-1] + "; this worker stopped")
        if trial.state == TrialState.FAIL and reason.startswith(StorageUnavailableError.__name__):
            # The storage went away past the retry bound and came back in time to record it:
            # the configuration is not at fault, so it runs again, later (not counted as one of
            # its retries). This process stops.
            _requeue(studies, study, started, max_retries, counted=False)
            raise StorageUnavailableError(reason.split(": ", 1)[-1])
    return started[0] if started else None


def _failed_by_another(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number``, which this process ran, was failed by another worker (as
    stale) while it ran here: FAIL in storage without the reason this process records when its
    own trial fails (search.objective), which it could no longer write."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return (
        trial is not None
        and trial.state == TrialState.FAIL
        and "fail_reason" not in trial.user_attrs
    )


def _stopping(raised: list[bool]) -> bool:
    """Whether the objective was stopped on purpose (Ctrl-C, or SIGTERM turned into it)."""
    return any(raised)


def _requeue(
    studies: Studies,
    study: optuna.Study,
    started: list[int],
    max_retries: int,
    counted: bool = True,
) -> None:
    """Re-enqueue the failed trial this process started, to resume from its checkpoint; a
    retry not ``counted`` does not spend one of ``max_retries`` (see storage.trial_retry)."""
    if started:
        _queue_retry(studies, study, started[0], max_retries, counted)


def _queue_retry(
    studies: Studies, study: optuna.Study, number: int, max_retries: int, counted: bool
) -> None:
    """Queue failed trial ``number`` again (once, whoever asks: storage.trial_retry), without
    its ``fail_reason``: the retry is a fresh attempt at the same leg."""
    trial = next(t for t in study.get_trials(deepcopy=True) if t.number == number)
    if trial.state == TrialState.FAIL:
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "fail_reason"}
        retry = RetryFailedTrial(max_retry=max_retries, engine=studies.claims.engine)
        retry(study, trial, counted=counted)


def _owed_retries(studies: Studies, cfg: DictConfig, stage: str) -> list[FrozenTrial]:
    """``stage``'s failed trials whose retry is owed and not queued yet (see
    :func:`_retry_on_its_way`), leaving out configurations the user gave up."""
    study = studies.of(stage)
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in _history(t)}
    # Final trials carry no configuration number: the given-up ones are the search's.
    given_up = given_up_configurations(studies) if uses_rungs(cfg) and stage != "final" else {}
    return [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and _retry_on_its_way(t, retried, cfg)
        and config_number(t) not in given_up
    ]


def _retry_late(studies: Studies, cfg: DictConfig, stage: str) -> None:
    """Queue the retries a dead process owed: it failed a trial (a killed worker's, by
    heartbeat; or its own, stopped on purpose) and died before queueing the retry, or after
    claiming it (storage.trial_retry). After ``grace_period`` (the silence that makes a worker
    dead to the heartbeats; clocks in step, as heartbeats need) whoever sees it queues the retry,
    once. Until then the configuration counts as on its way, never as given up."""
    study = studies.of(stage)
    grace, now = float(cfg.grace_period), time.time()
    owed = [t for t in _owed_retries(studies, cfg, stage) if now - _failed_at(t) >= grace]
    if not owed:
        return
    held = studies.claims.taken_at(f"{study.study_name}/retry-of/")
    for t in owed:
        key = retry_claim_key(study.study_name, t.number)
        if key in held and not _take_back_if_abandoned(studies.claims, key, held[key], grace):
            continue  # its taker may still be queueing it, or took it again meanwhile
        _queue_retry(studies, study, t.number, int(cfg.max_retries), not _free_retry(t))


def _failed_at(trial: FrozenTrial) -> float:
    """When ``trial`` failed (``time.time()``, any machine); 0 when not known."""
    stamp = trial.system_attrs.get(FAILED_AT_ATTR)
    if stamp is None:  # failed before the stamp existed: Optuna's naive local time
        ended = trial.datetime_complete
        return 0.0 if ended is None else ended.timestamp()
    return float(stamp)


def _beyond_the_long_budget(studies: Studies, cfg: DictConfig, trial: FrozenTrial) -> str | None:
    """Why queued leg ``trial`` may not train (None if it may): it goes to the long budget,
    whose ``top_k`` places other configurations held before it.

    Seat claims admit at most ``top_k`` there; only a claimer frozen (SIGSTOP, a paused VM)
    for ``grace_period`` between re-reading its continuation claim and queueing the leg, while
    another process took the claim back and promoted another configuration, could queue one
    more. Whichever leg pops, every process orders the holders alike: by their first leg to
    the long budget, a claimed but unqueued one last, then by number. The leg outside the
    first ``top_k`` trains nothing, so the long budget never holds ``top_k + 1``.
    """
    if not uses_rungs(cfg):
        return None
    long = rung_ladder(cfg)[-1]
    if trial.user_attrs.get(RUNG_TO_ATTR) != long:
        return None
    holders = {r.number for r in scheduler_records(studies, cfg) if holds_long_budget_seat(r, long)}
    first_leg: dict[int, int] = {}
    for t in studies.of(_leg_stage(cfg, long)).get_trials(deepcopy=False):
        if (
            t.user_attrs.get(RUNG_TO_ATTR) == long
            and "duplicate_of" not in t.user_attrs
            and t.state != TrialState.PRUNED
        ):
            config = config_number(t)
            first_leg[config] = min(first_leg.get(config, t.number), t.number)
    mine = config_number(trial)
    order = sorted(holders | {mine}, key=lambda c: (first_leg.get(c, math.inf), c))
    top_k = int(cfg.stages.promote.top_k)
    if mine in order[:top_k]:
        return None
    before = ", ".join(f"#{c}" for c in order[:top_k])
    return (
        f"skipped: the long budget's {top_k} place(s) were held by configuration(s) {before} "
        "before this leg was queued"
    )


def _twin_of(trial: FrozenTrial, trials: list[FrozenTrial]) -> int | None:
    """The earlier trial that is the very same queued leg as ``trial`` (None if none): the same
    configuration, rungs and retry history. Claims queue each leg once; only a claimer frozen
    (SIGSTOP, a paused VM) for ``grace_period`` between re-reading its claim and inserting the
    leg, while another process took the claim back and queued it, could queue it twice. The
    later copy then trains nothing: two copies would continue one checkpoint side by side and
    count twice at their rung."""

    def identity(t: FrozenTrial) -> tuple:
        attrs = t.user_attrs
        return config_number(t), attrs.get(RUNG_FROM_ATTR), attrs.get(RUNG_TO_ATTR), _history(t)

    mine = identity(trial)
    return next(
        (
            t.number
            for t in trials
            if t.number < trial.number
            and "duplicate_of" not in t.user_attrs
            and BEYOND_PLACES_ATTR not in t.user_attrs
            and identity(t) == mine
        ),
        None,
    )


def _was_queued(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether ``trial`` was popped from the queue (enqueued, or a retry), not sampled anew."""
    return "fixed_params" in trial.system_attrs or original_number(trial) != trial.number


def _waiting_key(study: optuna.Study, number: int) -> str:
    return f"{study.study_name}/waiting/{number}"


# Claims on WAITING trials seen held while their trial still waited: key -> (the claim's
# taken-at stamp, when this process first saw that claim, time.monotonic).
_held_waiting_since: dict[str, tuple[float, float]] = {}


def _claim_waiting(studies: Studies, stage: str, grace_period: float) -> int | None:
    """Claim one WAITING trial of ``stage`` (its number): this process will pop one trial.

    Optuna pops the first waiting trial, which may not be the one claimed; :func:`_run_one`
    then moves the claim to the trial it got (see there), so every waiting trial is popped.
    A claim whose trial has still not been popped after ``grace_period`` seconds (as this
    process times it: no clocks compared) belongs to a process that died between claiming and
    popping; it is given back and taken again, or the trial would wait for ever. Only that very
    claim is given back: one taken again meanwhile starts its own grace period.
    """
    study = studies.of(stage)
    prefix = f"{study.study_name}/waiting/"
    held = studies.claims.taken_at(prefix)
    now = time.monotonic()
    for key in [k for k in _held_waiting_since if k.startswith(prefix)]:
        if _held_waiting_since[key][0] != held.get(key):
            del _held_waiting_since[key]  # given back, or taken again since
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        key = _waiting_key(study, t.number)
        if key in held:
            stamp, since = _held_waiting_since.setdefault(key, (held[key], now))
            if now - since <= grace_period:
                continue
            del _held_waiting_since[key]
            if not studies.claims.release_if_taken_at(key, stamp):  # its taker never popped it
                continue
        if studies.claims.take(key):
            return t.number
    return None


def _drain(
    studies: Studies,
    stage: str,
    runner: TrialRunner,
    cfg: DictConfig,
    new_slots: int = 0,
    on_trial: TrialDone | None = None,
) -> None:
    """Run ``stage``'s waiting trials and up to ``new_slots`` new ones, then wait for the rest.

    Returns when the stage has no WAITING or RUNNING trial and all slots are taken. Dead
    workers' trials are failed by heartbeat and re-enqueued, and picked up here.
    """
    study = studies.of(stage)
    while True:
        _fail_stale(study)
        _retry_late(studies, cfg, stage)
        claimed = _claim_waiting(studies, stage, float(cfg.grace_period))
        slot = None if claimed is not None else _claim_slot(studies, study, new_slots)
        if claimed is not None or slot is not None:
            # A waiting trial claimed can be gone by the time Optuna pops (another worker's, or
            # this one's own pop lost in doubt): the new configuration Optuna then samples is
            # pruned, as only a slot may start one (promote and final have none: it would be
            # unscreened there).
            if slot is not None:
                number = _run_on_slot(studies, stage, runner, int(cfg.max_retries), slot)
            else:
                number = _run_one(
                    studies,
                    stage,
                    runner,
                    int(cfg.max_retries),
                    claimed,
                    on_fresh=lambda _number: TAKEN_FIRST,
                )
            if on_trial and number is not None:
                on_trial(stage, number)
            continue
        counts = _count(study)
        idle = counts["RUNNING"] == 0 and counts["WAITING"] == 0
        if idle and not _owed_retries(studies, cfg, stage):
            return
        time.sleep(POLL_S)  # others are still training; their trials may yet need a retry


def _claim_slot(studies: Studies, study: optuna.Study, slots: int) -> str | None:
    """One of ``study``'s ``slots`` for a new configuration (its claim key), or None."""
    if slots <= 0:
        return None
    # A sampled configuration the study already had was skipped: sample another in its place
    # (bounded, for spaces too small to hold that many distinct configurations).
    skipped = sum("duplicate_of" in t.user_attrs for t in study.get_trials(deepcopy=False))
    slots += min(skipped, 10 * slots)
    taken = set(studies.claims.taken(f"{study.study_name}/slot/"))
    for i in range(slots):
        key = f"{study.study_name}/slot/{i}"
        if key not in taken and studies.claims.take(key):
            return key
    return None


def _slot_starting(studies: Studies, study: optuna.Study, grace: float) -> bool:
    """Whether a slot of ``study`` was taken for a new configuration that Optuna has not yet
    sampled, less than ``grace`` seconds ago: its taker is between the claim and Optuna's ask
    (which first fails stale trials), or died there (then, after ``grace``, it is not waited
    for). Slots are counted against the trials sampled anew that were let train or skipped
    as duplicates (:func:`_run_on_slot` releases every other)."""
    taken = studies.claims.taken_at(f"{study.study_name}/slot/")
    if not taken or time.time() - max(taken.values()) >= grace:
        return False
    spent = sum(
        not _was_queued(t)
        and not str(t.user_attrs.get("prune_reason", "")).startswith(NOTHING_QUEUED)
        for t in study.get_trials(deepcopy=False)
    )
    return len(taken) > spent


def _run_on_slot(
    studies: Studies,
    stage: str,
    runner: TrialRunner,
    max_retries: int,
    slot: str,
    unwanted: Callable[[int], str | None] = lambda _number: None,
) -> int | None:
    """Run one trial of ``stage`` on ``slot``, a claim for one new configuration; its number.

    The slot is spent only if Optuna sampled the new configuration it was taken for, and
    ``unwanted`` (asked with its number once it is sampled) has no reason against training it.
    Between the claim and Optuna's pop a trial can join the queue: ``optimize`` itself fails a
    dead worker's trial by heartbeat, and its retry callback queues the copy that this very pop
    then takes. A slot whose holder ran a queued trial instead, stopped before sampling, or
    sampled a configuration no longer wanted, is released; kept, it would be lost and the
    study would end one configuration short.
    """
    spent: list[int] = []

    def spend(number: int) -> str | None:
        refused = unwanted(number)
        if refused is None:
            spent.append(number)
        return refused

    try:
        return _run_one(studies, stage, runner, max_retries, on_fresh=spend)
    finally:
        if not spent:
            studies.claims.release(slot)


def _enqueue_once(
    studies: Studies, key: str, enqueue: Callable[[], int], done_study: optuna.Study
) -> None:
    """Run ``enqueue`` in exactly one process; the others wait until it has finished. A claim
    whose taker is known to be gone (it ran on this machine: see ``storage.claims.owner_gone``)
    is taken over."""
    deadline = time.monotonic() + 120
    while True:
        if studies.claims.take(key):
            if f"enqueued:{key}" in done_study.user_attrs:  # done by a taker since gone
                return
            try:
                count = enqueue()
            except BaseException:
                studies.claims.release(key)  # let a later run try again
                raise
            done_study.set_user_attr(f"enqueued:{key}", count)
            return
        if f"enqueued:{key}" in done_study.user_attrs:
            return
        holder = studies.claims.holder(key)
        if holder is not None and owner_gone(*holder):
            studies.claims.release_if_taken_at(key, holder[1])
            continue
        if time.monotonic() > deadline:
            raise StageError(
                f"{key}: another process ({holder[0] if holder else '?'}) claimed this step "
                "but did not finish it; if it died, delete the claim row from "
                "ssl_search_claims and run again"
            )
        time.sleep(POLL_S)


BASELINES_ATTR = "baselines"  # the screen study's user attr: what a result must beat


# A claim on the baselines older than this, taken on another machine, belongs to a process
# that died while scoring them (scoring takes seconds to minutes): it is taken over.
BASELINES_CLAIM_STALE_S = 3600.0


def record_baselines(studies: Studies, runner: TrialRunner) -> None:
    """Score the study's baselines once (one process, by claim) into the screen study's attrs,
    where the dashboard shows them and the report reads them. A claim whose taker died (killed
    while scoring: on this machine, its process is gone; elsewhere, after
    :data:`BASELINES_CLAIM_STALE_S`) is taken over."""
    screen = studies.screen
    if BASELINES_ATTR in screen.user_attrs:
        return
    key = f"{screen.study_name}/baselines"
    holder = studies.claims.holder(key)
    if holder is not None:
        owner, taken_at = holder
        if owner_gone(owner, taken_at) or time.time() - taken_at > BASELINES_CLAIM_STALE_S:
            studies.claims.release_if_taken_at(key, taken_at)
    if studies.claims.take(key):
        try:
            screen.set_user_attr(BASELINES_ATTR, runner.baselines())
        except BaseException:  # Ctrl-C, an error: the next run scores them
            studies.claims.release(key)
            raise


def _start_screen(studies: Studies, runner: TrialRunner, cfg: DictConfig) -> None:
    """Queue the report's own configuration first (once), and score the baselines (once)."""
    screen = studies.screen

    def enqueue_baseline() -> int:
        screen.enqueue_trial(
            baseline_params(cfg), user_attrs={"baseline": "report"}, skip_if_exists=True
        )
        return 1

    _enqueue_once(studies, f"{screen.study_name}/baseline", enqueue_baseline, screen)
    record_baselines(studies, runner)


def run_screen(
    studies: Studies, runner: TrialRunner, cfg: DictConfig, on_trial: TrialDone | None = None
) -> None:
    _start_screen(studies, runner, cfg)
    # The waiting baseline is one of the screen's trials: the rest are new samples.
    _drain(
        studies,
        "screen",
        runner,
        cfg,
        new_slots=int(cfg.stages.screen.trials) - 1,
        on_trial=on_trial,
    )


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """``study``'s ``k`` best COMPLETE trials, best first.

    Under rungs a stage study holds legs ending at different rungs, whose values are taken
    at different budgets and do not compare: the deepest rung's come first (Optuna's own rule
    for pruned trials), then as the scheduler ranks (:func:`_rank_of`). Trials without rungs
    rank by value alone, ties to the lower configuration.
    """
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    direction = (
        "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
    )
    return sorted(
        done, key=lambda t: (-int(t.user_attrs.get(RUNG_TO_ATTR, 0)), _rank_of(t, direction))
    )[:k]


def _rank_of(trial: FrozenTrial, direction: str) -> tuple[tuple[bool, float, int], int]:
    """Sort key of a COMPLETE trial among results at its rung: the scheduler's
    (:func:`search.scheduler.rank_key`: ties to the lower configuration), then trial order."""
    return rank_key(float(trial.value), config_number(trial), direction), trial.number


def run_promote(
    studies: Studies, runner: TrialRunner, cfg: DictConfig, on_trial: TrialDone | None = None
) -> None:
    screen, promote = studies.screen, studies.promote
    # The top-k is only known once every screen trial (retries included) has finished.
    _drain(studies, "screen", runner, cfg, on_trial=on_trial)
    best = top_trials(screen, int(cfg.stages.promote.top_k))
    if not best:
        raise StageError(
            f"{screen.study_name}: no completed screen trial to promote; see the failures "
            "in the summary"
        )

    def enqueue_promotions() -> int:
        for t in best:
            promote.enqueue_trial(
                t.params,
                user_attrs={
                    "source_study": screen.study_name,
                    "source_trial": t.number,
                    "source_value": t.value,
                    **carried_attrs(t),
                },
                skip_if_exists=True,
            )
        return len(best)

    # Once per top-k set: a rerun with a larger top_k or more screen trials promotes what its
    # top-k adds (the ones already promoted are skipped).
    chosen = ",".join(str(t.number) for t in best)
    _enqueue_once(studies, f"{promote.study_name}/enqueue/{chosen}", enqueue_promotions, promote)
    _drain(studies, "promote", runner, cfg, on_trial=on_trial)


def run_final(
    studies: Studies, runner: TrialRunner, cfg: DictConfig, on_trial: TrialDone | None = None
) -> None:
    promote, final = studies.promote, studies.final
    if not uses_rungs(cfg):
        _drain(studies, "promote", runner, cfg, on_trial=on_trial)
    best = long_budget_trials(studies, cfg)[:1]
    if not best:
        raise StageError(f"{promote.study_name}: no completed promoted trial to evaluate")
    t = best[0]
    source_study = stage_study_name(cfg.name, t.user_attrs.get("stage", "promote"))

    def enqueue_final() -> int:
        final.enqueue_trial(
            t.params,
            user_attrs={
                "source_study": source_study,
                "source_trial": t.number,
                "source_checkpoint_dir": t.user_attrs["checkpoint_dir"],
                "source_value": t.value,
                **carried_attrs(t),
                WRITTEN_BY_ATTR: _host_of(t),
            },
        )
        return 1

    # One final per best run at the long budget: a later run with a larger budget that finds a
    # better one evaluates it too (the report shows the final of the best).
    key = f"{final.study_name}/enqueue/{source_study}/{t.number}"
    finals = _final_of(final, source_study, t.number, finished=False)
    if not finals:
        _enqueue_once(studies, key, enqueue_final, final)
    elif _failed_in_an_earlier_run(studies, cfg, finals):
        # Its retries spent in an earlier run (an out-of-memory GPU another job held, say): this
        # run tries once more, else a rerun could never give the search its test numbers.
        attempts = len({original_number(f) for f in finals})
        _enqueue_once(studies, f"{key}/again-{attempts}", enqueue_final, final)
    _drain(studies, "final", runner, cfg, on_trial=on_trial)


def _failed_in_an_earlier_run(studies: Studies, cfg: DictConfig, finals: list[FrozenTrial]) -> bool:
    """Whether every final trial of one source failed for good (none waiting, running,
    complete or owed a retry) before this process opened the studies. Workers of the run in
    which it failed opened them earlier, so within one run a final is not tried again."""
    if any(f.state != TrialState.FAIL for f in finals):
        return False
    owed = {t.number for t in _owed_retries(studies, cfg, "final")}
    if any(f.number in owed for f in finals):
        return False
    return max(_failed_at(f) for f in finals) < studies.opened_at


def _final_of(
    final: optuna.Study, source_study: str, number: int, finished: bool = True
) -> list[optuna.trial.FrozenTrial]:
    """The final trials (``finished`` ones only, or any) that evaluate trial ``number`` of
    ``source_study``."""
    return [
        t
        for t in final.get_trials(deepcopy=False)
        if t.user_attrs.get("source_study") == source_study
        and t.user_attrs.get("source_trial") == number
        and (t.state.is_finished() or not finished)
    ]


STAGE_RUNNERS = {"screen": run_screen, "promote": run_promote, "final": run_final}


# ---- rungs over the whole budget (search.pruner: asha) ---------------------------------------


def scheduler_settings(cfg: DictConfig, up_to: int | None = None) -> dict[str, Any]:
    """The arguments of :func:`search.scheduler.decide` for study ``cfg``.

    ``up_to`` keeps only the rungs up to that many epochs (``stage=screen``: the screen is the
    rungs up to ``stages.screen.epochs``), with no cap at its top.
    """
    ladder = rung_ladder(cfg)
    top_k = int(cfg.stages.promote.top_k)
    if up_to is not None and up_to < ladder[-1]:
        ladder = [r for r in ladder if r <= up_to] or ladder[:1]
        top_k = int(cfg.stages.screen.trials)
    return {
        "rungs": ladder,
        "eta": int(cfg.search.pruner.reduction_factor),
        "top_k": top_k,
        "max_trials": int(cfg.stages.screen.trials),
        "direction": direction_of(cfg),
    }


def _within(records: list[TrialRecord], rungs: list[int]) -> list[TrialRecord]:
    """``records`` as a scheduler confined to ``rungs`` sees them (``stage=screen`` on a study
    whose legs already went further): what happened above its top rung is left out."""
    top = rungs[-1]
    return [
        dataclasses.replace(
            r,
            results={rung: value for rung, value in r.results.items() if rung <= top},
            running_to=None if r.running_to is not None and r.running_to > top else r.running_to,
            failed=r.failed and not (r.promoted_to is not None and r.promoted_to > top),
            promoted_to=None if r.promoted_to is None else min(r.promoted_to, top),
        )
        for r in records
    ]


def scheduler_records(studies: Studies, cfg: DictConfig) -> list[TrialRecord]:
    """One :class:`TrialRecord` per configuration, from the screen and promote studies.

    Each Optuna trial is one leg of a configuration, trained from ``rung_from`` (absent: a
    new configuration, from epoch 0) to ``rung_to``; its value is the result at ``rung_to``.
    Retries and continuations carry the configuration's number (``config``).
    """
    first = rung_ladder(cfg)[0]
    attempts: dict[int, list[TrialRecord]] = {}
    training: set[int] = set()  # configurations with a leg in state RUNNING
    for stage in ("screen", "promote"):
        trials = studies.of(stage).get_trials(deepcopy=False)
        training |= {config_number(t) for t in trials if t.state == TrialState.RUNNING}
        # every trial some retry continues (a retry's history names all its ancestors)
        retried = {n for t in trials for n in _history(t)}
        for t in trials:
            if "duplicate_of" in t.user_attrs or t.state == TrialState.PRUNED:
                continue
            to = int(t.user_attrs.get(RUNG_TO_ATTR, first))
            promoted = to if is_continuation(t.user_attrs) else None
            if t.state == TrialState.COMPLETE:
                record = TrialRecord(0, {to: float(t.value)}, promoted_to=promoted)
            elif t.state == TrialState.FAIL and diverged(t.user_attrs):
                # A result at its rung, the worst (NaN ranks last): ASHA's n_k counts every
                # configuration that trained to the rung, so the survivors' quota stays theirs.
                record = TrialRecord(0, {to: math.nan}, failed=True, promoted_to=promoted)
            elif t.state == TrialState.FAIL and not _retry_on_its_way(t, retried, cfg):
                record = TrialRecord(0, failed=True, promoted_to=promoted)
            else:  # RUNNING or WAITING (or about to be retried): on its way to its rung
                record = TrialRecord(0, running_to=to, promoted_to=promoted)
            attempts.setdefault(config_number(t), []).append(record)
    records = [
        merge_retries([dataclasses.replace(a, number=config) for a in legs])
        for config, legs in sorted(attempts.items())
    ]
    # A continuation claimed but not (yet) queued counts as sent, so nobody decides it again,
    # and as running, so nobody takes the study for finished meanwhile. If its claimer died
    # before queueing it, a worker gives the claim back after grace_period
    # (:func:`_take_back_unqueued`) and the promotion is decided again.
    claimed: dict[int, int] = {}  # config -> highest claimed rung
    for key in studies.claims.taken(_continue_prefix(studies)):
        config, rung = _continue_of(key)
        claimed[config] = max(claimed.get(config, 0), rung)
    given_up = given_up_configurations(studies)
    out = []
    for r in records:
        if r.number in given_up and r.number not in training:
            # Whatever is queued for it fails when taken, and it is never continued; a leg
            # that is training (its checkpoint was readable after all) ends as it would.
            out.append(dataclasses.replace(r, running_to=None, failed=True))
            continue
        if r.number in claimed:
            rung = claimed[r.number]
            queued = (r.promoted_to or 0) >= rung  # its leg is a trial by now
            if not queued and not r.running:
                r = dataclasses.replace(r, running_to=rung)
            r = dataclasses.replace(r, promoted_to=max(r.promoted_to or 0, rung))
        out.append(r)
    return out


def given_up_configurations(studies: Studies) -> dict[int, str]:
    """The configurations the user gave up (:func:`give_up`), each with the reason given."""
    attrs = studies.screen.user_attrs
    numbers = {key: given_up_number(key) for key in attrs}
    return {n: str(attrs[key]) for key, n in numbers.items() if n is not None}


def give_up(studies: Studies, cfg: DictConfig, number: int, reason: str) -> str:
    """Give up configuration ``number`` (under rungs), for good: a checkpoint it needs is lost,
    say, so every worker that takes its queued leg would stop. Its queued or retried legs fail
    when a worker takes them (training nothing), it is never continued again, and a place at
    the long budget it held goes to the next configuration in rank. What it recorded stays.
    Returns what was done, in one line; a :class:`UsageError` (before anything is written) for
    a configuration that does not exist, was given up already, or has its long-budget result.
    """
    screen = studies.screen.study_name
    if not uses_rungs(cfg):
        pruner = cfg.search.pruner.name
        raise UsageError(
            f"configuration: {cfg.name} does not use rungs (search.pruner.name={pruner}); only "
            "a configuration of a rung study (asha) can be given up"
        )
    records = {r.number: r for r in scheduler_records(studies, cfg)}
    if number not in records:
        known = [f"#{n}" for n in sorted(records)]
        if len(known) > 8:
            known = [*known[:5], "...", *known[-2:]]
        raise UsageError(
            f"configuration: no configuration #{number} in {screen}; it has "
            f"{', '.join(known) or 'none yet'}"
        )
    if number in given_up_configurations(studies):
        raise UsageError(f"configuration: #{number} of {screen} was given up already")
    long = rung_ladder(cfg)[-1]
    if long in records[number].results:
        raise UsageError(
            f"configuration: #{number} of {screen} already has its result at the long budget "
            f"({long} epochs); giving it up would not change the search"
        )
    record = records[number]
    training = any(
        config_number(t) == number
        for stage in ("screen", "promote")
        for t in studies.of(stage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    )
    studies.screen.set_user_attr(given_up_attr(number), reason)
    if training:  # its checkpoint was readable after all: that leg's result will count
        effects = ["its leg in training runs to its end", "it is not continued again"]
    else:
        effects = [
            "its queued leg fails when a worker takes it"
            if record.running
            else "it had no leg queued or running",
            "it is not continued again",
        ]
        if holds_long_budget_seat(record, long):
            effects.append("its place at the long budget goes to the next in rank")
    return f"configuration #{number} of {screen} given up ({reason}): {', '.join(effects)}; " + (
        "its recorded results stay"
    )


def _free_retry(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether failed ``trial``'s retry is free (does not spend one of ``max_retries``, see
    :func:`_run_one`): it was stopped on purpose (Ctrl-C, SIGTERM), the storage or the
    checkpoint store went away, a checkpoint could not be written here (a full disk), or the
    worker could not read a checkpoint another machine wrote (its own setup is at fault)."""
    reason = str(trial.user_attrs.get("fail_reason") or "")
    if reason.startswith((INTERRUPTED_REASON, StorageUnavailableError.__name__, *_MACHINE_FAULTS)):
        return True
    if reason.startswith(CheckpointUnreachableError.__name__):
        writer, reader = trial.user_attrs.get(WRITTEN_BY_ATTR), _host_of(trial)
        return None not in (writer, reader) and writer != reader
    return False


def _retry_on_its_way(trial: FrozenTrial, retried: set[Any], cfg: DictConfig) -> bool:
    """Whether failed ``trial`` is owed a retry not yet queued: a killed worker's trial (Optuna
    fails a stale trial and queues its retry in two steps), or one its own process stopped
    (Ctrl-C, the storage gone: see :func:`_requeue`). Meanwhile the configuration must not look
    given up (its place at the long budget freed, the study taken for finished); if the process
    died between the two steps, another queues the retry after grace_period
    (:func:`_retry_late`)."""
    reason = str(trial.user_attrs.get("fail_reason") or "")
    free = _free_retry(trial)
    requeued = reason.startswith(
        (
            INTERRUPTED_REASON,
            StorageUnavailableError.__name__,
            *_MACHINE_FAULTS,
            CheckpointUnreachableError.__name__,
        )
    )
    if (reason and not requeued) or trial.number in retried:
        return False  # failed on its own merits (never retried), or retried already
    return retry_allowed(trial, int(cfg.max_retries), counted=not free)  # or retries spent


def _snapshot(records: list[TrialRecord]) -> list[list[Any]]:
    """``records`` as JSON (stored with each promotion, so it can be checked afterwards); a
    diverged result (NaN, not JSON) is stored as null."""
    return [
        [
            r.number,
            {str(k): None if math.isnan(v) else v for k, v in r.results.items()},
            r.running_to,
            r.failed,
            r.promoted_to,
        ]
        for r in records
    ]


def records_from_snapshot(snapshot: list[list[Any]]) -> list[TrialRecord]:
    """The records a promotion was decided on (see :func:`_snapshot`)."""
    return [
        TrialRecord(
            int(n),
            {int(k): math.nan if v is None else float(v) for k, v in res.items()},
            run,
            bool(failed),
            prom,
        )
        for n, res, run, failed, prom in snapshot
    ]


def _first_leg(studies: Studies, config: int) -> optuna.trial.FrozenTrial:
    """The screen trial that sampled configuration ``config`` (or its retry that finished)."""
    legs = [t for t in studies.screen.get_trials(deepcopy=False) if config_number(t) == config]
    return next((t for t in legs if t.state == TrialState.COMPLETE), legs[0])


def _enqueue_continuation(
    studies: Studies,
    cfg: DictConfig,
    decision: Continue,
    records: list[TrialRecord],
    settings: dict[str, Any],
    seats_taken: int,
) -> bool:
    """Queue configuration ``decision.number``'s next leg, in exactly one process; whether
    this process queued it.

    ``seats_taken``: the long budget's seat claims, counted *before* ``records`` were read.
    """
    screen = studies.screen
    key = _continue_key(studies, decision.number, decision.to_rung)
    if not studies.claims.take(key):
        return False  # another process promoted it first
    seat = None
    try:
        if decision.to_rung == rung_ladder(cfg)[-1]:
            # At most top_k configurations hold a place at the long budget, whoever decides
            # (not the top of a screen-only run's ladder: stage=promote has its own seats).
            # Seats whose configuration gave its place back (it failed there), or that no
            # configuration holds (a take interrupted mid-way), are free again: seats_taken
            # minus the holders, counted before them, never overstates what is free.
            last = decision.to_rung
            holders = sum(holds_long_budget_seat(r, last) for r in records)
            pool = int(cfg.stages.promote.top_k) + max(0, seats_taken - holders)
            for i in range(pool):
                seat = f"{screen.study_name}/long-budget/{i}"
                if studies.claims.take(seat):
                    break
                seat = None
            if seat is None:  # the long budget filled meanwhile: not promoted
                studies.claims.release(key)
                return False
        if not studies.claims.holds(key):
            # Taken back meanwhile (this process stalled past grace_period, and another took
            # it for dead: _take_back_unqueued): the promotion is that one's to decide again.
            if seat is not None:
                studies.claims.release(seat, own_only=True)
            return False
        _queue_leg(studies, cfg, decision, records, settings)
        return True
    except BaseException:
        # Not queued (the storage failed, or this process is stopping): give the claims back,
        # so the promotion is decided again rather than lost; not if the leg is stored anyway.
        with contextlib.suppress(Exception):
            if not _leg_exists(studies, cfg, decision.number, decision.to_rung):
                if seat is not None:
                    studies.claims.release(seat, own_only=True)
                studies.claims.release(key, own_only=True)  # not one taken back and again
        raise


def _continue_prefix(studies: Studies) -> str:
    return f"{studies.screen.study_name}/continue/"


def _continue_key(studies: Studies, number: int, to_rung: int) -> str:
    """The claim of the one process that queues configuration ``number``'s leg to ``to_rung``."""
    return f"{_continue_prefix(studies)}{number}/{to_rung}"


def _continue_of(key: str) -> tuple[int, int]:
    """(configuration, rung) of a continuation claim's key (:func:`_continue_key`)."""
    config, rung = key.rsplit("/", 2)[1:]
    return int(config), int(rung)


def _take_back_unqueued(studies: Studies, cfg: DictConfig) -> None:
    """Give back a continuation claim whose leg was never queued, ``grace_period`` after it was
    taken (its claimer died between the two steps; clocks in step, as heartbeats need): the
    promotion is then decided again on the records as they are, instead of the configuration
    being lost. Only that very claim goes: one taken again meanwhile is left alone."""
    grace, now = float(cfg.grace_period), time.time()
    for key, at in studies.claims.taken_at(_continue_prefix(studies)).items():
        if now - at >= grace and not _leg_exists(studies, cfg, *_continue_of(key)):
            _take_back_if_abandoned(studies.claims, key, at, grace)


def _take_back_if_abandoned(claims: Claims, key: str, taken_at: float, grace: float) -> bool:
    """Release claim ``key`` (as taken at ``taken_at``) if its taker abandoned it: silent for
    ``grace`` seconds and not another process known to run (one of this machine: slow, riding
    out a storage outage, not dead). A taker elsewhere that was only slow finds its claim gone
    before it queues anything (:meth:`storage.claims.Claims.holds`). Whether it was released."""
    if time.time() - taken_at < grace:
        return False
    holder = claims.holder(key)
    if holder is not None and holder[0] != claims.owner and owner_alive(*holder):
        return False
    return claims.release_if_taken_at(key, taken_at)


def _leg_stage(cfg: DictConfig, to_rung: int) -> str:
    """The study a leg to ``to_rung`` belongs to: the screen holds the rungs up to
    ``stages.screen.epochs``, promote those above."""
    return "screen" if to_rung <= int(cfg.stages.screen.epochs) else "promote"


def _leg_exists(studies: Studies, cfg: DictConfig, number: int, to_rung: int) -> bool:
    """Whether configuration ``number``'s leg to ``to_rung`` is a trial (not counting one
    pruned beyond the long budget's places: the configuration may be promoted there again)."""
    return any(
        t.user_attrs.get("config") == number
        and t.user_attrs.get(RUNG_TO_ATTR) == to_rung
        and BEYOND_PLACES_ATTR not in t.user_attrs
        for t in studies.of(_leg_stage(cfg, to_rung)).get_trials(deepcopy=False)
    )


def _host_of(trial: optuna.trial.FrozenTrial | None) -> str | None:
    """The machine a trial ran on (from its ``worker`` attr); None if unknown."""
    worker = None if trial is None else trial.user_attrs.get("worker")
    return owner_host(str(worker)) or None if worker else None


def _leg_at(
    studies: Studies, cfg: DictConfig, number: int, rung: int
) -> optuna.trial.FrozenTrial | None:
    """Configuration ``number``'s completed leg that ended at ``rung`` (None if none)."""
    return next(
        (
            t
            for t in studies.of(_leg_stage(cfg, rung)).get_trials(
                deepcopy=False, states=(TrialState.COMPLETE,)
            )
            if config_number(t) == number and t.user_attrs.get(RUNG_TO_ATTR) == rung
        ),
        None,
    )


def _queue_leg(
    studies: Studies,
    cfg: DictConfig,
    decision: Continue,
    records: list[TrialRecord],
    settings: dict[str, Any],
) -> None:
    """Enqueue the leg ``decision`` calls for, with the ranking it was decided on."""
    screen = studies.screen
    source = _first_leg(studies, decision.number)
    ranked = ranking(records, decision.from_rung, settings["direction"])
    stage = _leg_stage(cfg, decision.to_rung)
    value = next(r for r in records if r.number == decision.number).results[decision.from_rung]
    studies.of(stage).enqueue_trial(
        source.params,
        user_attrs={
            "config": decision.number,
            RUNG_FROM_ATTR: decision.from_rung,
            RUNG_TO_ATTR: decision.to_rung,
            "checkpoint_dir": source.user_attrs.get("checkpoint_dir"),
            **carried_attrs(source),
            WRITTEN_BY_ATTR: _host_of(_leg_at(studies, cfg, decision.number, decision.from_rung)),
            "source_study": screen.study_name,
            "source_trial": decision.number,
            "source_value": value,
            "promotion": {
                "rank": ranked.index(decision.number) + 1,
                "of": len(ranked),
                "records": _snapshot(records),
            },
        },
    )


def run_rungs(
    studies: Studies,
    runner: TrialRunner,
    cfg: DictConfig,
    on_trial: TrialDone | None = None,
    up_to: int | None = None,
) -> None:
    """Asynchronous successive halving over the whole budget (see :mod:`search.scheduler`).

    Every process loops: run a queued leg if there is one (a retry, or a continuation some
    process decided), else ask :func:`search.scheduler.decide` what the stored records call
    for: queue a continuation (exactly once, by claim), start a new configuration (by slot
    claim), wait for running trials, or stop.
    """
    screen = studies.screen
    _start_screen(studies, runner, cfg)
    settings = scheduler_settings(cfg, up_to)

    def records_now() -> list[TrialRecord]:
        return _within(scheduler_records(studies, cfg), settings["rungs"])

    def unwanted(number: int) -> str | None:
        # Checked once Optuna has sampled configuration ``number``, on the records as they
        # are now: the long budget may have filled since this worker decided to start one.
        others = [r for r in records_now() if r.number != number]
        return None if may_start_new(others, **settings) else NO_LONGER_WANTED

    retries = int(cfg.max_retries)
    new_configs = int(cfg.stages.screen.trials) - 1  # the report's configuration is the first
    finished_on: list[TrialRecord] | None = None  # the records of the last Finished decision
    while True:
        for stage in ("screen", "promote"):
            _fail_stale(studies.of(stage))
            _retry_late(studies, cfg, stage)
        _take_back_unqueued(studies, cfg)
        # Queued legs first, deepest stage first: any process may pop them.
        queued = next(
            (
                stage
                for stage in ("promote", "screen")
                if studies.of(stage).get_trials(deepcopy=False, states=(TrialState.WAITING,))
            ),
            None,
        )
        if queued is not None:

            def new_slot(number: int, stage: str = queued) -> str | None:
                # Optuna sampled a configuration because the queue emptied under this worker:
                # it may train only if a new one could still matter, and takes a slot.
                if stage != "screen":
                    return TAKEN_FIRST
                refused = unwanted(number)
                if refused is None and _claim_slot(studies, screen, new_configs) is None:
                    return NO_SLOT_LEFT
                return refused

            number = _run_one(studies, queued, runner, retries, on_fresh=new_slot)
            if on_trial and number is not None:
                on_trial(queued, number)
            continue
        seats_taken = len(studies.claims.taken(f"{screen.study_name}/long-budget/"))
        records = records_now()
        decision = decide(records, **settings)
        if isinstance(decision, Continue):
            if not _enqueue_continuation(studies, cfg, decision, records, settings, seats_taken):
                time.sleep(POLL_S)  # another process promoted it, or no seat was free yet
            continue  # whoever queued it, the loop's next turn picks the leg up
        if isinstance(decision, StartNew):
            slot = _claim_slot(studies, screen, new_configs)
            if slot is not None:
                number = _run_on_slot(studies, "screen", runner, retries, slot, unwanted)
                if on_trial and number is not None:
                    on_trial("screen", number)
                continue
            if _slot_starting(studies, screen, float(cfg.grace_period)):
                # Another worker's configuration is about to exist: decided without it, the
                # endgame could promote on fewer results than the rule allows.
                time.sleep(POLL_S)
                continue
            # Every slot is spent: on duplicates in a space too small for
            # stages.screen.trials, or held past grace_period by a worker that died before
            # starting its configuration. Decide as if the trial budget were spent, so the
            # study still promotes and ends.
            decision = decide(records, **{**settings, "max_trials": len(records)})
            if isinstance(decision, Continue):
                if not _enqueue_continuation(
                    studies, cfg, decision, records, settings, seats_taken
                ):
                    time.sleep(POLL_S)
                continue
        if isinstance(decision, Finished):
            # Some work is invisible for a moment: a continuation claimed but not yet queued,
            # a killed leg failed but its retry not yet queued, a configuration whose slot is
            # taken but whose trial is not yet created. End only when the same records said
            # so a poll apart.
            if records == finished_on:
                return
            finished_on = records
        time.sleep(POLL_S)  # others are training; their results decide what comes next


# A study's stage studies: this process's Studies, or stage -> study as the report loads them.
StageStudies = Studies | Mapping[str, optuna.Study]


def _stage(studies: StageStudies, stage: str) -> optuna.Study:
    return studies.of(stage) if isinstance(studies, Studies) else studies[stage]


def long_budget_trials(studies: StageStudies, cfg: DictConfig) -> list[optuna.trial.FrozenTrial]:
    """Completed runs at the long budget, best first: the promote stage's results."""
    if not uses_rungs(cfg):
        promote = _stage(studies, "promote")
        return top_trials(promote, len(promote.trials))
    last = rung_ladder(cfg)[-1]
    done = [
        t
        for stage in ("screen", "promote")
        for t in _stage(studies, stage).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if int(t.user_attrs.get(RUNG_TO_ATTR, 0)) == last
    ]
    return sorted(done, key=lambda t: _rank_of(t, direction_of(cfg)))


def _finals_of_the_best(studies: StageStudies, cfg: DictConfig) -> list[FrozenTrial]:
    """The finished final trials of the best run at the long budget (its retries too)."""
    at_long_budget = long_budget_trials(studies, cfg)
    if not at_long_budget:
        return []
    best = at_long_budget[0]
    source = stage_study_name(cfg.name, best.user_attrs.get("stage", "promote"))
    return _final_of(_stage(studies, "final"), source, best.number)


def found_final(studies: StageStudies, cfg: DictConfig) -> FrozenTrial | None:
    """The final trial that reports the configuration the search found: the final of the best
    run at the long budget, ranked by the study's metric as the search ranks it, not by the
    finals' own accuracy. Until that one has completed (a later run with a larger budget found
    a better run and its final is still to come), the best completed final stands in, an
    earlier best's; None when no final completed.
    """
    of_the_best = [t for t in _finals_of_the_best(studies, cfg) if t.state == TrialState.COMPLETE]
    if of_the_best:
        return of_the_best[-1]
    best = top_trials(_stage(studies, "final"), 1)
    return best[0] if best else None


@dataclass(frozen=True)
class Progress:
    """How far a study is, from storage: what the progress bar shows."""

    configurations: int  # configurations with a finished leg
    planned: int  # stages.screen.trials: at most this many (the rungs may end sooner)
    legs: int  # finished screen and promote trials (rung legs, retries)
    long_budget: int  # completed runs at the long budget
    top_k: int
    final: int  # finished final trials
    final_planned: int  # 1 when this run has a final stage, else 0

    def __str__(self) -> str:
        # A rerun with a smaller top_k than an earlier run's may find more there than it allows.
        long = f"{self.long_budget}/{self.top_k}"
        if self.long_budget > self.top_k:
            long = f"{self.long_budget} (top_k now {self.top_k})"
        said = f"legs {self.legs}, long budget {long}"
        return said + (f", final {self.final}/{self.final_planned}" if self.final_planned else "")


def progress(studies: Studies, cfg: DictConfig) -> Progress:
    """The study's :class:`Progress`; it only reads storage."""
    legs = {
        stage: [
            t
            for t in studies.of(stage).get_trials(deepcopy=False)
            if t.state.is_finished() and not trained_nothing(t.user_attrs)
        ]
        for stage in ("screen", "promote")
    }
    at_long_budget = long_budget_trials(studies, cfg)
    return Progress(
        configurations=len({config_number(t) for t in legs["screen"]}),  # retries: the same
        planned=int(cfg.stages.screen.trials),
        legs=len(legs["screen"]) + len(legs["promote"]),
        long_budget=len(at_long_budget),
        top_k=int(cfg.stages.promote.top_k),
        # The final of the best run at the long budget (an earlier best's may be there too)
        final=int(bool(_finals_of_the_best(studies, cfg))),
        final_planned=int(bool(cfg.stages.final.enabled) and cfg.stage in ("all", "final")),
    )


_DIGEST_OWNER = "images:"  # the owner of a study's data-digest claim: "images:<digest>"


def check_same_images(studies: Studies, splits: ImageSplits) -> None:
    """Raise :class:`DataError` (one line, ``data.root``) when this worker's images are not the
    ones the study was started on (:attr:`models.data.ImageSplits.digest`, recorded by its
    first worker): one machine with torchvision's CIFAR-10 pickles and another with the JPEG
    copy would rank configurations on different validation images. Checked before any trial
    is taken, so nothing is failed or retried for it."""
    digest = splits.digest
    study = studies.screen
    recorded = study.user_attrs.get(DATA_DIGEST_ATTR)
    if recorded is None:
        # The first worker's images are a claim, taken by one of however many first workers
        # start at once; its owner field holds their digest for the others to compare.
        key = f"{study.study_name}/data-digest"
        first = Claims(studies.claims.engine, owner=f"{_DIGEST_OWNER}{digest}")
        if first.take(key):
            study.set_user_attr(DATA_DIGEST_ATTR, digest)  # shown with the study
            recorded = digest
        else:
            holder = studies.claims.holder(key)
            recorded = (
                holder[0].removeprefix(_DIGEST_OWNER)
                if holder is not None
                else study.user_attrs.get(DATA_DIGEST_ATTR)
            )
    if recorded != digest:
        source = splits.source or "as this machine's data.root holds them"
        raise DataError(
            f"data.root: this worker's images (digest {digest}: {source}) are not the ones "
            f"{study.study_name} was started on (digest {recorded}); every worker must read "
            "the same copy of the data (torchvision's CIFAR-10 pickles and the JPEG copy differ), "
            "and image files decoded by the same Pillow version on every machine"
        )


def run_stages(
    studies: Studies, runner: TrialRunner, cfg: DictConfig, on_trial: TrialDone | None = None
) -> None:
    """Run the configured stage, or all three in order."""
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    if uses_rungs(cfg) and cfg.stage in ("all", "screen", "promote"):
        up_to = int(cfg.stages.screen.epochs) if cfg.stage == "screen" else None
        run_rungs(studies, runner, cfg, on_trial, up_to)
        stages = tuple(s for s in stages if s == "final")
    for stage in stages:
        if stage == "final" and not cfg.stages.final.enabled:
            continue
        STAGE_RUNNERS[stage](studies, runner, cfg, on_trial)


# ---- summary ---------------------------------------------------------------------------


def summarize(studies: Studies, cfg: DictConfig) -> dict[str, Any]:
    """Per stage: counts by state, the best trial's params and value; final test numbers."""
    out: dict[str, Any] = {"metric": stage_metric(cfg, "screen"), "stages": {}}
    given_up = given_up_configurations(studies) if uses_rungs(cfg) else {}
    for stage in STAGES:
        study = studies.of(stage)
        trials = study.get_trials(deepcopy=False)
        # A trial skipped before training (a duplicate, nothing left to run) counts apart.
        state = {
            t.number: SKIPPED if trained_nothing(t.user_attrs) else t.state.name for t in trials
        }
        counts = {
            s: sum(name == s for name in state.values())
            for s in ("COMPLETE", "PRUNED", SKIPPED, "FAIL", "RUNNING", "WAITING")
        }
        if stage == "final":
            shown = found_final(studies, cfg)
            best = [shown] if shown is not None else []
        else:
            best = top_trials(study, 1)
        entry: dict[str, Any] = {"study": study.study_name, "counts": counts}
        if best:
            entry["best"] = {
                "number": best[0].number,
                "value": best[0].value,
                "params": best[0].params,
            }
            entry["best"]["user_attrs"] = {
                k: v for k, v in best[0].user_attrs.items() if not is_curve_attr(k)
            }
        entry["failures"] = {
            t.number: failure_reason(t, trials) for t in trials if t.state == TrialState.FAIL
        }
        # Final trials carry no configuration number: the given-up ones are the search's.
        of_stage = given_up if stage != "final" else {}
        entry["without_result"] = {
            n: reason
            for n, reason in entry["failures"].items()
            if not _has_result(n, trials, of_stage)
        }
        if stage == "screen" and uses_rungs(cfg):
            entry["given_up"] = given_up
        if stage == "promote":
            entry["lineage"] = {
                t.number: (t.user_attrs.get("source_study"), t.user_attrs.get("source_trial"))
                for t in trials
                if "source_trial" in t.user_attrs
            }
        out["stages"][stage] = entry
    return out
