"""What the report's tables and sentences say, read from studies in a real SQLite file: the final
stage's test accuracy, the best study of a task, what the rungs and pruning saved, the baselines,
the best trial's metric, each trial's uploads, the plots' sentences (no training: trials are
added with their recorded attrs, as the search stores them)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from reporting.report import MarkdownDocument, search_plots, write_combined
from reporting.store import finished_finals, same_dataset_finals, stage_studies
from reporting.tables import (
    baselines_frame,
    best_params_frame,
    pruning_savings,
    rung_savings,
    trials_frame,
)
from search import FINAL_METRIC, curve_attr, load_config, metric_of, open_storage, open_studies

LR = {"adam_lr": FloatDistribution(1e-4, 1e-2, log=True)}


def _stored(tmp_path: Path, name: str, study: str = "quickstart", *overrides: str):
    """(url, config, stage -> study) of study ``name`` stored in ``tmp_path``'s one database."""
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config(study, [f"storage={url}", f"runs_dir={tmp_path}", f"name={name}", *overrides])
    open_studies(cfg, url)
    return url, cfg, stage_studies(open_storage(url), name)


def _final(value: float, **attrs: float) -> optuna.trial.FrozenTrial:
    return create_trial(value=value, user_attrs={"val_accuracy": value, **attrs})


# ---- the combined table (study=all) ----------------------------------------------------


def test_the_combined_table_shows_the_final_trials_test_accuracy(tmp_path):
    url, _, studies = _stored(tmp_path, "qs")
    studies["final"].add_trial(_final(0.95, train_accuracy=0.99, test_accuracy=0.9))
    path = write_combined(open_storage(url), url, [], tmp_path / "report")
    row = next(line for line in path.read_text().splitlines() if "contrastive" in line)
    assert "| 90.00 (" in row and "`qs` final #0" in row
    assert "95.00" not in row  # the validation accuracy is what ranks, not what is shown


def test_the_combined_table_takes_the_study_with_the_best_final_validation_accuracy(tmp_path):
    """Several studies of one task and dataset: the best final value wins, the name breaks ties."""
    for name, value in (("aa", 0.6), ("bb", 0.8), ("cc", 0.8), ("dd", 0.7)):
        url, _, studies = _stored(tmp_path, name)
        studies["final"].add_trial(_final(value, test_accuracy=value - 0.01))
    found = finished_finals(open_storage(url), [], url)
    cfg, final = found[("contrastive", "digits")]
    assert (cfg.name, final.value) == ("bb", 0.8)


def test_the_tsne_of_a_study_takes_other_tasks_on_its_own_dataset_only(tmp_path):
    url, cfg, studies = _stored(tmp_path, "qs")
    studies["final"].add_trial(_final(0.9, test_accuracy=0.9))
    _, _, other = _stored(tmp_path, "ae-mnist", "mnist_autoencoder")
    other["final"].add_trial(_final(0.95, test_accuracy=0.95))
    found = same_dataset_finals(open_storage(url), cfg, [], url)
    assert {task: c.name for task, (c, _) in found.items()} == {"contrastive": "qs"}


def _image_folder(root: Path) -> Path:
    """A one-class image folder (one grey 28x28 PNG per split)."""
    from PIL import Image

    for split in ("train", "test"):
        (root / split / "only").mkdir(parents=True)
        Image.new("L", (28, 28)).save(root / split / "only" / "0.png")
    return root


def test_two_image_folders_are_two_datasets_in_the_combined_table_and_the_tsne(tmp_path):
    """Every image-folder study has data.name imagefolder: the combined table once put studies
    of unrelated folders in one column (the best of them hiding the others), and a study's
    t-SNE figure took another folder's latent space under its own class names."""
    first, second = _image_folder(tmp_path / "first"), _image_folder(tmp_path / "second")
    on = {folder: ["data.name=imagefolder", f"data.path={folder}"] for folder in (first, second)}
    url, cfg, studies = _stored(tmp_path, "a-first", "quickstart", *on[first])
    studies["final"].add_trial(_final(0.8, test_accuracy=0.8))
    _, _, other = _stored(tmp_path, "b-second", "quickstart", *on[second])
    other["final"].add_trial(_final(0.9, test_accuracy=0.9))
    guided = ["task=guided", "search.metric=val_accuracy"]
    _, _, same = _stored(tmp_path, "c-first", "quickstart", *on[first], *guided)
    same["final"].add_trial(_final(0.7, test_accuracy=0.7))
    storage = open_storage(url)
    expected = {
        ("contrastive", f"imagefolder {first}"): "a-first",
        ("contrastive", f"imagefolder {second}"): "b-second",
        ("guided", f"imagefolder {first}"): "c-first",
    }
    for overrides in ([], [f"data.path={second}"]):  # a moved folder, given to the report
        found = finished_finals(storage, overrides, url)
        assert {key: c.name for key, (c, _) in found.items()} == expected
    tsne = same_dataset_finals(storage, cfg, [], url)
    assert {task: c.name for task, (c, _) in tsne.items()} == {
        "contrastive": "a-first",
        "guided": "c-first",
    }
    table = write_combined(storage, url, [], tmp_path / "report").read_text()
    assert f"imagefolder {first}" in table and f"imagefolder {second}" in table


