"""The ASHA decision core (search/scheduler.py): rungs, promotion by rank, budget, cap, retries."""

from __future__ import annotations

import doctest
import itertools
import math
import random
from dataclasses import replace

import pytest

import search.scheduler as scheduler
from search.scheduler import (
    Continue,
    Finished,
    StartNew,
    TrialRecord,
    Wait,
    decide,
    holds_long_budget_seat,
    may_start_new,
    merge_retries,
    promotion_justified,
    ranking,
    rungs,
)

LADDER = [1, 3, 10, 32, 100]
SETTINGS = dict(rungs=LADDER, eta=3, top_k=3, max_trials=50, direction="maximize")


def at(number: int, **results: float) -> TrialRecord:
    """A trial waiting at its highest rung: ``at(4, r1=0.5, r3=0.7)``."""
    return TrialRecord(number, {int(k[1:]): v for k, v in results.items()})


def running(number: int, to: int, **results: float) -> TrialRecord:
    promoted = to if to != LADDER[0] else None
    return replace(at(number, **results), running_to=to, promoted_to=promoted)


def test_module_examples() -> None:
    assert doctest.testmod(scheduler).failed == 0


# ---- rungs ---------------------------------------------------------------------------------


def test_rungs_examples() -> None:
    assert rungs(1, 100, 3) == [1, 3, 10, 32, 100]
    assert rungs(1, 81, 3) == [1, 3, 9, 27, 81]  # exact powers stay exact
    # ... also where math.log rounds down: log(243, 3) = 4.999..., log(1000, 10) = 2.999...
    assert rungs(1, 243, 3) == [1, 3, 9, 27, 81, 243]
    assert rungs(1, 1000, 10) == [1, 10, 100, 1000]
    assert rungs(1, 27, 3) == [1, 3, 9, 27]
    assert rungs(2, 100, 3) == [2, 7, 27, 100]
    assert rungs(1, 100, 10) == [1, 10, 100]
    assert rungs(1, 16, 2) == [1, 2, 4, 8, 16]
    assert rungs(5, 10, 3) == [5, 10]  # less than one factor eta apart: both ends
    assert rungs(8, 8, 3) == [8]


@pytest.mark.parametrize("eta", [2, 3, 4])
def test_rungs_are_geometric_and_end_at_the_long_budget(eta: int) -> None:
    for first, long_budget in itertools.product(range(1, 12), range(1, 400, 7)):
        if long_budget < first:
            continue
        ladder = rungs(first, long_budget, eta)
        assert ladder[0] == first and ladder[-1] == long_budget
        assert all(a < b for a, b in itertools.pairwise(ladder))
        assert all(isinstance(r, int) for r in ladder)
        if long_budget >= first * eta:
            steps = len(ladder) - 1
            # floor(log_eta(long / first)) steps, so consecutive rungs are >= eta apart
            assert eta**steps <= long_budget / first + 1e-9 < eta ** (steps + 1)


@pytest.mark.parametrize(("first", "long_budget", "eta"), [(0, 10, 3), (11, 10, 3), (1, 10, 1)])
def test_rungs_reject_bad_arguments(first: int, long_budget: int, eta: int) -> None:
    with pytest.raises(ValueError, match="rungs"):
        rungs(first, long_budget, eta)


# ---- promotion -----------------------------------------------------------------------------


def test_a_trial_is_promoted_while_others_are_still_running() -> None:
    records = [
        at(0, r1=0.9),
        at(1, r1=0.5),
        at(2, r1=0.7),
        running(3, 1),
        running(4, 1),
        running(5, 1),
    ]
    assert decide(records, **SETTINGS) == Continue(0, 1, 3)
    assert promotion_justified(records, 0, 1, **SETTINGS)
    # two results are not enough for the top third of the rung to hold anyone
    assert decide(records[1:], **SETTINGS) == StartNew(1)
    assert not promotion_justified(records[1:], 2, 1, **SETTINGS)


def test_only_the_top_third_is_promoted_even_when_the_best_went_on() -> None:
    """Three results at rung 1 make one place; the best holds it while it trains on, so the
    second is not promoted in its stead."""
    records = [running(0, 3, r1=0.9), at(1, r1=0.8), at(2, r1=0.7)]
    assert decide(records, **SETTINGS) == StartNew(1)
    assert not promotion_justified(records, 1, 1, **SETTINGS)


