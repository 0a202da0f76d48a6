"""Queueing a failed trial again, up to ``max_retry`` times, where a trial stopped on purpose
does not spend a retry.

Optuna's ``RetryHeartbeatStaleTrialCallback`` counts every link of a retry chain against
``max_retry``. Here a retry can be asked for with ``counted=False`` (a trial stopped by Ctrl-C
or SIGTERM, a preempted job: nothing wrong with the configuration), recorded in the retry's
system attr :data:`FREE_RETRIES_ATTR`, so a job preempted four times in one long leg keeps its
configuration. Retries are recorded exactly as Optuna records them (``failed_trial``,
``retry_history``), so ``RetryHeartbeatStaleTrialCallback.retry_history`` still reads them.
A trial is retried once, however many processes ask at the same moment (one configuration, one
queued leg): the retry of trial N is a claim (:mod:`storage.claims`) on ``engine``, the study
database, taken before the retry is queued.

Example::

    retry = RetryFailedTrial(max_retry=3, engine=storage.engine)
    retry(study, failed_trial)                  # a dead worker's trial: spends one of 3
    retry(study, stopped_trial, counted=False)  # interrupted on purpose: free
"""

from __future__ import annotations

from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState

from storage.claims import Claims, owner_gone
from storage.retry import RETRY_LIMIT_ATTR

FREE_RETRIES_ATTR = "free_retries"  # system attr: the retries of the chain that were not counted


def retry_claim_key(study_name: str, number: int) -> str:
    """The claim taken by the one process that queues the retry of trial ``number``."""
    return f"{study_name}/retry-of/{number}"


def _retried(study: optuna.Study, number: int) -> bool:
    """Whether a retry of trial ``number`` is in the study already."""
    return any(
        t.system_attrs.get("retry_history", [])[-1:] == [number]
        for t in study.get_trials(deepcopy=False)
    )


def retries_spent(trial: FrozenTrial) -> int:
    """How many of ``max_retry`` the retry chain ending at ``trial`` has spent."""
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return len(history) - int(trial.system_attrs.get(FREE_RETRIES_ATTR, 0))


def retry_allowed(trial: FrozenTrial, max_retry: int | None, counted: bool = True) -> bool:
    """Whether failed ``trial`` may be queued once more: a ``counted`` retry spends one of
    ``max_retry``; a free one spends none, and is still refused to a chain that has spent more
    than ``max_retry`` (a later run lowered it). A failure is retried under the limit in force
    when it happened (:data:`storage.retry.RETRY_LIMIT_ATTR`) when that was lower: raising
    ``max_retries`` later does not revive it. The one rule :class:`RetryFailedTrial` and
    whoever waits for its retry both follow."""
    stamped = trial.system_attrs.get(RETRY_LIMIT_ATTR)
    if stamped is not None:
        max_retry = int(stamped) if max_retry is None else min(max_retry, int(stamped))
    return max_retry is None or retries_spent(trial) + int(counted) <= max_retry


class RetryFailedTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback (usable as RDBStorage's ``heartbeat_stale_trial_callback``),
    where a retry asked for with ``counted=False`` does not spend one of ``max_retry``.

    ``engine``: the study database's, where the claim that makes a retry once-only is taken
    (:class:`storage.retry.RetryingRDBStorage` sets it on its own heartbeat callback). Without
    one, two processes asking at the very same moment may both queue a retry.
    """

    def __init__(
        self,
        max_retry: int | None = None,
        inherit_intermediate_values: bool = False,
        engine: sa.Engine | None = None,
    ) -> None:
        super().__init__(max_retry, inherit_intermediate_values)
        self.engine = engine
        self._claims: Claims | None = None

    @property
    def max_retry(self) -> int | None:
        """The retries a failed trial's chain may spend (None: no limit)."""
        return self._max_retry

    def __getstate__(self) -> dict[str, Any]:
        # An engine does not pickle; the storage that holds this callback sets it again.
        return {**self.__dict__, "engine": None, "_claims": None}

    def _claims_of_engine(self) -> Claims | None:
        if self.engine is None:
            return None
        if self._claims is None or self._claims.engine is not self.engine:
            self._claims = Claims(self.engine)
        return self._claims

    def __call__(self, study: optuna.Study, trial: FrozenTrial, counted: bool = True) -> None:
        free = int(trial.system_attrs.get(FREE_RETRIES_ATTR, 0)) + (0 if counted else 1)
        system_attrs: dict[str, Any] = {
            "failed_trial": trial.number,
            **trial.system_attrs,
            "retry_history": [*trial.system_attrs.get("retry_history", []), trial.number],
            FREE_RETRIES_ATTR: free,
        }
        if not retry_allowed(trial, self._max_retry, counted):
            return
        if _retried(study, trial.number):
            return  # retried already: two processes that each took the failure for theirs
        # The look above and the insert below are two steps: two processes asking at once
        # would both pass the look. The claim lets one through.
        claims = self._claims_of_engine()
        key = retry_claim_key(study.study_name, trial.number)
        if claims is not None and not claims.take(key):
            holder = claims.holder(key)
            if holder is None or not owner_gone(*holder):
                return  # another process is queueing this retry, or has
            # Its taker died before queueing it (this machine's process, known gone): the
            # retry is taken over, once, unless that process queued it after all.
            if not claims.release_if_taken_at(key, holder[1]) or not claims.take(key):
                return
            if _retried(study, trial.number):
                return
        try:
            # Taken back meanwhile (this process stalled past grace_period, and another took
            # it for dead and queues the retry): leave it to that one.
            if claims is not None and not claims.holds(key):
                return
            study.add_trial(
                optuna.create_trial(
                    state=TrialState.WAITING,
                    params=trial.params,
                    distributions=trial.distributions,
                    user_attrs=trial.user_attrs,
                    system_attrs=system_attrs,
                    intermediate_values=(
                        trial.intermediate_values if self._inherit_intermediate_values else None
                    ),
                )
            )
        except BaseException:
            if claims is not None:  # no retry was queued: let the next process that asks
                claims.release(key, own_only=True)
            raise