def test_a_study_whose_networks_cannot_be_rebuilt_leaves_the_tsne_of_the_others(tmp_path):
    """Another study's damaged checkpoint (or unreachable data) once aborted this study's whole
    report; its t-SNE panel is left out, and the report says why."""
    from reporting.report import FigureSources, tsne_figure
    from search import PRETRAIN_FILE, checkpoint_store

    url, cfg, studies = _stored(tmp_path, "qs")
    studies["final"].add_trial(_final(0.9, test_accuracy=0.9))
    guided = ["task=guided", "search.metric=val_accuracy"]
    _, other_cfg, other = _stored(tmp_path, "guided-digits", "quickstart", *guided)
    folders = {"source_checkpoint_dir": "damaged", "checkpoint_dir": "probe"}
    other["final"].add_trial(create_trial(value=0.8, user_attrs={"test_accuracy": 0.8, **folders}))
    damaged = checkpoint_store(other_cfg).root / "damaged" / PRETRAIN_FILE
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a checkpoint")
    doc = MarkdownDocument("qs", tmp_path / "report")
    tsne_figure(doc, cfg, FigureSources(open_storage(url), url, [], 30, "cpu"), None)
    said = " ".join(doc.lines)
    assert "'guided-digits' could not be rebuilt" in said and "damaged" in said
    assert [path.name for path in doc.files] == ["qs-tsne.png"]


# ---- what the rungs and pruning saved --------------------------------------------------


def _rung_legs(tmp_path: Path):
    """quickstart (rungs 1, 3, 9): configurations 0 and 1 at rung 1, 0 continued to 3 and 9,
    and a failed continuation of 1; (config, stage -> study)."""
    _, cfg, studies = _stored(tmp_path, "qs")
    screen, promote = studies["screen"], studies["promote"]
    for _ in range(2):
        screen.add_trial(create_trial(value=0.5, user_attrs={"rung_to": 1, "epochs_added": 1}))
    leg = {"config": 0, "rung_from": 1, "rung_to": 3, "epochs_added": 2}
    screen.add_trial(create_trial(value=0.6, user_attrs=leg))
    failed = {"config": 1, "rung_from": 1, "rung_to": 3}
    screen.add_trial(create_trial(state=TrialState.FAIL, user_attrs=failed))
    leg = {"config": 0, "rung_from": 3, "rung_to": 9, "epochs_added": 6}
    promote.add_trial(create_trial(value=0.7, user_attrs=leg))
    return cfg, studies


def test_rung_savings_leave_failed_legs_out_and_count_them(tmp_path):
    cfg, studies = _rung_legs(tmp_path)
    saved = rung_savings(cfg, studies)
    assert (saved.configurations, saved.legs, saved.epochs_run) == (2, 4, 10)
    assert (saved.failed_legs, saved.finished) == (1, True)
    assert (saved.planned, saved.saved) == (18, 8)


def test_rung_savings_are_so_far_while_a_leg_is_queued(tmp_path):
    cfg, studies = _rung_legs(tmp_path)
    queued = {"config": 1, "rung_from": 1, "rung_to": 3}  # the failed leg, queued again
    studies["screen"].enqueue_trial({}, user_attrs=queued)
    assert not rung_savings(cfg, studies).finished


def test_pruning_savings_time_an_epoch_over_every_epoch_run(tmp_path):
    """The mean seconds per epoch (training + validation) is over epochs, not trials: a trial
    pruned after one epoch weighs one epoch."""
    _, cfg, studies = _stored(tmp_path, "qs", "quickstart", "search.pruner.name=median")

    def rows(seconds: float, epochs: int) -> dict[str, dict]:
        return {
            curve_attr("pretrain", e): {
                "phase": "pretrain", "epoch": e, "seconds": seconds, "eval_seconds": 1.0,
            }
            for e in range(1, epochs + 1)
        }  # fmt: skip

    screen = studies["screen"]
    screen.add_trial(create_trial(value=0.6, user_attrs={"epochs_run": 3, **rows(2.0, 3)}))
    pruned = {"epochs_run": 1, **rows(5.0, 1)}
    screen.add_trial(create_trial(state=TrialState.PRUNED, user_attrs=pruned))
    saved = pruning_savings(cfg, screen)
    assert (saved.trials, saved.pruned, saved.epochs_run) == (2, 1, 4)
    assert saved.mean_epoch_seconds == pytest.approx((3 * 3.0 + 6.0) / 4)


