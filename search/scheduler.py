"""Asynchronous successive halving (ASHA) over the whole budget: the one place that decides.

Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning". A trial trains to the
first *rung*, stops there, and is continued (from its checkpoint) to the next rung as soon as it
ranks in the top ``1/eta`` of all results recorded at its rung so far, whether or not other
trials are still running. A worker with nothing to continue starts a new configuration until
``max_trials`` configurations exist. Nothing here trains, reads a clock or draws a random
number: :func:`decide` maps what is in storage (one :class:`TrialRecord` per configuration) to
the next piece of work, so the same records always give the same decision, whatever the study
is called, and the same code drives real workers and the simulator (``benchmarks/simulate.py``).

Rules (each is tested in ``tests/test_scheduler.py``):

rungs
    :func:`rungs`: geometric from the first rung to the long budget in ``floor(log_eta(long /
    first))`` steps (at least one), each rounded half up to whole epochs, so consecutive rungs
    are about ``eta`` apart: ``rungs(1, 100, 3) == [1, 3, 10, 32, 100]``, ``rungs(1, 91, 3) ==
    [1, 3, 10, 29, 91]``.
ranking
    the results recorded at a rung, best first; ties go to the lower trial number; a NaN result
    ranks last (a leg that diverged records NaN at the rung it was training to, so it counts
    among the rung's ``n`` results as it does in ASHA, and is never continued). Every recorded
    result counts, also those of trials that went on, are running further, or failed later: a
    result once recorded is never taken back, so a promotion that was justified stays justified.
promotion
    scanning from the highest-but-one rung down, the best-ranked trial that is waiting at rung
    ``k`` (``k`` is its highest result, it is neither running nor failed, nor was it continued)
    and whose rank is below ``floor(n_k / eta)`` is continued to the next rung.
long budget
    at most ``top_k`` configurations hold a place at the last rung
    (:func:`holds_long_budget_seat`). Once ``top_k`` do, nothing new starts and nothing else is
    continued: no other configuration could reach the long budget any more, so further work
    could not change the result. A configuration that failed on its way there (diverged, or
    its retries spent) gives its place back, so the next in rank can take it and the study
    still ends with a long-budget result. ASHA promotes early (on few results), so the places
    usually fill before ``max_trials`` configurations have started, and the study ends there
    (replayed with ``top_k = max_trials / eta ** (len(rungs) - 1)``: a median 38 of 81 started
    with 1 worker, 140 of 216 with 8). A larger ``top_k`` spends more of the trial budget;
    opening the places in step with the configurations started spent all of it without a
    better result (``docs/performance.md``).
endgame
    when no new configuration may start and nothing is running, but no configuration was sent
    to the long budget, the best-ranked waiting trial at the highest rung that has one is
    continued (one rung at a time), so a study always ends with a long-budget result.
retries
    a trial that failed mid-rung has no result at that rung. A retry continues the same
    configuration from its checkpoint; the caller folds the attempts of one configuration into
    one record with :func:`merge_retries` (the record keeps the original's number, which is
    also what keys the checkpoints). A queued retry counts as running towards its rung.

Example::

    >>> ladder = rungs(1, 100, 3)
    >>> ladder
    [1, 3, 10, 32, 100]
    >>> records = [
    ...     TrialRecord(0, {1: 0.91}),
    ...     TrialRecord(1, {1: 0.52}),
    ...     TrialRecord(2, {1: 0.70}),
    ...     TrialRecord(3, {}, running_to=1),
    ... ]
    >>> settings = dict(rungs=ladder, eta=3, top_k=3, max_trials=20, direction="maximize")
    >>> decide(records, **settings)  # trial 0 ranks first of 3 results: top 1/3
    Continue(number=0, from_rung=1, to_rung=3)
    >>> promotion_justified(records, 0, 1, **settings)
    True
    >>> records[0] = TrialRecord(0, {1: 0.91}, running_to=3, promoted_to=3)
    >>> decide(records, **settings)  # nothing else is in the top third: a new configuration
    StartNew(to_rung=1)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["maximize", "minimize"]
DIRECTIONS = ("maximize", "minimize")


def rungs(first: int, long_budget: int, eta: int) -> list[int]:
    """The rung epochs from ``first`` to ``long_budget``: geometric, rounded half up, strictly
    increasing, ending exactly at ``long_budget``.

    >>> rungs(1, 81, 3), rungs(1, 100, 3), rungs(2, 100, 3), rungs(5, 10, 3), rungs(8, 8, 3)
    ([1, 3, 9, 27, 81], [1, 3, 10, 32, 100], [2, 7, 27, 100], [5, 10], [8])
    """
    if first < 1 or long_budget < first or eta < 2:
        raise ValueError(
            f"rungs: need 1 <= first <= long_budget and eta >= 2, "
            f"got first={first}, long_budget={long_budget}, eta={eta}"
        )
    if first == long_budget:
        return [first]
    # The small tolerance keeps exact powers (81 / 1 with eta 3) at their whole number of steps.
    steps = max(1, math.floor(math.log(long_budget / first, eta) + 1e-9))
    ratio = (long_budget / first) ** (1 / steps)
    out = [first]
    for k in range(1, steps):
        out.append(max(out[-1] + 1, math.floor(first * ratio**k + 0.5)))
    out.append(long_budget)
    return out


@dataclass(frozen=True)
class TrialRecord:
    """What storage says about one configuration (all attempts of it, see :func:`merge_retries`).

    ``results`` maps rung epochs to the metric recorded there; ``running_to`` is the rung it is
    training (or queued) towards, None when it is not running; ``failed`` says its last attempt
    failed and no retry is pending; ``promoted_to`` is the highest rung it was continued to
    (None if it never was).
    """

    number: int
    results: Mapping[int, float] = field(default_factory=dict)
    running_to: int | None = None
    failed: bool = False
    promoted_to: int | None = None

    @property
    def reached(self) -> int | None:
        """The highest rung with a result (None before the first)."""
        return max(self.results) if self.results else None

    @property
    def sent_to(self) -> int | None:
        """The highest rung this configuration was ever sent to (reached or not)."""
        rungs_ = [r for r in (self.reached, self.running_to, self.promoted_to) if r is not None]
        return max(rungs_) if rungs_ else None

    @property
    def running(self) -> bool:
        return self.running_to is not None and not self.failed


@dataclass(frozen=True)
class Continue:
    """Continue trial ``number`` from its checkpoint at ``from_rung`` to ``to_rung`` epochs."""

    number: int
    from_rung: int
    to_rung: int


@dataclass(frozen=True)
class StartNew:
    """Start a new configuration and train it to ``to_rung`` (the first rung) epochs."""

    to_rung: int


@dataclass(frozen=True)
class Wait:
    """Nothing to do now; running trials may create work when they report."""


@dataclass(frozen=True)
class Finished:
    """No work is left and nothing is running."""


Decision = Continue | StartNew | Wait | Finished


def merge_retries(attempts: Sequence[TrialRecord]) -> TrialRecord:
    """One record for a configuration from its attempts, the original first, retries in order.

    The record keeps the original's number; a rung's first recorded result is kept (it is what
    earlier decisions ranked); running and failed describe the last attempt; ``promoted_to`` is
    the highest rung any attempt was continued to. A retry that is queued but not yet picked up
    should be given as running towards its rung, so no one else is handed its work.

    >>> merge_retries([
    ...     TrialRecord(4, {1: 0.6}, failed=True, promoted_to=3),  # died between rungs 1 and 3
    ...     TrialRecord(9, {}, running_to=3),  # its retry, resuming from the epoch-1 checkpoint
    ... ])
    TrialRecord(number=4, results={1: 0.6}, running_to=3, failed=False, promoted_to=3)
    """
    if not attempts:
        raise ValueError("merge_retries: no attempts")
    results: dict[int, float] = {}
    for attempt in attempts:
        for rung, value in attempt.results.items():
            results.setdefault(rung, value)
    last = attempts[-1]
    promoted = [a.promoted_to for a in attempts if a.promoted_to is not None]
    return TrialRecord(
        number=attempts[0].number,
        results=dict(sorted(results.items())),
        running_to=None if last.failed else last.running_to,
        failed=last.failed,
        promoted_to=max(promoted) if promoted else None,
    )


def holds_long_budget_seat(record: TrialRecord, long_budget: int) -> bool:
    """Whether ``record`` takes one of the ``top_k`` places at the long budget: it has a result
    there, is on its way, or was sent there; one that failed on its way (diverged there, or
    no retry pending) gives its place back."""
    if long_budget in record.results:
        return not math.isnan(record.results[long_budget])
    if record.running and record.running_to == long_budget:
        return True
    return record.promoted_to == long_budget and not record.failed


def rank_key(value: float, number: int, direction: Direction) -> tuple[bool, float, int]:
    """Sort key of configuration ``number``'s result ``value`` at one rung: the best first,
    NaN (diverged) last, ties to the lower configuration number. The one rule every ranking
    of results follows: promotions, the long budget's best for the final stage, the summary.

    >>> sorted([(0.5, 3), (0.7, 1), (0.5, 2)], key=lambda r: rank_key(*r, "maximize"))
    [(0.7, 1), (0.5, 2), (0.5, 3)]
    """
    nan = math.isnan(value)
    return (nan, 0.0 if nan else (-value if direction == "maximize" else value), number)


def ranking(records: Sequence[TrialRecord], rung: int, direction: Direction) -> list[int]:
    """Numbers of the trials with a result at ``rung``, best first (:func:`rank_key`)."""
    ranked = (r for r in records if rung in r.results)
    return [
        r.number
        for r in sorted(ranked, key=lambda r: rank_key(float(r.results[rung]), r.number, direction))
    ]


def decide(
    records: Sequence[TrialRecord],
    *,
    rungs: Sequence[int],
    eta: int,
    top_k: int,
    max_trials: int,
    direction: Direction,
) -> Decision:
    """The next piece of work for a free worker, from the records of all configurations."""
    plan = _Plan(records, direction, rungs, eta, top_k, max_trials)
    if plan.long_budget_full():
        return Wait() if plan.any_running else Finished()
    for rung in reversed(plan.rungs[:-1]):
        for number in plan.promotable(rung):
            return Continue(number, rung, plan.next_rung(rung))
    if plan.may_start_new():
        return StartNew(plan.rungs[0])
    if plan.any_running:
        return Wait()
    endgame = plan.endgame()
    if endgame is not None:
        number, rung = endgame
        return Continue(number, rung, plan.next_rung(rung))
    return Finished()


def may_start_new(
    records: Sequence[TrialRecord],
    *,
    rungs: Sequence[int],
    eta: int,
    top_k: int,
    max_trials: int,
    direction: Direction,
) -> bool:
    """Whether these records leave room for a new configuration: fewer than ``max_trials``
    configurations and the long budget not full (what :func:`decide` checks before
    :class:`StartNew`)."""
    return _Plan(records, direction, rungs, eta, top_k, max_trials).may_start_new()


def promotion_justified(
    records: Sequence[TrialRecord],
    number: int,
    rung: int,
    *,
    rungs: Sequence[int],
    eta: int,
    top_k: int,
    max_trials: int,
    direction: Direction,
) -> bool:
    """Whether continuing trial ``number`` from ``rung`` was allowed by these records (as they
    were when the decision was made): the promotion rule or the endgame, under the cap.

    :func:`decide` picks the best of the allowed promotions; this accepts any of them.
    """
    plan = _Plan(records, direction, rungs, eta, top_k, max_trials)
    if rung not in plan.rungs[:-1] or plan.long_budget_full():
        return False
    if number in plan.promotable(rung):
        return True
    return plan.endgame() == (number, rung)


class _Plan:
    """The records of one decision, checked and indexed."""

    def __init__(
        self,
        records: Sequence[TrialRecord],
        direction: Direction,
        rungs: Sequence[int],
        eta: int,
        top_k: int,
        max_trials: int,
    ) -> None:
        ladder = [int(r) for r in rungs]
        if not ladder or ladder[0] < 1 or any(a >= b for a, b in itertools.pairwise(ladder)):
            raise ValueError(f"rungs: need positive, strictly increasing epochs, got {ladder}")
        if eta < 2 or top_k < 1 or max_trials < 0:
            raise ValueError(
                f"need eta >= 2, top_k >= 1, max_trials >= 0; got {eta}, {top_k}, {max_trials}"
            )
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: {direction!r}; allowed: {', '.join(DIRECTIONS)}")
        allowed = {*ladder, None}
        for r in records:
            if not (allowed.issuperset(r.results) and {r.running_to, r.promoted_to} <= allowed):
                raise ValueError(f"trial {r.number}: a rung in {r} is not one of {ladder}")
        self.records = list(records)
        self.rungs = ladder
        self.eta = eta
        self.top_k = top_k
        self.max_trials = max_trials
        self.direction = direction
        self.by_number = {r.number: r for r in self.records}
        if len(self.by_number) < len(self.records):
            raise ValueError("more than one record for a trial number (see merge_retries)")
        self.any_running = any(r.running for r in self.records)
        last = ladder[-1]
        self.admitted = (
            sum(holds_long_budget_seat(r, last) for r in self.records) if len(ladder) > 1 else 0
        )  # configurations holding a place at the long budget (one rung: none is ever sent)

    def next_rung(self, rung: int) -> int:
        return self.rungs[self.rungs.index(rung) + 1]

    def waiting_at(self, record: TrialRecord, rung: int) -> bool:
        """Stopped at ``rung`` with a result there, free to be continued."""
        return (
            record.reached == rung
            and not record.running
            and not record.failed
            and (record.promoted_to is None or record.promoted_to <= rung)
        )

    def long_budget_full(self) -> bool:
        return self.admitted >= self.top_k

    def may_start_new(self) -> bool:
        """Whether a new configuration could still matter: the budget and the cap allow it."""
        return len(self.records) < self.max_trials and not self.long_budget_full()

    def promotable(self, rung: int) -> list[int]:
        """Trials waiting at ``rung`` that rank in its top ``floor(n / eta)``, best first."""
        ranked = ranking(self.records, rung, self.direction)
        top = ranked[: len(ranked) // self.eta]
        return [n for n in top if self.waiting_at(self.by_number[n], rung)]

    def endgame(self) -> tuple[int, int] | None:
        """(number, rung) to continue when nothing else can happen but the long budget is
        empty: the best waiting trial at the highest rung that has one."""
        if (
            len(self.rungs) < 2
            or len(self.records) < self.max_trials
            or self.any_running
            or self.admitted
        ):
            return None
        for rung in reversed(self.rungs[:-1]):
            for number in ranking(self.records, rung, self.direction):
                if self.waiting_at(self.by_number[number], rung):
                    return number, rung
        return None
