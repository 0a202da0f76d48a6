"""search.naming: the one owner of study names, checkpoint paths, the final metric, the budget."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import search.naming as naming
from search.config import load_config


def test_examples_in_the_docstring_hold() -> None:
    failures, tried = doctest.testmod(naming)
    assert tried >= 3 and failures == 0


@pytest.mark.parametrize("stage", naming.STAGES)
def test_stage_study_names_round_trip(stage: str) -> None:
    full = naming.stage_study_name("my.study-1", stage)
    assert full == f"my.study-1.{stage}"
    assert naming.split_study_name(full) == ("my.study-1", stage)
    assert naming.stage_of(full) == stage


@pytest.mark.parametrize("text", ["quickstart", "quickstart.other", ".screen", "a.SCREEN", ""])
def test_names_that_are_not_stage_studies_are_refused(text: str) -> None:
    assert naming.split_study_name(text) is None
    with pytest.raises(ValueError, match="not a stage study"):
        naming.stage_of(text)


def test_an_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed: screen, promote, final"):
        naming.stage_study_name("q", "all")


def test_trial_dirs_are_per_study_identity_and_zero_padded(tmp_path: Path) -> None:
    a = naming.trial_dir(tmp_path, "q.screen", "abc123", 7)
    assert a == tmp_path / "q.screen-abc123" / "trial-00007"
    assert a == tmp_path / naming.trial_dir_relative("q.screen", "abc123", 7)
    assert naming.trial_dir(tmp_path, "q.promote", "abc123", 7) != a
    # Another study of the same name (a new database, another storage) has another identity.
    assert naming.trial_dir(tmp_path, "q.screen", naming.new_study_uid(), 7) != a
    assert naming.trial_dir(tmp_path, "q.screen", "abc123", 12345).name == "trial-12345"
    assert naming.PRETRAIN_FILE != naming.PROBE_FILE != naming.BEST_PRETRAIN_FILE


def test_the_fingerprint_follows_what_changes_the_weights_not_where_it_runs() -> None:
    base = load_config("quickstart")
    same = load_config(
        "quickstart",
        [
            "train.device=cpu",
            "data.root=/elsewhere",
            "runs_dir=/x",
            "train.checkpoint_every=5",  # when files are written, not what they hold
            "train.deterministic=true",
        ],
    )
    other = load_config("quickstart", ["train.temperature=0.9"])
    assert naming.run_fingerprint(base) == naming.run_fingerprint(same)
    assert naming.run_fingerprint(base) != naming.run_fingerprint(other)


def test_the_final_stage_is_ranked_on_validation_accuracy_the_others_on_the_study_metric() -> None:
    cfg = load_config("quickstart")
    assert (
        naming.stage_metric(cfg, "screen") == naming.stage_metric(cfg, "promote") == "knn_accuracy"
    )
    assert naming.stage_metric(cfg, "final") == naming.FINAL_METRIC == "val_accuracy"
    mae = load_config("mnist_autoencoder", ["search.metric=val_mae"])
    assert naming.stage_metric(mae, "screen") == "val_mae"
    assert naming.stage_metric(mae, "final") == "val_accuracy"


def test_the_long_budget_is_promote_epochs_or_else_train_epochs() -> None:
    assert naming.long_budget(load_config("quickstart", ["stages.promote.epochs=5"])) == 5
    assert (
        naming.long_budget(load_config("quickstart", ["stages.promote.epochs=0", "train.epochs=9"]))
        == 9
    )


def test_learning_curve_reads_appended_rows_in_order_and_the_legacy_whole_curve():
    from search import curve_attr, is_curve_attr, learning_curve

    attrs = {
        curve_attr("probe", 1): {"phase": "probe", "epoch": 1},
        curve_attr("pretrain", 10): {"phase": "pretrain", "epoch": 10},
        curve_attr("pretrain", 9): {"phase": "pretrain", "epoch": 9},
        "epochs_run": 10,
    }
    assert [(r["phase"], r["epoch"]) for r in learning_curve(attrs)] == [
        ("pretrain", 9),
        ("pretrain", 10),
        ("probe", 1),
    ]
    assert [r["epoch"] for r in learning_curve(attrs, "probe")] == [1]
    legacy = {"curve": [{"phase": "pretrain", "epoch": 1}, {"phase": "pretrain", "epoch": 2}]}
    assert [r["epoch"] for r in learning_curve(legacy)] == [1, 2]
    # A retry of an old trial trains epoch 2 again: one row per epoch, the appended one.
    legacy[curve_attr("pretrain", 2)] = {"phase": "pretrain", "epoch": 2, "again": True}
    rows = learning_curve(legacy)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1].get("again")
    assert is_curve_attr("curve") and is_curve_attr(curve_attr("probe", 3))
    assert not is_curve_attr("epochs_run")


def test_the_diverged_fail_reason_is_the_trainers_error() -> None:
    from models.training import NonFiniteLossError
    from search.naming import DIVERGED, diverged

    assert NonFiniteLossError.__name__ == DIVERGED
    assert diverged({"fail_reason": f"{NonFiniteLossError.__name__}: loss is nan at epoch 2"})
    assert not diverged({"fail_reason": "KeyboardInterrupt: stopped"}) and not diverged({})


def test_a_checkpoint_identity_counts_the_classes_of_data_that_has_other_than_ten():
    """MNIST and CIFAR-10 keep the identity their checkpoints were written under; an image
    folder of 3 classes gets another, so a checkpoint written when every classifier had 10
    outputs is set aside, not loaded into a 3-output classifier."""
    from search.config import load_config
    from search.naming import checkpoint_identity, run_fingerprint

    cfg = load_config("quickstart")
    assert checkpoint_identity(cfg, "d1", None) == run_fingerprint(cfg, "d1")
    assert checkpoint_identity(cfg, "d1", None, 10) == run_fingerprint(cfg, "d1")
    three = checkpoint_identity(cfg, "d1", None, 3)
    assert three != run_fingerprint(cfg, "d1") and three != checkpoint_identity(cfg, "d1", None, 4)
    # One written before the digest joined the identity: resumed under 10 classes (its
    # classifier fits), and under 3 where pre-training holds no classifier (SimCLR here); set
    # aside under 3 for the guided task, whose pre-training checkpoint has a 10-output one.
    before_digest = run_fingerprint(cfg)
    assert checkpoint_identity(cfg, "d1", before_digest, 10) == before_digest
    assert checkpoint_identity(cfg, "d1", before_digest, 3) == before_digest
    guided = load_config("mnist_guided")
    guided_before = run_fingerprint(guided)
    assert checkpoint_identity(guided, "d1", guided_before, 10) == guided_before
    assert checkpoint_identity(guided, "d1", guided_before, 3) == checkpoint_identity(
        guided, "d1", None, 3
    )
