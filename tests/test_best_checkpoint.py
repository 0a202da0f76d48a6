"""stages.final.checkpoint: the final classifier trains on the promoted encoder's best epoch."""

from __future__ import annotations

import copy

import pytest
import torch

from models.checkpoints import best_checkpoint, load_checkpoint, phase_checkpoint
from models.config import DataConfig, ModelConfig, TrainConfig
from models.data import load_splits
from models.training import Run
from search.config import ConfigError, load_config


@pytest.fixture(scope="module")
def digits():
    return load_splits(DataConfig(name="digits", train_subset=160, val_subset=48, test_subset=48))


class ScriptedRun(Run):
    """A real contrastive run whose validation metric follows a given curve."""

    def __init__(self, curve: list[float], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.curve = list(curve)

    def knn_accuracy(self, features=None) -> float:
        if features is not None:  # the baselines' raw-pixel kNN: not scripted
            return super().knn_accuracy(features)
        return self.curve.pop(0)


def train(epochs: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, batch_size=32, max_batches=2, device="cpu", progress=False, knn_k=5
    )


@pytest.mark.parametrize(
    "curve,maximize,best_epoch",
    [([0.5, 0.9, 0.7], True, 2), ([0.5, 0.2, 0.3], False, 2), ([0.4, 0.4, 0.6], True, 3)],
)
@pytest.mark.slow
def test_the_best_epoch_on_validation_is_kept(digits, tmp_path, curve, maximize, best_epoch):
    run = ScriptedRun(
        curve,
        "contrastive",
        digits,
        ModelConfig(channels=4, latent_dim=8),
        train(3),
        checkpoint_dir=tmp_path,
        identity="x",
    )
    run.keep_best_by("knn_accuracy", maximize)
    weights = {}
    run.pretrain(
        on_epoch=lambda r: weights.__setitem__(
            r.epoch, copy.deepcopy(run.nets.encoder.state_dict())
        )
    )
    best = load_checkpoint(best_checkpoint(tmp_path))
    assert best["epoch"] == best_epoch and best["identity"] == "x"
    assert best["best"]["value"] == curve[best_epoch - 1]
    for name, tensor in weights[best_epoch].items():
        torch.testing.assert_close(best["modules"]["encoder"][name], tensor)
    last = load_checkpoint(phase_checkpoint(tmp_path, "pretrain"))
    assert last["epoch"] == 3


def test_a_tie_keeps_the_earlier_epoch_and_resume_keeps_the_best_so_far(digits, tmp_path):
    model = ModelConfig(channels=4, latent_dim=8)
    first = ScriptedRun([0.6, 0.6], "contrastive", digits, model, train(2), checkpoint_dir=tmp_path)
    first.keep_best_by("knn_accuracy", True)
    first.pretrain()
    assert load_checkpoint(best_checkpoint(tmp_path))["epoch"] == 1
    # Resumed for one more epoch scoring lower: the best stays epoch 1.
    more = ScriptedRun([0.5], "contrastive", digits, model, train(3), checkpoint_dir=tmp_path)
    more.keep_best_by("knn_accuracy", True)
    more.pretrain()
    assert load_checkpoint(best_checkpoint(tmp_path))["epoch"] == 1


def test_without_keep_best_no_best_file_is_written(digits, tmp_path):
    run = ScriptedRun(
        [0.1], "contrastive", digits, ModelConfig(channels=4), train(1), checkpoint_dir=tmp_path
    )
    run.pretrain()
    assert not best_checkpoint(tmp_path).exists()


def test_final_checkpoint_setting_is_validated() -> None:
    assert load_config("quickstart").stages.final.checkpoint == "best"
    assert (
        load_config("quickstart", ["stages.final.checkpoint=last"]).stages.final.checkpoint
        == "last"
    )
    with pytest.raises(ConfigError, match=r"^stages\.final\.checkpoint: .*allowed: best, last"):
        load_config("quickstart", ["stages.final.checkpoint=middle"])


def test_a_crash_never_leaves_a_best_epoch_newer_than_the_resume_point(digits, tmp_path):
    """checkpoint_every=2: epoch 3 scores best, then the run dies before its next checkpoint.
    The resumed run starts again from epoch 2 and scores lower at 3 and 4: the best file must
    be epoch 2's (what this run trained), not the dead run's epoch 3."""
    model = ModelConfig(channels=4, latent_dim=8)
    every_2 = TrainConfig(
        epochs=4, batch_size=32, max_batches=2, device="cpu", progress=False, knn_k=5,
        checkpoint_every=2,
    )  # fmt: skip

    def die_after_3(report):
        if report.epoch == 3:
            raise KeyboardInterrupt

    dying = ScriptedRun([0.5, 0.6, 0.9], "contrastive", digits, model, every_2, tmp_path)
    dying.keep_best_by("knn_accuracy", True)
    with pytest.raises(KeyboardInterrupt):
        dying.pretrain(on_epoch=die_after_3)
    assert load_checkpoint(phase_checkpoint(tmp_path, "pretrain"))["epoch"] == 2
    resumed = ScriptedRun([0.5, 0.55], "contrastive", digits, model, every_2, tmp_path)
    resumed.keep_best_by("knn_accuracy", True)
    resumed.pretrain()
    best = load_checkpoint(best_checkpoint(tmp_path))
    assert best["epoch"] == 2 and best["best"]["value"] == 0.6


@pytest.mark.slow
@pytest.mark.parametrize("screen_epochs", [1, 3])
def test_under_rungs_the_final_takes_the_best_epoch_of_all_the_configurations_legs(
    tmp_path, screen_epochs
):
    """Rungs 1, 3: the best epoch is looked for over every leg of the configuration the final
    takes, the screen's legs included (and with the screen at the long budget, there is no
    promote leg at all)."""
    import optuna

    from search import TrialRunner, learning_curve, open_studies, run_stages, storage_url
    from search.objective import config_number

    cfg = load_config(
        "quickstart",
        [
            f"runs_dir={tmp_path}",
            "stages.screen.trials=3",
            f"stages.screen.epochs={screen_epochs}",
            "stages.promote.top_k=1",
            "stages.promote.epochs=3",
            "train.probe.epochs=1",
            "train.max_batches=2",
            "search.sampler.name=random",
            "search.space.channels.choices=[8]",
        ],
    )
    studies = open_studies(cfg, storage_url(cfg))
    run_stages(studies, TrialRunner(cfg, progress=False), cfg)
    final = [t for t in studies.of("final").get_trials() if t.state.is_finished()]
    assert len(final) == 1 and final[0].state == optuna.trial.TrialState.COMPLETE
    source = final[0].user_attrs["source_trial"]
    source_stage = "promote" if screen_epochs < 3 else "screen"
    config = config_number(studies.of(source_stage).trials[source])
    curve = {}
    for stage in ("screen", "promote"):
        for t in studies.of(stage).get_trials():
            if t.state == optuna.trial.TrialState.COMPLETE and config_number(t) == config:
                for row in learning_curve(t.user_attrs, "pretrain"):
                    curve[row["epoch"]] = row["metrics"]["knn_accuracy"]
    assert sorted(curve) == [1, 2, 3]
    best = max(curve.values())
    first_best = min(epoch for epoch, value in curve.items() if value == best)
    assert final[0].user_attrs["encoder_checkpoint"].startswith(f"best: epoch {first_best} ")
    assert final[0].user_attrs["encoder_epoch"] == first_best


def test_a_retried_final_does_not_inherit_the_encoder_its_original_took(tmp_path):
    """A retry copies its original's user attrs: which encoder epoch it trains on is said anew."""
    import optuna

    from search import TrialRunner

    cfg = load_config("quickstart", [f"runs_dir={tmp_path}"])
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'final.db'}")
    trial = study.ask()
    trial.set_user_attr("encoder_checkpoint", "best: epoch 7 (pretrain-best.pt)")
    trial.set_user_attr("encoder_epoch", 7)
    TrialRunner(cfg, progress=False)._begin(trial, "final")
    attrs = study.get_trials()[0].user_attrs
    assert attrs.get("encoder_checkpoint") is None and attrs.get("encoder_epoch") is None


