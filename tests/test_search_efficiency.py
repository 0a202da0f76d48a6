"""benchmarks/search_efficiency.py, mode=train: the rung scheduler against random search at equal
epochs, training for real (the tiniest quickstart), and how it counts a leg's epochs."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.search_efficiency import Outcome, epochs_used, reached_full_budget, record


def leg(state: str = "COMPLETE", value: float | None = 0.5, **attrs: Any) -> SimpleNamespace:
    return SimpleNamespace(
        number=7, state=SimpleNamespace(name=state), value=value, user_attrs=attrs
    )


def test_a_continued_leg_costs_the_epochs_it_added_not_its_rung() -> None:
    first = leg(config=2, rung_to=3, epochs_run=3, epochs_added=3)
    continued = leg(config=2, rung_from=3, rung_to=9, epochs_run=9, epochs_added=6, value=0.9)
    outcome = Outcome("asha", 0)
    record(outcome, first, "screen", full=9)
    record(outcome, continued, "promote", full=9)
    assert (outcome.epochs, outcome.legs, outcome.configs) == (9, 2, 1)
    assert [(f.epochs, f.value, f.label) for f in outcome.finals] == [(9, 0.9, "#2 3->9")]
    assert outcome.best_final(8, maximize=True) is None
    assert outcome.best_final(9, maximize=True) == 0.9
    assert outcome.to_target(0.9, maximize=True) is outcome.finals[0]


@pytest.mark.parametrize(
    "attrs,trained",
    [
        # died in a continuation after epoch 5 (from rung 3): 2 epochs
        ({"rung_from": 3, "rung_to": 9, "epochs_run": 5}, 2),
        # the training loss diverged in epoch 5, which the trainer stopped mid-way: 5 epochs
        (
            {
                "epochs_run": 4,
                "fail_reason": "NonFiniteLossError: pretrain: training loss became nan in epoch 5",
            },
            5,
        ),
        # the metric became NaN after epoch 3 of a 1 -> 9 leg: epochs_added holds epoch 3
        (
            {
                "rung_from": 1,
                "rung_to": 9,
                "epochs_run": 3,
                "epochs_added": 2,
                "fail_reason": "NonFiniteLossError: val_accuracy became nan in epoch 3",
            },
            2,
        ),
        # the same for a run from scratch: epochs_run holds epoch 9
        (
            {
                "epochs_run": 9,
                "fail_reason": "NonFiniteLossError: knn_accuracy became nan in epoch 9",
            },
            9,
        ),
    ],
    ids=["killed", "loss-diverged", "metric-nan-leg", "metric-nan-run"],
)
def test_a_failed_leg_counts_what_it_trained(attrs: dict, trained: int) -> None:
    assert epochs_used(leg("FAIL", None, **attrs)) == trained


def test_a_leg_that_trained_nothing_counts_nothing_and_a_failed_run_no_full_budget() -> None:
    assert epochs_used(leg("PRUNED", None, duplicate_of=1)) == 0
    assert not reached_full_budget(leg("FAIL", None, epochs_run=4), full=4)
    assert reached_full_budget(leg(epochs_run=9), full=9)  # a random-search run, from scratch
    assert not reached_full_budget(leg(rung_to=3, epochs_run=3), full=9)


ROW = re.compile(r"^\|\s*0 \|\s*(asha|random) \|\s*(\d+) \|\s*(\d+) \|")
LAST = re.compile(
    r"^asha / random, median epochs to target: (\S+) / (\S+) = (\S+) \(goal <= 0\.33\); "
    r"median best full-budget @B: (\S+) / (\S+)$"
)


def test_train_mode_on_the_tiniest_quickstart(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import optuna

    from benchmarks import search_efficiency
    from search import baseline_params, load_config

    argv = [
        "search_efficiency",
        "study=quickstart",
        "seeds=0",
        "screen_trials=3",
        "promote_epochs=3",
        "top_k=1",
        "extra=train.max_batches=2",
        "keep=true",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **_: str(tmp_path))
    assert search_efficiency.main() == 0
    # Both methods start from the report's configuration (the service queues it for asha):
    # drawing the rest is what they are compared on, not whether one was handed a tuned start.
    report = baseline_params(load_config("quickstart"))
    for name in ("eff-asha-s0", "eff-random-s0"):
        url = f"sqlite:///{tmp_path / (name + '.db')}"
        screen = next(s for s in optuna.get_all_study_names(url) if s.endswith(("screen", name)))
        first = optuna.load_study(study_name=screen, storage=url).trials[0]
        assert first.user_attrs.get("baseline") == "report", name
        assert {k: first.params[k] for k in report} == report, name
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("asha: rungs 1, 3 (eta 3), 3 configurations") for line in out)
    assert any(line.startswith("target: knn_accuracy >= ") for line in out)
    rows = {m.group(1): m for line in out if (m := ROW.match(line))}
    assert set(rows) == {"asha", "random"}
    budget, asha_epochs = int(rows["asha"].group(2)), int(rows["asha"].group(3))
    random_epochs = int(rows["random"].group(3))
    assert budget == asha_epochs > 0
    # 3 configurations to rung 1, one continued 1 -> 3: at most 3 + 2 epochs, never 3 + 3
    assert asha_epochs <= 5
    assert random_epochs >= 2 * budget and random_epochs % 3 == 0  # full 3-epoch runs
    assert LAST.match(out[-2]), out[-2]
    assert out[-1].startswith("total time ")
