"""Queueing a failed trial again, up to ``max_retry`` times, where a trial stopped on purpose
does not spend a retry.

Optuna's ``RetryHeartbeatStaleTrialCallback`` counts every link of a retry chain against
``max_retry``. Here a retry can be asked for with ``counted=False`` (a trial stopped by Ctrl-C
or SIGTERM, a preempted job: nothing wrong with the configuration), recorded in the retry's
system attr :data:`FREE_RETRIES_ATTR`, so a job preempted four times in one long leg keeps its
configuration. Retries are recorded exactly as Optuna records them (``failed_trial``,
``retry_history``), so ``RetryHeartbeatStaleTrialCallback.retry_history`` still reads them.
A trial already retried is not retried again (one configuration, one queued leg).

Example::

    retry = RetryFailedTrial(max_retry=3)
    retry(study, failed_trial)                  # a dead worker's trial: spends one of 3
    retry(study, stopped_trial, counted=False)  # interrupted on purpose: free
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

FREE_RETRIES_ATTR = "free_retries"  # system attr: the retries of the chain that were not counted


def retries_spent(trial: FrozenTrial) -> int:
    """How many of ``max_retry`` the retry chain ending at ``trial`` has spent."""
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return len(history) - int(trial.system_attrs.get(FREE_RETRIES_ATTR, 0))


class RetryFailedTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback (usable as RDBStorage's ``heartbeat_stale_trial_callback``),
    where a retry asked for with ``counted=False`` does not spend one of ``max_retry``."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial, counted: bool = True) -> None:
        free = int(trial.system_attrs.get(FREE_RETRIES_ATTR, 0)) + (0 if counted else 1)
        system_attrs: dict[str, Any] = {
            "failed_trial": trial.number,
            **trial.system_attrs,
            "retry_history": [*trial.system_attrs.get("retry_history", []), trial.number],
            FREE_RETRIES_ATTR: free,
        }
        spent = len(system_attrs["retry_history"]) - free
        if self._max_retry is not None and spent > self._max_retry:
            return
        if any(
            t.system_attrs.get("retry_history", [])[-1:] == [trial.number]
            for t in study.get_trials(deepcopy=False)
        ):
            return  # retried already: two processes that each took the failure for theirs
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
