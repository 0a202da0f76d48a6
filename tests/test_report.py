"""Per-trial artifacts and the study report, on small real runs of the quickstart (CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import REPO_ROOT, assert_one_line_error, run_module, tiny_trained_trial
from optuna.trial import TrialState

from reporting.artifacts import make_trial_artifact_hook, trial_artifacts
from reporting.markdown import results_table
from reporting.tables import PUBLISHED
from search.config import ConfigError, load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _studies(runs_dir: Path, name: str) -> dict[str, optuna.Study]:
    url = f"sqlite:///{runs_dir / 'ssl-search.db'}"
    return {
        stage: optuna.load_study(study_name=f"{name}.{stage}", storage=url)
        for stage in ("screen", "promote", "final")
    }


def _report(study: str, overrides: list[str], out: Path) -> str:
    """Run ``search.report`` and return what it printed (its speed is benchmarks/' business)."""
    done = run_module("search.report", f"study={study}", *overrides, "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_every_finished_trial_has_its_figures_in_the_artifact_store(finished_quickstart):
    runs_dir, _ = finished_quickstart
    store = runs_dir / "artifacts"
    studies = _studies(runs_dir, "quickstart")
    checked = 0
    for stage, study in studies.items():
        for trial in study.get_trials():
            if trial.state != optuna.trial.TrialState.COMPLETE:
                continue  # pruned trials stop inside the objective, before the hooks run
            found = trial_artifacts(trial)
            assert "learning_curves.png" in found, (stage, trial.number, trial.system_attrs)
            if stage == "final":
                assert "tsne.png" in found
            assert not trial.user_attrs.get("artifact_error")
            for artifact_id in found.values():
                path = store / artifact_id
                assert path.is_file(), path
                assert path.read_bytes()[:8] == PNG_MAGIC
            # Recorded where optuna-dashboard looks for them.
            assert any(k.startswith("artifacts:") for k in trial.system_attrs)
            checked += 1
    assert checked >= 3  # at least one trial per stage


@pytest.mark.slow
def test_report_writes_markdown_csv_and_figures(finished_quickstart, tmp_path):
    runs_dir, overrides = finished_quickstart
    _report("quickstart", overrides, tmp_path)
    md = (tmp_path / "quickstart.md").read_text()
    for suffix in ("optimization-history", "intermediate-values", "learning-curves", "tsne"):
        png = tmp_path / f"quickstart-{suffix}.png"
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, suffix
        assert f"(quickstart-{suffix}.png)" in md
    # Contrastive: no decoder, so a sentence instead of reconstructions.
    assert "no decoder" in md
    assert not (tmp_path / "quickstart-reconstructions.png").exists()
    assert "Pruning saved" in md and "epochs" in md
    assert "no published numbers" in md  # digits is not one of the report's datasets
    assert "Parameter importances" in md
    assert (tmp_path / "quickstart-param-importances.png").is_file() or "need at least 2" in md

    frame = pd.read_csv(tmp_path / "quickstart-trials.csv")
    studies = _studies(runs_dir, "quickstart")
    assert len(frame) == sum(len(s.get_trials()) for s in studies.values())
    for column in ("stage", "number", "state", "value", "epochs_run", "wall_time_s"):
        assert column in frame.columns
    for column in ("images_per_second", "seed", "device", "reason"):
        assert column in frame.columns
    # The user attrs docs/operations.md says the CSV has, beside the dashboard.
    for column in ("worker", "checkpoint_dir", "resumed_from_epoch", "checkpoint_discarded"):
        assert column in frame.columns
    assert frame["worker"].notna().all() and frame["checkpoint_dir"].notna().any()
    assert set(frame["stage"]) == {"screen", "promote", "final"}
    assert any(c.startswith("params_") for c in frame.columns)
    pruned = frame[frame["state"] == "PRUNED"]
    assert pruned["reason"].str.startswith("pruned after epoch").all()
    final = frame[frame["stage"] == "final"].iloc[0]
    assert 0 <= final["test_accuracy"] <= 1


@pytest.mark.slow
def test_autoencoder_report_has_reconstructions_and_tsne_of_both_tasks(
    finished_quickstart, tmp_path
):
    """A second task on the same dataset and storage joins the t-SNE figure."""
    runs_dir, quick = finished_quickstart
    runs = tmp_path / "runs"
    shutil.copytree(runs_dir, runs)
    small = [o for o in quick if not o.startswith("runs_dir=")]
    small = [o for o in small if not o.startswith("stages.screen.trials=")]
    overrides = [f"runs_dir={runs}", *small, "stages.screen.trials=2"]
    done = run_module(
        "search.run", "study=quickstart", "task=autoencoder", "name=qs-ae", *overrides,
        "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    final = _studies(runs, "qs-ae")["final"].get_trials()[0]
    assert {"val_reconstructions.png", "test_reconstructions.png", "interpolation.png"} <= set(
        trial_artifacts(final)
    )

    out = tmp_path / "report"
    stdout = _report("all", [f"runs_dir={runs}"], out)
    assert "qs-ae: wrote" in stdout and "quickstart: wrote" in stdout
    md = (out / "qs-ae.md").read_text()
    for suffix in ("reconstructions", "interpolation", "tsne"):
        assert (out / f"qs-ae-{suffix}.png").is_file(), suffix
    assert "MAE train" in md
    # Both tasks found in this storage are in the t-SNE; only guided is missing.
    assert "for guided on digits" in md
    assert (out / "quickstart.md").is_file()


@pytest.mark.slow
def test_screen_only_study_reports_in_sentences(tmp_path):
    runs = tmp_path / "runs"
    overrides = [
        f"runs_dir={runs}",
        "name=qs-screen",
        "stage=screen",
        "stages.screen.trials=2",
        "stages.screen.epochs=1",
        "train.max_batches=2",
    ]
    done = run_module("search.run", "study=quickstart", *overrides, "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "report"
    _report("qs-screen", [f"runs_dir={runs}"], out)
    md = (out / "qs-screen.md").read_text()
    assert "No final trial completed" in md
    assert "no trained networks" in md
    assert "need at least 2 completed" in md or (out / "qs-screen-param-importances.png").exists()
    frame = pd.read_csv(out / "qs-screen-trials.csv")
    assert len(frame) == 2 and set(frame["stage"]) == {"screen"}
    assert (out / "qs-screen-tsne.png").is_file()  # raw image space needs no trained network
    # Its own latent space is missing because the study is unfinished, not another study's.
    assert "this study's own final stage has not completed yet (run it again)" in md
    assert "run contrastive on digits" not in md


@pytest.mark.slow
def test_report_errors_are_one_line_with_exit_code_2(finished_quickstart, tmp_path):
    runs_dir, _ = finished_quickstart
    done = run_module("search.report", "study=nope", f"runs_dir={runs_dir}")
    assert done.returncode == 2
    assert done.stderr.startswith("error: study: no study 'nope'")
    assert "quickstart" in done.stderr
    done = run_module("search.report", "study=quickstart", f"runs_dir={tmp_path / 'empty'}")
    assert done.returncode == 2 and "no database" in done.stderr
    assert not (tmp_path / "empty" / "ssl-search.db").exists()
    # A folder that cannot be made although its parent looks writable (/proc, as root): one
    # line naming it, no traceback; refused up front (2) where the parent is not writable.
    out = "/proc/ssl-search-report"
    done = run_module("search.report", "study=quickstart", f"runs_dir={runs_dir}", "--out", out)
    assert done.returncode in (1, 2), done.stderr
    assert done.stderr.startswith("error: ") and out in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_results_table_sits_beside_the_published_numbers():
    cfg = load_config("mnist_autoencoder")
    attrs = {
        "train_accuracy": 0.99,
        "val_accuracy": 0.985,
        "test_accuracy": 0.98,
        "train_mae": 0.02,
        "val_mae": 0.021,
        "test_mae": 0.0205,
    }
    final = optuna.trial.create_trial(value=0.985, user_attrs=attrs)
    text = "\n".join(results_table(cfg, final))
    published = PUBLISHED[("autoencoder", "mnist")]
    assert f"{published['test_accuracy']:.2f}" in text
    assert f"{98.0 - published['test_accuracy']:+.2f} pp" in text  # -0.47 pp
    assert f"{0.0205 - published['test_mae']:+.4f}" in text
    assert "no published numbers" not in text
    assert "No final trial" in "\n".join(results_table(cfg, None))


def test_hook_survives_a_trial_without_history(tmp_path):
    """The hook reads the curve from storage, so it also works where no history is passed."""
    study, trial, run = tiny_trained_trial(
        tmp_path, "autoencoder", train_subset=200, val_subset=50, latent_dim=16
    )
    hook = make_trial_artifact_hook(tmp_path / "artifacts")
    hook(trial, run, None, {})
    study.tell(trial, 0.5)
    found = trial_artifacts(study.trials[0])
    assert set(found) == {"learning_curves.png", "val_reconstructions.png"}
    assert study.trials[0].user_attrs["artifact_seconds"] > 0


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_published_rows_are_complete(key):
    row = PUBLISHED[key]
    assert {"train_accuracy", "val_accuracy", "test_accuracy"} <= set(row)
    assert ("train_mae" in row) == (key[0] == "autoencoder")


def test_baselines_of_a_study_ranked_by_reconstruction_error_show_it_as_an_error():
    """``search.metric=val_mae``: the trials' rows show the MAE as it is, not as a percentage,
    and the note says what the metric is."""
    import pandas as pd

    from reporting.markdown import baselines_section
    from reporting.tables import BASELINE_COLUMNS
    from search.config import load_config

    cfg = load_config("mnist_autoencoder", ["search.metric=val_mae"])
    rows = [
        ("raw_pixels", None, None, None, None, "knn_accuracy", 0.81),
        ("untrained_encoder", None, None, None, None, "knn_accuracy", 0.62),
        ("best_screen", "screen", 4, "COMPLETE", 3, "val_mae", 0.0734),
    ]
    frame = pd.DataFrame(
        [dict(zip(BASELINE_COLUMNS, r, strict=True)) for r in rows], columns=list(BASELINE_COLUMNS)
    ).astype({"number": "Int64", "epochs": "Int64"})  # as reporting.tables.baselines_frame
    text = "\n".join(baselines_section(cfg, frame))
    assert "| best screen trial | screen #4 (3 epochs) | val_mae | 0.0734 |" in text
    assert "| raw pixels (no network), kNN | - | knn_accuracy | 81.00% |" in text
    assert "reconstruction error, lower is better" in text and "classifier" not in text


def test_the_learning_curve_of_a_configuration_joins_all_its_legs(tmp_path):
    """Under rungs each leg holds only the epochs it added: the report's learning curve of the
    configuration found is every completed leg of it, by epoch, and no other configuration's."""
    from reporting.store import pretrain_curve
    from search import curve_attr, load_config, stage_study_name

    cfg = load_config("quickstart")  # rungs 1, 3, 9
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'legs.db'}")
    studies = {
        s: optuna.create_study(storage=storage, study_name=stage_study_name(cfg.name, s))
        for s in ("screen", "promote")
    }

    def leg(stage: str, epochs: range, **attrs) -> optuna.trial.FrozenTrial:  # noqa: ANN003
        rows = {
            curve_attr("pretrain", e): {"phase": "pretrain", "epoch": e, "metrics": {"m": e / 10}}
            for e in epochs
        }
        trial = optuna.trial.create_trial(value=0.5, params={}, user_attrs={**attrs, **rows})
        studies[stage].add_trial(trial)
        return studies[stage].get_trials()[-1]

    leg("screen", range(1, 2), rung_to=1)  # configuration 0's first leg
    leg("screen", range(1, 2), rung_to=1)  # configuration 1: not ours
    leg("screen", range(2, 4), config=0, rung_from=1, rung_to=3)
    longest = leg("promote", range(4, 10), config=0, rung_from=3, rung_to=9)
    assert [r["epoch"] for r in pretrain_curve(storage, cfg, longest)] == list(range(1, 10))


def test_the_heading_says_how_the_study_spends_its_epochs():
    from reporting.markdown import heading
    from search.config import load_config

    rungs = " ".join(heading("quickstart", load_config("quickstart"), "sqlite:///x.db"))
    assert (
        "up to 12 configurations on rungs of 1, 3, 9 epochs (eta 3), at most 2 continued to 9"
        in rungs
    )
    # What the study holds may differ from its last run's settings (a rerun changed them).
    from reporting.tables import RungSavings

    held = RungSavings(13, 20, 9, at_long_budget=3, epochs_run=40, failed_legs=0, finished=True)
    said = " ".join(heading("quickstart", load_config("quickstart"), "sqlite:///x.db", held))
    assert "at most 2 continued to 9 (the settings of its last run)" in said
    assert "It holds 13 configurations, 3 of them trained to 9 epochs." in said
    pipeline = load_config("quickstart", ["search.pruner.name=hyperband"])
    assert "promote top 2 for 9 epochs" in " ".join(
        heading("quickstart", pipeline, "sqlite:///x.db")
    )


def test_the_dashboard_command_in_a_report_can_be_run_as_printed():
    """A URL with a password is never printed, masked or not, as an argument: the command
    leaves it to SSL_SEARCH_STORAGE, and says so."""
    from reporting.markdown import dashboard_pointer

    plain = "\n".join(dashboard_pointer("q", "sqlite:///runs/ssl-search.db", "runs/artifacts"))
    assert "search.dashboard study=q storage=sqlite:///runs/ssl-search.db artifacts_dir=" in plain
    secret = "\n".join(
        dashboard_pointer("q", "postgresql+psycopg://u:hunter2@db:5432/s", "runs/artifacts")
    )
    assert "hunter2" not in secret and "storage=" not in secret
    assert "search.dashboard study=q artifacts_dir=runs/artifacts" in secret
    assert "SSL_SEARCH_STORAGE" in secret


def test_report_options_are_checked_in_one_line_naming_the_option(tmp_path):
    """``--out`` under a file and an unknown ``--device``: exit 2, the option named."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = run_module("search.report", "study=quickstart", "--out", str(blocker / "x"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: --out: cannot make the folder {blocker / 'x'}")
    done = run_module("search.report", "study=quickstart", "--device", "gpu")
    assert done.returncode == 2 and done.stderr.startswith("error: --device: unknown device")


def test_trials_skipped_before_training_are_counted_apart_not_as_pruned(tmp_path):
    """A duplicate configuration, or a trial sampled when the queue emptied under a worker,
    trained nothing: the summary and the report count it as skipped, and it has no lineage."""
    from reporting.tables import state_counts, trials_frame
    from search import NOTHING_QUEUED, open_studies, summarize

    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = load_config("quickstart", [f"storage={url}", f"runs_dir={tmp_path}"])
    studies = open_studies(cfg, url)
    promote = studies.promote
    leg = optuna.trial.create_trial(
        value=0.9,
        user_attrs={"config": 3, "rung_from": 3, "rung_to": 9, "source_study": "quickstart.screen",
                    "source_trial": 3},
    )  # fmt: skip
    promote.add_trial(leg)
    for attrs in (
        {"prune_reason": f"{NOTHING_QUEUED}: another worker took it"},
        {"duplicate_of": 0, "prune_reason": "skipped: same configuration as #0"},
    ):
        promote.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs=attrs))
    promote.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={}))
    entry = summarize(studies, cfg)["stages"]["promote"]
    assert {k: v for k, v in entry["counts"].items() if v} == {
        "COMPLETE": 1, "PRUNED": 1, "SKIPPED": 2,
    }  # fmt: skip
    assert entry["lineage"] == {0: ("quickstart.screen", 3)}
    frame = trials_frame({"promote": promote})
    assert list(frame["state"]) == ["COMPLETE", "SKIPPED", "SKIPPED", "PRUNED"]
    assert list(state_counts(frame).loc["promote"][["COMPLETE", "PRUNED", "SKIPPED"]]) == [1, 1, 2]
    assert frame.loc[0, "source_study"] == "quickstart.screen"


def test_history_and_importances_under_rungs_use_one_value_per_configuration(tmp_path):
    """A continuation is the same parameters at another budget: the optimization history and
    the importances see each configuration once, at the first rung, where all compare."""
    from reporting.report import first_rung_study

    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'h.db'}", study_name="x.screen", direction="maximize"
    )
    dist = {"lr": optuna.distributions.FloatDistribution(0.1, 1.0)}
    for number, (lr, value) in enumerate([(0.2, 0.5), (0.4, 0.7), (0.6, 0.6)]):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr}, distributions=dist, value=value,
                user_attrs={"config": number, "rung_to": 1},
            )
        )  # fmt: skip
    study.add_trial(  # configuration 1 continued to rung 3: a higher value at a higher budget
        optuna.trial.create_trial(
            params={"lr": 0.4}, distributions=dist, value=0.95,
            user_attrs={"config": 1, "rung_from": 1, "rung_to": 3},
        )
    )  # fmt: skip
    study.add_trial(  # a duplicate, skipped
        optuna.trial.create_trial(
            state=TrialState.PRUNED, params={"lr": 0.2}, distributions=dist,
            user_attrs={"duplicate_of": 0, "prune_reason": "skipped"},
        )
    )  # fmt: skip
    first = first_rung_study(study)
    assert first.study_name == "x.screen"
    assert [t.value for t in first.trials] == [0.5, 0.7, 0.6]
    assert first.best_value == 0.7


@pytest.mark.parametrize("best,says", [(0.9792, "raw-pixel baseline (98.61%)"), (0.99, None)])
def test_the_report_says_when_the_search_does_not_beat_a_baseline(best, says):
    import pandas as pd

    from reporting.markdown import baselines_section
    from reporting.tables import BASELINE_COLUMNS

    cfg = load_config("quickstart")
    rows = [
        ("raw_pixels", None, None, None, None, "knn_accuracy", 0.9861),
        ("untrained_encoder", None, None, None, None, "knn_accuracy", 0.90),
        ("best_screen", "screen", 4, "COMPLETE", 3, "knn_accuracy", 0.9722),
        ("best_promote", "promote", 0, "COMPLETE", 9, "knn_accuracy", best),
    ]
    frame = pd.DataFrame(
        [dict(zip(BASELINE_COLUMNS, r, strict=True)) for r in rows], columns=list(BASELINE_COLUMNS)
    ).astype({"number": "Int64", "epochs": "Int64"})
    text = "\n".join(baselines_section(cfg, frame))
    if says is None:
        assert "does not beat" not in text
    else:
        assert f"**The search's best ({100 * best:.2f}%) does not beat the {says}**" in text
        assert "untrained-encoder" not in text  # that one it beats


def test_pruning_savings_leave_out_trials_that_trained_nothing(tmp_path):
    """The previous pipeline's "what pruning saved": a skipped duplicate was not pruned and
    saved no epochs."""
    from reporting.tables import pruning_savings

    cfg = load_config("quickstart", ["search.pruner.name=hyperband"])
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'p.db'}", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"epochs_run": 3}))
    for _ in range(3):
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.PRUNED,
                user_attrs={"duplicate_of": 0, "prune_reason": "skipped: same configuration"},
            )
        )
    saved = pruning_savings(cfg, study)
    assert (saved.trials, saved.pruned, saved.epochs_run, saved.saved) == (1, 0, 3, 0)


def test_tsne_points_below_five_are_refused_and_five_draw(tmp_path):
    """t-SNE needs at least 5 test images: ``--tsne-points 2`` is refused in one line, before
    anything is written (it used to be raised to 5 without a word); 5 draw the raw-image panel
    (of a study that has no trial yet, which needs no trained network)."""
    from search import open_studies

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    open_studies(load_config("quickstart", [f"storage={url}", f"runs_dir={tmp_path}"]), url)
    out = tmp_path / "report"
    refused = run_module(
        "search.report", "study=quickstart", f"runs_dir={tmp_path}", "--out", str(out),
        "--tsne-points", "2", "--device", "cpu",
    )  # fmt: skip
    assert "at least 5" in assert_one_line_error(refused, "--tsne-points")
    assert not out.exists()
    done = run_module(
        "search.report", "study=quickstart", f"runs_dir={tmp_path}", "--out", str(out),
        "--tsne-points", "5", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "quickstart-tsne.png").read_bytes()[:8] == PNG_MAGIC


def test_report_all_skips_a_half_made_study_and_reports_the_rest(tmp_path):
    """A run stopped between creating its study and storing its config leaves a study without
    one (running it again finishes it). ``study=all`` once ended on it, one line, with the
    combined table unwritten; it skips it with a warning and reports the rest."""
    from search import open_studies, storage_url

    cfg = load_config("quickstart", [f"runs_dir={tmp_path}", "name=whole"])
    url = storage_url(cfg)
    open_studies(cfg, url)
    optuna.create_study(study_name="half.screen", storage=url)
    done = run_module("search.report", "study=all", f"runs_dir={tmp_path}", timeout=300)
    assert done.returncode == 0, done.stderr
    (warning,) = done.stderr.strip().splitlines()
    assert warning.startswith("warning: study: skipping 'half': it has no stored config")
    assert "whole: wrote" in done.stdout and "half: wrote" not in done.stdout
    assert (tmp_path / "report" / "all-studies.md").is_file()
    assert not (tmp_path / "report" / "half.md").exists()


def test_commands_that_only_read_a_study_do_not_need_this_machine_to_train_it(tmp_path):
    """A study file made for a GPU machine and an image folder there: on a laptop without
    either, --status, the dashboard and the report once refused it (train.device, data.path)
    although they only read the study in storage."""
    import yaml

    from search import open_studies, storage_url

    cfg = load_config("quickstart", [f"runs_dir={tmp_path}", "name=elsewhere"])
    open_studies(cfg, storage_url(cfg))
    spec = yaml.safe_load((REPO_ROOT / "studies" / "quickstart.yaml").read_text())
    spec["name"] = "elsewhere"
    spec["data"] = {"name": "imagefolder", "path": str(tmp_path / "on-the-gpu-machine")}
    spec.setdefault("train", {})["device"] = "cuda"
    study = tmp_path / "gpu-study.yaml"
    study.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="data.path"):
        load_config(str(study), [f"runs_dir={tmp_path}"])  # it cannot train here
    for module, *args in (
        ("search.run", "--status"),
        ("search.dashboard", "--print-command"),
        ("search.report",),
    ):
        done = run_module(module, f"study={study}", f"runs_dir={tmp_path}", *args, timeout=300)
        assert done.returncode == 0, f"{module}: {done.stderr}"
    assert (tmp_path / "report" / "elsewhere.md").is_file()