def _finished_small_study(tmp_path):
    """A quickstart run to its final on two configurations, rungs 1, 3; its studies and
    runner."""
    from search import TrialRunner, open_studies, run_stages, storage_url

    cfg = load_config(
        "quickstart",
        [
            f"runs_dir={tmp_path}",
            "stages.screen.trials=2",
            "stages.screen.epochs=1",
            "stages.promote.top_k=1",
            "stages.promote.epochs=3",
            "train.probe.epochs=2",
            "train.max_batches=2",
            "search.sampler.name=random",
            "search.space.channels.choices=[8]",
        ],
    )
    studies = open_studies(cfg, storage_url(cfg))
    runner = TrialRunner(cfg, progress=False)
    run_stages(studies, runner, cfg)
    return studies, runner


def _retry_final(studies, runner, failed):
    """Queue a retry of final trial ``failed`` (as if stopped) and run it; the retry."""
    import copy

    import optuna

    from search.stages import _run_one
    from storage.trial_retry import RetryFailedTrial

    interrupted = copy.deepcopy(failed)
    interrupted.state = optuna.trial.TrialState.FAIL
    RetryFailedTrial(max_retry=3)(studies.final, interrupted, counted=False)
    number = _run_one(studies, "final", runner, 0)
    return studies.final.get_trials()[number]


