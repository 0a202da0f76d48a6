"""The search service end to end: stages, lineage, resume, and both storage back-ends."""

from __future__ import annotations

import uuid
from pathlib import Path

import optuna
import pytest
from conftest import QUICKSTART_OVERRIDES, run_module
from optuna.trial import TrialState

from search.config import available_studies, load_config, storage_url
from search.objective import TrialRunner
from search.stages import make_pruner, open_studies, run_stages, summarize

REPO = Path(__file__).resolve().parent.parent


def trials_of(url: str, name: str, stage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=f"{name}.{stage}", storage=url).get_trials()


def check_finished_pipeline(url: str, name: str, screen_trials: int, top_k: int) -> None:
    screen = trials_of(url, name, "screen")
    promote = trials_of(url, name, "promote")
    final = trials_of(url, name, "final")
    assert len(screen) == screen_trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in screen)
    assert screen[0].user_attrs.get("baseline") == "report"
    for t in screen:
        assert {
            "stage",
            "seed",
            "device",
            "epochs_run",
            "wall_time_s",
            "curve:pretrain:0001",
        } <= set(t.user_attrs)
        assert t.user_attrs["stage"] == "screen"
        assert len(t.intermediate_values) == t.user_attrs["epochs_run"]
        assert "curve" not in t.user_attrs  # rows are appended one epoch at a time
    for t in (t for t in screen if t.state == TrialState.PRUNED):
        assert t.user_attrs["prune_reason"].startswith("pruned after epoch")
    # Promotion: the top-k completed screen trials, same params and seed, exactly once each.
    done = sorted(
        (t for t in screen if t.state == TrialState.COMPLETE), key=lambda t: t.value, reverse=True
    )
    assert len(promote) == min(top_k, len(done))
    sources = sorted(t.user_attrs["source_trial"] for t in promote)
    assert sources == sorted(t.number for t in done[:top_k])
    by_number = {t.number: t for t in screen}
    for t in promote:
        src = by_number[t.user_attrs["source_trial"]]
        assert t.state == TrialState.COMPLETE
        assert t.user_attrs["source_study"] == f"{name}.screen"
        assert t.params == src.params and t.user_attrs["seed"] == src.user_attrs["seed"]
    assert len(final) == 1 and final[0].state == TrialState.COMPLETE
    attrs = final[0].user_attrs
    for split in ("train", "val", "test"):
        assert 0 <= attrs[f"{split}_accuracy"] <= 1
    best_promoted = max(promote, key=lambda t: t.value)
    assert attrs["source_trial"] == best_promoted.number


@pytest.mark.slow
def test_quickstart_pipeline_then_the_same_command_adds_nothing(finished_quickstart):
    runs, overrides = finished_quickstart
    url = f"sqlite:///{runs / 'ssl-search.db'}"
    check_finished_pipeline(url, "quickstart", 5, 2)
    assert any(t.state == TrialState.PRUNED for t in trials_of(url, "quickstart", "screen"))
    counts = {s: len(trials_of(url, "quickstart", s)) for s in ("screen", "promote", "final")}

    again = run_module("search.run", "study=quickstart", *overrides, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "accuracy train / val / test" in again.stdout and "lineage:" in again.stdout
    assert {s: len(trials_of(url, "quickstart", s)) for s in counts} == counts
    assert "[worker" not in again.stdout  # no trial ran
    # One worker trains on the copy of the data the launcher loaded and checked: loaded once.
    loaded = [line for line in again.stdout.splitlines() if "data digits: " in line]
    assert len(loaded) == 1 and loaded[0].startswith("data digits: "), again.stdout


@pytest.mark.slow
@pytest.mark.postgres
def test_pipeline_on_postgres_and_a_second_study_stays_independent(tmp_path, postgres_db_url):
    url = postgres_db_url  # a database of this test's own, dropped afterwards
    first_name, second_name = f"qs-{uuid.uuid4().hex[:8]}", f"qs-{uuid.uuid4().hex[:8]}"
    common = [
        *QUICKSTART_OVERRIDES,
        f"storage={url}",
        f"runs_dir={tmp_path}",
        "stages.screen.trials=3",
    ]
    first = load_config("quickstart", [*common, f"name={first_name}"])
    run_stages(open_studies(first, url), TrialRunner(first, progress=False), first)
    check_finished_pipeline(url, first_name, 3, 2)
    before = {s: len(trials_of(url, first_name, s)) for s in ("screen", "promote", "final")}

    second = load_config(
        "quickstart", [*common, f"name={second_name}", "stage=screen", "stages.screen.trials=2"]
    )
    run_stages(open_studies(second, url), TrialRunner(second, progress=False), second)
    assert len(trials_of(url, second_name, "screen")) == 2
    assert trials_of(url, second_name, "promote") == []
    after = {s: len(trials_of(url, first_name, s)) for s in before}
    assert after == before
    stored = optuna.load_study(study_name=f"{second_name}.screen", storage=url)
    assert stored.user_attrs["config"]["name"] == second_name


# Slow: loading (and for CIFAR, decoding) the real data takes longer than the training.
# Each study file is also checked, quickly, by test_config_cli's dry runs.
@pytest.mark.slow
@pytest.mark.parametrize(
    "study",
    [s for s in available_studies() if s != "quickstart"],
)
def test_each_study_runs_a_tiny_screen_trial_on_the_real_data(tmp_path, study, request, cache_dir):
    root = request.getfixturevalue("mnist_root" if study.startswith("mnist") else "cifar_root")
    cfg = load_config(
        study,
        [
            f"data.root={root}",
            f"data.cache_dir={cache_dir}",
            "data.train_subset=128",
            "data.val_subset=64",
            "data.test_subset=64",
            "train.max_batches=2",
            "train.knn_max_train=128",
            "model.channels=8",
            "search.space.channels.choices=[8]",
            "stages.screen.trials=1",
            "stages.screen.epochs=1",
            "search.pruner.min_resource=1",  # a first rung of one epoch
            "stage=screen",
            f"runs_dir={tmp_path}",
        ],
    )
    studies = open_studies(cfg, storage_url(cfg))
    run_stages(studies, TrialRunner(cfg, device="cpu", progress=False), cfg)
    (trial,) = studies.screen.get_trials()
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["epochs_run"] == 1 and trial.user_attrs["device"] == "cpu"
    assert summarize(studies, cfg)["stages"]["screen"]["counts"]["COMPLETE"] == 1


def test_hyperband_uses_the_screen_budget():
    cfg = load_config("quickstart", ["stages.screen.epochs=7", "search.pruner.name=hyperband"])
    pruner = make_pruner(cfg)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert pruner._max_resource == 7
    for name, kind in [
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        ("median", optuna.pruners.MedianPruner),
        ("none", optuna.pruners.NopPruner),
    ]:
        assert isinstance(
            make_pruner(load_config("quickstart", [f"search.pruner.name={name}"])), kind
        )