# ---- baselines, best trials, the trials CSV --------------------------------------------


def test_a_pruned_report_configuration_shows_its_last_reported_value(tmp_path):
    _, cfg, studies = _stored(tmp_path, "qs", "quickstart", "search.pruner.name=median")
    report = create_trial(
        state=TrialState.PRUNED,
        intermediate_values={1: 0.3, 2: 0.5, 3: 0.45},
        user_attrs={"baseline": "report", "epochs_run": 3},
    )
    studies["screen"].add_trial(report)
    studies["screen"].add_trial(create_trial(value=0.6, user_attrs={"epochs_run": 3}))
    frame = baselines_frame(cfg, studies).set_index("row")
    assert frame.loc["report_configuration", "state"] == "PRUNED"
    assert frame.loc["report_configuration", "value"] == 0.45  # epoch 3's, the last
    assert frame.loc["best_screen", "value"] == 0.6


def test_the_report_configuration_is_its_attempt_that_finished_not_the_one_that_failed(tmp_path):
    """Without rungs, the report's configuration interrupted and retried: both attempts carry
    the marker (a retry copies the user attrs); the row shows the retry that completed."""
    _, cfg, studies = _stored(tmp_path, "qs", "quickstart", "search.pruner.name=median")
    marked = {"baseline": "report", "epochs_run": 3}
    studies["screen"].add_trial(
        create_trial(state=TrialState.FAIL, intermediate_values={1: 0.3}, user_attrs=marked)
    )
    studies["screen"].add_trial(
        create_trial(value=0.8, user_attrs=marked, system_attrs={"failed_trial": 0})
    )
    row = baselines_frame(cfg, studies).set_index("row").loc["report_configuration"]
    assert (row["number"], row["state"], row["value"]) == (1, "COMPLETE", 0.8)


def test_the_best_final_trial_is_shown_in_the_final_stages_metric(tmp_path):
    _, cfg, studies = _stored(tmp_path, "ae", "mnist_autoencoder", "search.metric=val_mae")
    studies["screen"].add_trial(create_trial(value=0.07))
    studies["final"].add_trial(_final(0.97))
    frame = best_params_frame(cfg, studies).set_index("stage")
    assert metric_of(cfg) == "val_mae" and FINAL_METRIC == "val_accuracy"
    assert frame.loc["screen", "metric"] == "val_mae"
    assert frame.loc["final", "metric"] == "val_accuracy"
    assert frame.loc["final", "value"] == 0.97


def test_the_trials_csv_counts_each_trials_uploaded_figures(tmp_path):
    from reporting.artifacts import artifact_store, upload_file

    _, _, studies = _stored(tmp_path, "qs")
    screen = studies["screen"]
    store = artifact_store(tmp_path / "artifacts")
    trial = screen.ask()
    for name in ("learning_curves.png", "val_reconstructions.png"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n")
        upload_file(trial, store, tmp_path / name)
    screen.tell(trial, 0.5)
    screen.add_trial(create_trial(value=0.4))
    frame = trials_frame(studies)
    assert list(frame["artifacts"]) == [2, 0]


# ---- the plots' sentences --------------------------------------------------------------


def _plots_text(tmp_path: Path, cfg, screen: optuna.Study) -> str:
    import matplotlib

    matplotlib.use("Agg")
    doc = MarkdownDocument("qs", tmp_path / "report")
    doc.out_dir.mkdir()
    search_plots(doc, cfg, screen)
    return doc.text()


def test_the_history_under_rungs_names_the_first_rungs_epochs(tmp_path):
    _, cfg, studies = _stored(tmp_path, "qs")  # rungs 1, 3, 9
    for number, lr in enumerate((1e-3, 3e-3)):
        studies["screen"].add_trial(
            create_trial(
                value=0.5 + lr, params={"adam_lr": lr}, distributions=LR,
                user_attrs={"config": number, "rung_to": 1},
            )
        )  # fmt: skip
    text = _plots_text(tmp_path, cfg, studies["screen"])
    assert "its value at the first rung (1 epoch), where every configuration has one" in text


@pytest.mark.parametrize("rates,said", [((1e-3, 3e-3), None), ((1e-3, 1e-3), "same parameters")])
def test_importances_need_two_different_configurations_not_three(tmp_path, rates, said):
    _, cfg, studies = _stored(tmp_path, "qs", "quickstart", "search.pruner.name=median")
    for lr in rates:
        studies["screen"].add_trial(
            create_trial(value=0.5 + lr, params={"adam_lr": lr}, distributions=LR)
        )
    text = _plots_text(tmp_path, cfg, studies["screen"])
    section = text.split("## Parameter importances", 1)[1]
    if said is None:
        assert "need at least 2" not in section
    else:
        assert "this study has 2 completed, all with the same parameters" in section