def test_a_trial_sent_on_or_failed_is_not_continued_from_its_last_result() -> None:
    """Each rule of waiting alone: sent to the next rung (not running yet), or failed."""
    for best in (TrialRecord(0, {1: 0.9}, promoted_to=3), TrialRecord(0, {1: 0.9}, failed=True)):
        records = [best, at(1, r1=0.5), at(2, r1=0.4)]
        assert decide(records, **SETTINGS) == StartNew(1), best
        assert not promotion_justified(records, 0, 1, **SETTINGS)


def test_a_one_rung_ladder_has_no_long_budget_places_to_fill() -> None:
    """With one rung every configuration trains to it: results there take no place, so the
    trial budget, not top_k, ends the study."""
    one = dict(rungs=[8], eta=3, top_k=1, max_trials=3, direction="maximize")
    records = [TrialRecord(0, {8: 0.5}), TrialRecord(1, {8: 0.7})]
    assert decide(records, **one) == StartNew(8)
    assert decide([*records, TrialRecord(2, {8: 0.6})], **one) == Finished()


def test_higher_rungs_go_first() -> None:
    records = [
        at(0, r1=0.9, r3=0.8),
        at(1, r1=0.8, r3=0.6),
        at(2, r1=0.7, r3=0.5),
        at(3, r1=0.6),
        at(4, r1=0.5),
        at(5, r1=0.4),
        *(at(n, r1=0.1) for n in range(6, 12)),
    ]
    records[:3] = [replace(r, promoted_to=3) for r in records[:3]]
    # rung 1 (n = 12) has trial 3 in its top four, rung 3 (n = 3) has trial 0 in its top one
    assert promotion_justified(records, 3, 1, **SETTINGS)
    assert decide(records, **SETTINGS) == Continue(0, 3, 10)


def test_rank_uses_every_result_at_the_rung_whatever_the_trial_does_now() -> None:
    # Trial 0 is running to rung 3, trial 1 failed there: both results still rank at rung 1,
    # so trial 2 (third of six) is not in the top third ... until it is (n = 9).
    records = [
        running(0, 3, r1=0.9),
        replace(at(1, r1=0.8), failed=True, promoted_to=3),
        at(2, r1=0.7),
        *(at(n, r1=0.1) for n in range(3, 6)),
    ]
    assert ranking(records, 1, "maximize")[:3] == [0, 1, 2]
    assert decide(records, **SETTINGS) == StartNew(1)
    records += [at(n, r1=0.05) for n in range(6, 9)]
    assert decide(records, **SETTINGS) == Continue(2, 1, 3)


def test_ties_go_to_the_lower_trial_number_and_nan_ranks_last() -> None:
    records = [at(5, r1=0.8), at(2, r1=0.8), at(7, r1=0.1), at(1, r1=math.nan)]
    assert ranking(records, 1, "maximize") == [2, 5, 7, 1]
    assert ranking(records, 1, "minimize") == [7, 2, 5, 1]
    assert decide(records, **SETTINGS) == Continue(2, 1, 3)
    assert promotion_justified(records, 2, 1, **SETTINGS)
    assert not promotion_justified(records, 5, 1, **SETTINGS)


def test_minimize_promotes_the_lowest() -> None:
    records = [at(0, r1=0.9), at(1, r1=0.2), at(2, r1=0.5)]
    assert decide(records, **{**SETTINGS, "direction": "minimize"}) == Continue(1, 1, 3)