def test_a_retried_final_says_it_resumed_its_classifier_from_the_checkpoint(tmp_path):
    """A final interrupted in its classifier resumes from ``probe.pt`` on retry, and says so
    (``resumed_from_epoch``): the summary had told "from epoch 0 (no checkpoint yet)"."""
    import copy

    import optuna

    from search import failure_reason

    studies, runner = _finished_small_study(tmp_path)
    (done,) = studies.final.get_trials()
    assert done.user_attrs.get("resumed_from_epoch") is None  # trained from the start
    # As if it had been stopped after writing its classifier's last checkpoint.
    retry = _retry_final(studies, runner, done)
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_epoch"] == 2
    interrupted = copy.deepcopy(done)
    interrupted.state = optuna.trial.TrialState.FAIL
    assert failure_reason(interrupted, studies.final.get_trials()).endswith(
        f"retried as trial {retry.number}, resumed from epoch 2"
    )


def test_an_unreadable_best_encoder_fails_the_final_saying_how_to_go_on(tmp_path):
    """The final never swaps the best epoch's encoder for the last on its own (that would
    report another encoder): it fails, naming the file and both ways on; deleted, the file's
    absence is recorded and the final trains on the last epoch, its classifier from epoch 0:
    the one trained on the best epoch's encoder is not resumed."""
    import optuna

    from search import learning_curve

    studies, runner = _finished_small_study(tmp_path)
    (done,) = studies.final.get_trials()
    best = runner.store.local(done.user_attrs["source_checkpoint_dir"]) / "pretrain-best.pt"
    best.write_bytes(b"a truncated copy")
    failed = _retry_final(studies, runner, done)
    reason = failed.user_attrs["fail_reason"]
    assert failed.state == optuna.trial.TrialState.FAIL and str(best) in reason, reason
    assert "restore it, or delete it to train on the configuration's last epoch" in reason
    best.unlink()
    retry = _retry_final(studies, runner, failed)
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["encoder_checkpoint"] == "last: no pretrain-best.pt was kept"
    assert retry.user_attrs.get("resumed_from_epoch") is None
    assert "other settings" in retry.user_attrs["checkpoint_discarded"]
    assert len(learning_curve(retry.user_attrs, "probe")) == 2  # both epochs trained again


def test_the_report_rebuilds_from_the_encoder_file_the_final_trial_recorded(tmp_path):
    """``encoder_checkpoint`` names the file the final trial trained on: the best epoch's, or
    the last one, also when no best file was kept (a text that names the best file)."""
    from optuna.trial import create_trial

    from reporting.store import final_checkpoint_paths
    from search import BEST_PRETRAIN_FILE, PRETRAIN_FILE

    cfg = load_config("quickstart", [f"runs_dir={tmp_path}"])
    for recorded, used in (
        (f"best: epoch 3 ({BEST_PRETRAIN_FILE})", BEST_PRETRAIN_FILE),
        (f"last ({PRETRAIN_FILE})", PRETRAIN_FILE),
        (f"last: no {BEST_PRETRAIN_FILE} was kept", PRETRAIN_FILE),
    ):
        attrs = {"source_checkpoint_dir": "s/t1", "checkpoint_dir": "f/t0"}
        final = create_trial(value=0.9, user_attrs={**attrs, "encoder_checkpoint": recorded})
        source, _ = final_checkpoint_paths(cfg, final)
        assert source == tmp_path / "checkpoints" / "s" / "t1" / used, recorded