def test_rank_decides_not_run_order() -> None:
    """The same results, listed in any order and under any numbers, promote the same
    configurations: the top floor(n / eta) by value."""
    values = [0.31, 0.77, 0.12, 0.93, 0.55, 0.68, 0.05, 0.84, 0.49, 0.26, 0.61, 0.70]
    expected = sorted(values, reverse=True)[: len(values) // 3]
    rng = random.Random(0)
    for _ in range(20):
        numbers = rng.sample(range(100), len(values))
        records = [at(n, r1=v) for n, v in zip(numbers, values, strict=True)]
        rng.shuffle(records)
        value_of = {r.number: r.results[1] for r in records}
        settings = {**SETTINGS, "max_trials": len(records)}
        promoted = []
        while isinstance(d := decide(records, **settings), Continue):
            promoted.append(value_of[d.number])
            records = [
                replace(r, running_to=3, promoted_to=3) if r.number == d.number else r
                for r in records
            ]
        assert d == Wait()
        assert promoted == expected  # best first, exactly the top third


def test_same_records_same_decision() -> None:
    records = [at(0, r1=0.4), at(1, r1=0.9), running(2, 1), at(3, r1=0.9)]
    first = decide(records, **SETTINGS)
    for order in itertools.permutations(records):
        assert decide(list(order), **SETTINGS) == first


# ---- failures and retries ------------------------------------------------------------------


def test_a_trial_failing_mid_rung_and_its_retry() -> None:
    settings = {**SETTINGS, "max_trials": 4}
    base = [at(1, r1=0.5), at(2, r1=0.4), at(3, r1=0.3)]
    # Trial 0 was continued to rung 3 and died there: no result at rung 3, and it is not
    # continued again (were it never retried, the endgame would take the next best instead).
    died = TrialRecord(0, {1: 0.9}, failed=True, promoted_to=3)
    assert not promotion_justified([died, *base], 0, 1, **settings)
    assert decide([died, *base], **settings) == Continue(1, 1, 3)
    # Its retry (a new trial, number 7) continues the configuration from the rung-1 checkpoint;
    # folded into one record it is running, so no one else is handed its work.
    queued = TrialRecord(7, {}, running_to=3, promoted_to=3)
    merged = merge_retries([died, queued])
    assert merged == TrialRecord(0, {1: 0.9}, running_to=3, failed=False, promoted_to=3)
    assert decide([merged, *base], **settings) == Wait()
    # The retry reports rung 3; the record keeps the original's rung-1 result and number.
    finished = merge_retries([died, TrialRecord(7, {1: 0.91, 3: 0.95}, promoted_to=3)])
    assert finished.results == {1: 0.9, 3: 0.95} and finished.number == 0
    # Budget spent, nothing running, nothing at the long budget: the endgame continues it.
    assert decide([finished, *base], **settings) == Continue(0, 3, 10)


def test_a_trial_failing_in_its_first_rung_is_left_out_of_the_ranking() -> None:
    records = [TrialRecord(0, {}, failed=True), at(1, r1=0.2), at(2, r1=0.3), at(3, r1=0.1)]
    assert ranking(records, 1, "maximize") == [2, 1, 3]
    assert decide(records, **SETTINGS) == Continue(2, 1, 3)
    # it still counts as a configuration of the trial budget
    assert decide(records, **{**SETTINGS, "max_trials": 4, "top_k": 1}) == Continue(2, 1, 3)


def test_merge_retries_of_a_dead_chain_stays_failed() -> None:
    merged = merge_retries(
        [TrialRecord(3, {1: 0.5}, failed=True, promoted_to=3), TrialRecord(8, {}, failed=True)]
    )
    assert merged.failed and not merged.running and merged.promoted_to == 3
    with pytest.raises(ValueError):
        merge_retries([])


# ---- budget, cap, endgame ------------------------------------------------------------------


def test_a_dead_long_run_gives_its_place_back_however_it_is_handed_in() -> None:
    """A failed attempt still naming the rung it was on its way to is not running: merged or
    not, it holds no place at the long budget."""
    dead = TrialRecord(2, {1: 0.9, 3: 0.8, 10: 0.7, 32: 0.6}, running_to=100, failed=True)
    dead = replace(dead, promoted_to=100)
    merged = merge_retries([dead])
    assert merged.running_to is None and merged.failed
    assert not holds_long_budget_seat(merged, 100)
    assert not holds_long_budget_seat(dead, 100) and not dead.running


def test_a_configuration_that_diverged_counts_at_its_rung_and_gives_its_long_place_back() -> None:
    """A leg that diverged records NaN at the rung it was training to: one of the rung's n
    results (ASHA's quota floor(n / eta) is over every configuration that trained there), never
    continued; at the long budget it holds no place, so the next in rank can take it."""
    good = [at(n, r1=0.9 - n / 10) for n in range(3)]
    diverged = [replace(at(n, r1=math.nan), failed=True) for n in range(3, 9)]
    settings = {**SETTINGS, "max_trials": 9}
    assert ranking(good + diverged, 1, "maximize")[:3] == [0, 1, 2]
    assert all(promotion_justified(good + diverged, n, 1, **settings) for n in range(3))
    assert not promotion_justified(good, 2, 1, **settings)  # without them: top 1 of 3 only
    assert not any(promotion_justified(good + diverged, n, 1, **settings) for n in range(3, 9))
    at_long = replace(at(0, r1=0.9, r3=0.9, r10=0.9, r32=0.9, r100=math.nan), failed=True)
    assert not holds_long_budget_seat(replace(at_long, promoted_to=100), 100)
    assert holds_long_budget_seat(at(1, r1=0.9, r3=0.9, r10=0.9, r32=0.9, r100=0.8), 100)


def test_trial_budget_then_wait_then_finished() -> None:
    settings = {**SETTINGS, "max_trials": 3}
    assert decide([], **settings) == StartNew(1)
    assert decide([running(0, 1), running(1, 1)], **settings) == StartNew(1)
    busy = [running(0, 1), running(1, 1), running(2, 1)]
    assert decide(busy, **settings) == Wait()
    assert decide([], **{**settings, "max_trials": 0}) == Finished()
    done = [at(0, r1=0.1, r3=0.2, r10=0.3, r32=0.4, r100=0.5), at(1, r1=0.05), at(2, r1=0.0)]
    done[0] = replace(done[0], promoted_to=100)
    assert decide(done, **settings) == Finished()


def test_endgame_drives_the_best_to_the_long_budget() -> None:
    """Budget spent, nothing running, nothing at the long budget: continue the best waiting
    trial at the highest rung, one rung at a time, then finish."""
    settings = {**SETTINGS, "max_trials": 2}
    records = [at(0, r1=0.3), at(1, r1=0.6)]
    path = []
    while isinstance(d := decide(records, **settings), Continue):
        assert promotion_justified(records, d.number, d.from_rung, **settings)
        path.append((d.number, d.from_rung, d.to_rung))
        records = [
            replace(r, results={**r.results, d.to_rung: 0.7}, promoted_to=d.to_rung)
            if r.number == d.number
            else r
            for r in records
        ]
    assert path == [(1, 1, 3), (1, 3, 10), (1, 10, 32), (1, 32, 100)]
    assert d == Finished()
    # while anything runs, the endgame waits for it instead
    assert decide([at(0, r1=0.3), running(1, 1)], **settings) == Wait()
    assert not promotion_justified([at(0, r1=0.3), running(1, 1)], 0, 1, **settings)


def test_the_long_budget_admits_at_most_top_k() -> None:
    settings = {**SETTINGS, "top_k": 2}
    r32 = [at(n, r1=0.9, r3=0.9, r10=0.9, r32=v) for n, v in enumerate([0.9, 0.8, 0.7, 0.6])]
    r32 += [at(n, r1=0.5, r3=0.5, r10=0.5, r32=0.5) for n in range(4, 9)]
    extra = [at(n, r1=0.1) for n in range(9, 18)]
    records = [replace(r, promoted_to=32) for r in r32] + extra
    # n = 9 at rung 32: its top 3 may go on, but only two of them are admitted
    records[0] = replace(records[0], running_to=100, promoted_to=100)
    assert decide(records, **settings) == Continue(1, 32, 100)
    records[1] = replace(records[1], results={**records[1].results, 100: 0.8}, promoted_to=100)
    assert not promotion_justified(records, 2, 32, **settings)
    # full: nothing else is continued (not even below) and nothing new starts
    assert decide(records, **settings) == Wait()  # trial 0 still runs
    records[0] = replace(records[0], results={**records[0].results, 100: 0.9}, running_to=None)
    assert decide(records, **settings) == Finished()
    # a long run that failed (no retry pending) gives its place back: the next in rank at
    # rung 32 that may go on (top 3 of 9) takes it
    records[0] = replace(records[0], results=dict(r32[0].results), failed=True)
    assert decide(records, **settings) == Continue(2, 32, 100)
    assert promotion_justified(records, 2, 32, **settings)
    # while its retry is pending it still holds the place
    records[0] = replace(records[0], failed=False, running_to=100)
    assert decide(records, **settings) == Wait()


def test_bad_records_and_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="not one of"):
        decide([TrialRecord(0, {2: 0.5})], **SETTINGS)
    with pytest.raises(ValueError, match="more than one record"):
        decide([at(0, r1=0.1), at(0, r1=0.2)], **SETTINGS)
    with pytest.raises(ValueError, match="direction"):
        decide([], **{**SETTINGS, "direction": "up"})
    with pytest.raises(ValueError, match="strictly increasing"):
        decide([], **{**SETTINGS, "rungs": [3, 3, 9]})
    with pytest.raises(ValueError, match="eta"):
        decide([], **{**SETTINGS, "eta": 1})


# ---- a random simulation: every promotion justified, no idle worker while work remains -----


def drive(seed: int) -> list[tuple[list[TrialRecord], object]]:
    """Random workers, finishing order, ties, NaNs, failures and retries; returns every
    (records, decision) pair. Asserts the invariants along the way."""
    rng = random.Random(seed)
    eta = rng.choice([2, 3])
    ladder = rungs(rng.choice([1, 2]), rng.choice([2, 9, 27, 30]), eta)
    settings = dict(
        rungs=ladder,
        eta=eta,
        top_k=rng.randint(1, 4),
        max_trials=rng.randint(0, 40),
        direction=rng.choice(["maximize", "minimize"]),
    )
    workers = rng.randint(1, 6)
    quality = [rng.random() for _ in range(1000)]
    attempts: dict[int, list[TrialRecord]] = {}  # configuration -> attempts (retries)
    log: list[tuple[list[TrialRecord], object]] = []
    next_number = 0
    for _ in range(2000):
        records = [merge_retries(chain) for chain in attempts.values()]
        busy = [r for r in records if r.running]
        if busy and (len(busy) >= workers or rng.random() < 0.5):
            record = rng.choice(busy)
            chain = attempts[record.number]
            last = chain[-1]
            if rng.random() < 0.1:  # dies mid-rung; retried (a new trial number) or not
                chain[-1] = replace(last, running_to=None, failed=True)
                if rng.random() < 0.7:
                    retry = TrialRecord(next_number, {}, running_to=last.running_to)
                    next_number += 1
                    chain.append(replace(retry, promoted_to=last.promoted_to))
            else:
                c = record.number
                value = round(quality[c] + 0.05 * rng.random(), 1)  # rounding makes ties
                value = math.nan if rng.random() < 0.03 else value
                results = {**last.results, last.running_to: value}
                chain[-1] = replace(last, results=results, running_to=None)
            continue
        decision = decide(records, **settings)
        log.append((records, decision))
        admitted = (
            sum(holds_long_budget_seat(r, ladder[-1]) for r in records) if len(ladder) > 1 else 0
        )
        if isinstance(decision, Continue):
            assert promotion_justified(records, decision.number, decision.from_rung, **settings)
            assert ladder.index(decision.to_rung) == ladder.index(decision.from_rung) + 1
            chain = attempts[decision.number]
            chain[-1] = replace(
                chain[-1], running_to=decision.to_rung, promoted_to=decision.to_rung
            )
        elif isinstance(decision, StartNew):
            assert len(records) < settings["max_trials"] and admitted < settings["top_k"]
            attempts[next_number] = [TrialRecord(next_number, {}, running_to=ladder[0])]
            next_number += 1
        elif isinstance(decision, Wait):
            # no idle worker while configurations may still start
            assert busy and (
                len(records) >= settings["max_trials"] or admitted >= settings["top_k"]
            )
        else:
            assert not busy
            break
    else:
        raise AssertionError("the simulation did not finish")
    final = [merge_retries(chain) for chain in attempts.values()]
    assert len(final) <= settings["max_trials"]
    if len(ladder) > 1:
        # every place at the long budget held by one configuration that did not fail there
        # (each Continue to it was checked against the cap when made, by promotion_justified)
        assert sum(holds_long_budget_seat(r, ladder[-1]) for r in final) <= settings["top_k"]
    return log


@pytest.mark.parametrize("seed", range(40))
def test_every_promotion_in_a_random_simulation_is_justified(seed: int) -> None:
    drive(seed)


def test_a_seeded_run_repeats_decision_for_decision() -> None:
    assert drive(7) == drive(7)
    assert [d for _, d in drive(7)] != [d for _, d in drive(8)]


def test_may_start_new_is_what_decide_checks_before_starting_one() -> None:
    settings = {**SETTINGS, "top_k": 1, "max_trials": 3}
    one = [at(0, r1=0.9)]
    assert may_start_new(one, **settings) and decide(one, **settings) == StartNew(1)
    budget_spent = [at(n, r1=0.1 * n) for n in range(3)]
    assert not may_start_new(budget_spent, **settings)
    full = [TrialRecord(0, {1: 0.9}, running_to=100, promoted_to=100)]
    assert not may_start_new(full, **settings) and decide(full, **settings) == Wait()
    # a long run that failed gave its place back: room again
    failed = [TrialRecord(0, {1: 0.9}, failed=True, promoted_to=100)]
    assert may_start_new(failed, **settings)
