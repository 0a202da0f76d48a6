"""What the report compares: epochs behind every number, baselines, single titles, and per-trial
figures drawn off the trial's path (real SQLite, small finished studies on CPU)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import optuna
import pytest
from conftest import TINY_STAGES, run_module, tiny_trained_trial

import search
from reporting import figures
from reporting.artifacts import (
    make_trial_artifact_hook,
    placeholder_png,
    trial_artifacts,
    trial_drawings,
)
from reporting.markdown import results_table, rung_sentences
from reporting.report import history_plot, intermediate_plot, write_report
from reporting.tables import PUBLISHED_EPOCHS, Budget, RungSavings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two studies of different tasks on the quickstart's digits, as small as a finished study gets.
TINY = (
    *TINY_STAGES,
    "search.space.channels.choices=[8]",
    "data.train_subset=200",
    "data.val_subset=60",
    "data.test_subset=60",
)
STUDIES = {"fid-contrastive": [], "fid-autoencoder": ["task=autoencoder"]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs folder whose storage holds two finished studies (contrastive, autoencoder), run
    in this process with the artifact hook, every figure drawn."""
    runs = tmp_path_factory.mktemp("fidelity-runs")
    for name, extra in STUDIES.items():
        cfg = search.load_config("quickstart", [f"runs_dir={runs}", f"name={name}", *TINY, *extra])
        studies = search.open_studies(cfg, search.storage_url(cfg))
        runner = search.TrialRunner(
            cfg, device="cpu", progress=False, find_trial=studies.find_trial
        )
        hook = make_trial_artifact_hook(search.resolved_paths(cfg)["artifacts"])
        runner.hooks.append(hook)
        search.run_stages(studies, runner, cfg)
        assert hook.flush(timeout=120)
        assert not hook.renderer.failed
    return runs


def _stage_studies(runs: Path, name: str) -> dict[str, optuna.Study]:
    url = f"sqlite:///{runs / 'ssl-search.db'}"
    return {
        stage: optuna.load_study(study_name=f"{name}.{stage}", storage=url)
        for stage in search.STAGES
    }


@pytest.fixture(scope="module")
def reported(finished: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``search.report study=all`` on that storage: (report folder, what it printed)."""
    out = tmp_path_factory.mktemp("fidelity-report")
    done = run_module(
        "search.report", "study=all", f"runs_dir={finished}", "--out", str(out),
        "--tsne-points", "5", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


# ---- 1. the epochs behind every number --------------------------------------------------


@pytest.mark.slow
def test_study_all_writes_one_table_shaped_like_the_reports_with_budgets(finished, reported):
    out, stdout = reported
    combined = out / "all-studies.md"
    assert f"all studies: wrote {combined}" in stdout
    md = combined.read_text()
    head = next(line for line in md.splitlines() if line.startswith("| task"))
    for column in ("MNIST: this search", "MNIST: report", "CIFAR-10: this search",
                   "CIFAR-10: report", "digits: this search"):  # fmt: skip
        assert column in head
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if "|" in line}
    contrastive = rows["1.2.3 contrastive / SimCLR (frozen encoder): test accuracy (%)"]
    # Ours: 1 promoted epoch + 1 probe epoch at 2 batches each; the report's 200 + 30 epochs.
    final = _stage_studies(finished, "fid-contrastive")["final"].trials[0]
    used = final.user_attrs.get("encoder_epoch", 2)  # the final stage's encoder: its best epoch
    encoder = "2" if used == 2 else f"2 (best: epoch {used})"
    subsets = "train_subset=200, val_subset=60, test_subset=60"
    assert (
        f"({encoder} + 1 epochs of at most 2 batches, on subsets: {subsets}), `fid-contrastive` "
        "final #0" in contrastive
    )
    assert "69.64 (200 + 30 epochs)" in contrastive and "98.88 (100 + 20 epochs)" in contrastive
    guided = rows["1.2.2 classification-guided encoder: test accuracy (%)"]
    assert "80.42 (50 epochs)" in guided and "99.14 (10 epochs)" in guided
    assert guided.count(" - ") >= 3  # no guided study finished: '-' for this search
    mae = rows["1.2.1 self-supervised autoencoder (frozen encoder): reconstruction MAE, test"]
    assert "`fid-autoencoder` final #0" in mae and "0.0160 (15 + 20 epochs)" in mae
    assert "0.295 (20 + 20 epochs)" in mae.replace("0.2950", "0.295")


def _finals(path: Path, studies: dict[str, tuple[list[str], float]]) -> str:
    """A storage at ``path`` holding a quickstart study per entry, each with one final trial of
    the given value: name -> (its overrides, the value); the storage URL. The smoke study's
    images came from a copy (user attr ``data_source``)."""
    url = f"sqlite:///{path}"
    for name, (extra, value) in studies.items():
        cfg = search.load_config("quickstart", [f"name={name}", f"storage={url}", *extra])
        final = search.open_studies(cfg, url).of("final")
        attrs = {"test_accuracy": value - 0.01}
        if name == "smoke":
            attrs[search.DATA_SOURCE_ATTR] = "a lossy copy"
        final.add_trial(optuna.trial.create_trial(value=value, user_attrs=attrs))
    return url


def test_a_study_on_subsets_never_outranks_one_on_all_its_data(tmp_path):
    """Beside the report's numbers stands a study that trained and was tested on all its data:
    a smoke run on subsets, however high its final validation accuracy on its few images, only
    when no such study finished; its subsets are then said with its budget."""
    from reporting.markdown import combined_table
    from reporting.store import finished_finals, same_dataset_finals
    from reporting.tables import combined_frame

    smoke = (["data.train_subset=200", "data.test_subset=60"], 0.99)
    capped = (["train.max_batches=2"], 0.9)
    url = _finals(tmp_path / "a.db", {"full": ([], 0.8), "smoke": smoke, "capped": capped})
    storage = optuna.storages.RDBStorage(url)
    found = finished_finals(storage, [], url)
    assert found[("contrastive", "digits")][0].name == "full"
    cfg = search.load_config("quickstart", ["name=other", f"storage={url}", "task=autoencoder"])
    assert same_dataset_finals(storage, cfg, [], url)["contrastive"][0].name == "full"
    frame = combined_frame(found)
    row = frame[(frame.dataset == "digits") & (frame.task == "contrastive")].iloc[0]
    assert (row.study, row.epochs) == ("full", "9 + 15 epochs")
    assert combined_table(frame)[-1].startswith("Each cell of this search")  # no copy used

    url = _finals(tmp_path / "b.db", {"smoke": smoke, "capped": capped})
    frame = combined_frame(finished_finals(optuna.storages.RDBStorage(url), [], url))
    row = frame[(frame.dataset == "digits") & (frame.task == "contrastive")].iloc[0]
    assert row.study == "smoke"  # of two studies that are not full scale, the higher value
    assert row.epochs == "9 + 15 epochs, on subsets: train_subset=200, test_subset=60"
    assert combined_table(frame)[-1] == "`smoke` read its images from a lossy copy."


def test_results_table_states_both_budgets_and_says_when_they_differ():
    cfg = search.load_config("cifar_contrastive")
    final = optuna.trial.create_trial(
        value=0.7,
        params={},
        distributions={},
        user_attrs={"train_accuracy": 0.75, "val_accuracy": 0.7, "test_accuracy": 0.69},
    )
    text = "\n".join(results_table(cfg, final))
    assert "epochs (encoder + classifier)" in text
    assert "| this search (final #-1) | 100 + 30 |" in text  # promoted for 100, probe 30
    assert "| report (1.2.3 cifar10) | 200 + 30 |" in text
    assert "| difference | differ |" in text
    assert "from 100 + 30 epochs, the report's from 200 + 30" in text
    assert "images came from" not in text
    final.user_attrs[search.DATA_SOURCE_ATTR] = "the JPEG copy at /data/cifar10-jpeg, lossy"
    assert results_table(cfg, final)[-1].endswith(
        "This search's images came from the JPEG copy at /data/cifar10-jpeg, lossy."
    )


def test_results_table_names_the_encoder_epoch_the_final_stage_took():
    cfg = search.load_config("cifar_contrastive")
    accuracies = {"train_accuracy": 0.75, "val_accuracy": 0.7, "test_accuracy": 0.69}
    for used, shown in ((63, "100 (best: epoch 63) + 30"), (100, "100 + 30")):
        final = optuna.trial.create_trial(
            value=0.7, params={}, distributions={}, user_attrs={**accuracies, "encoder_epoch": used}
        )
        assert f"| this search (final #-1) | {shown} |" in "\n".join(results_table(cfg, final))
    stored_before = {**accuracies, "encoder_checkpoint": "best: epoch 5 (pretrain-best.pt)"}
    final = optuna.trial.create_trial(
        value=0.7, params={}, distributions={}, user_attrs=stored_before
    )
    assert "| 100 (best: epoch 5) + 30 |" in "\n".join(results_table(cfg, final))
    # The same training budget as the report's; an earlier epoch picked on validation says so.
    cfg = search.load_config("mnist_autoencoder")
    maes = {"train_mae": 0.02, "val_mae": 0.02, "test_mae": 0.02}
    for used, said in ((3, "same budget"), (15, "same")):
        final = optuna.trial.create_trial(
            value=0.9,
            params={},
            distributions={},
            user_attrs={**accuracies, **maes, "encoder_epoch": used},
        )
        assert f"| difference | {said} |" in "\n".join(results_table(cfg, final))


@pytest.mark.parametrize("key", sorted(PUBLISHED_EPOCHS))
def test_published_epochs_follow_the_reports_recipes(key):
    budget = PUBLISHED_EPOCHS[key]
    assert isinstance(budget, Budget)
    assert (budget.probe is None) == (key[0] == "guided")


# ---- 2. baselines ----------------------------------------------------------------------


@pytest.mark.slow
def test_each_study_report_shows_both_baselines_beside_the_best(finished, reported):
    out, _ = reported
    for name in STUDIES:
        stored = _stage_studies(finished, name)["screen"].user_attrs[search.BASELINES_ATTR]
        md = (out / f"{name}.md").read_text()
        section = md.split("## Baselines", 1)[1].split("\n## ", 1)[0]
        raw = f"{100 * stored['raw_pixels_knn_accuracy']:.2f}%"
        untrained = f"{100 * stored['untrained_encoder_knn_accuracy']:.2f}%"
        assert f"| raw pixels (no network), kNN | - | knn_accuracy | {raw} |" in section
        assert f"untrained (random weights), kNN | - | knn_accuracy | {untrained} |" in section
        # The report's configuration at its furthest leg (the rungs may have continued it).
        stages = _stage_studies(finished, name)
        first = next(t for t in stages["screen"].trials if t.user_attrs.get("baseline"))
        legs = [
            (t.user_attrs["rung_to"], stage, t.number)
            for stage in ("screen", "promote")
            for t in stages[stage].trials
            if t.user_attrs.get("config", t.number) == first.number and t.value is not None
        ]
        _, stage, number = max(legs)
        assert f"| the study's own settings, trained | {stage} #{number} (" in section
        assert (
            "*The study's own settings* are its study file's values with any overrides" in section
        )
        assert "| best screen trial | screen #" in section
        assert "| best promoted trial | promote #" in section
        assert "no network at all" in section and "not recorded" not in section


@pytest.mark.slow
def test_each_study_report_counts_what_the_rungs_saved_from_its_legs(finished, reported):
    out, _ = reported
    for name in STUDIES:
        studies = _stage_studies(finished, name)
        legs = [
            t
            for stage in ("screen", "promote")
            for t in studies[stage].get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        ]
        configs = {int(t.user_attrs.get("config", t.number)) for t in legs}
        added = sum(
            int(t.user_attrs["rung_to"]) - int(t.user_attrs.get("rung_from", 0)) for t in legs
        )
        assert len(legs) > len(configs)  # something was continued
        md = (out / f"{name}.md").read_text()
        section = md.split("## What the rungs saved", 1)[1].split("\n## ", 1)[0]
        said = f"The rungs trained {len(configs)} configurations in {len(legs)} completed legs"
        assert f"{said} for **{added} epochs** (a continued" in section
        assert f"{len(configs)} x 2 = **{2 * len(configs)} epochs**" in section  # long budget 2
        # The heading says what the study holds, beside the settings of its last run.
        at_long = {
            int(t.user_attrs.get("config", t.number)) for t in legs if t.user_attrs["rung_to"] == 2
        }
        held = (
            f"It holds {len(configs)} configurations, {len(at_long)} of them trained to 2 epochs."
        )
        assert held in md.split("\n## ", 1)[0]
        assert "What pruning saved" not in md


def test_rung_savings_say_so_far_and_what_they_leave_out():
    unfinished = RungSavings(
        configurations=4,
        legs=6,
        long_budget=9,
        at_long_budget=1,
        epochs_run=14,
        failed_legs=2,
        finished=False,
    )
    (text,) = rung_sentences(unfinished)
    assert text.startswith("So far (the study is not finished), the rungs trained 4")
    assert "**14 epochs** (a continued leg counts the epochs it added; 2 failed legs" in text
    assert "4 x 9 = **36 epochs**" in text and "saved **22 epochs (61%)**" in text
    assert rung_sentences(None) == [
        "No leg has completed yet, so the rungs have saved nothing yet."
    ]


@pytest.mark.slow
def test_a_study_without_recorded_baselines_says_not_recorded(finished, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for part in finished.glob("ssl-search.db*"):  # the database and its WAL files
        shutil.copy(part, runs / part.name)
    url = f"sqlite:///{runs / 'ssl-search.db'}"
    screen = optuna.load_study(study_name="fid-contrastive.screen", storage=url)
    screen.set_user_attr(search.BASELINES_ATTR, None)  # as a study run before baselines existed
    storage = search.open_storage(url)
    doc = write_report(
        "fid-contrastive", storage, url, [f"runs_dir={finished}"], tmp_path / "out", 5, "cpu"
    )
    md = doc.files[0].read_text()
    section = md.split("## Baselines", 1)[1].split("\n## ", 1)[0]
    assert "| raw pixels (no network), kNN | - | knn_accuracy | not recorded |" in section
    assert "were not recorded for this study" in section
    assert "| best screen trial | screen #" in section  # the search's own numbers stay


# ---- 3. figures ------------------------------------------------------------------------


def _titles(ax) -> list[str]:
    shown = [ax.get_title(loc) for loc in ("left", "center", "right")]
    return [t for t in (*shown, ax.figure.get_suptitle()) if t]


def test_optuna_plots_in_the_report_have_one_title_each():
    import matplotlib.pyplot as plt

    study = optuna.create_study(direction="maximize", study_name="plots.screen")
    for k in range(3):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        for epoch in (1, 2):
            trial.report(0.1 * k + 0.01 * epoch, epoch)
        study.tell(trial, 0.1 * k)
    with matplotlib.rc_context():
        for ax in (intermediate_plot(study, "knn_accuracy"), history_plot(study, "knn_accuracy")):
            assert len(_titles(ax)) == 1, _titles(ax)
            assert _titles(ax)[0].startswith("plots.screen: ")
            plt.close(ax.figure)


def _tiny_trial(tmp_path: Path):
    """A running trial with a one-epoch curve and the Run that trained it (contrastive)."""
    return tiny_trained_trial(
        tmp_path, "contrastive", train_subset=100, val_subset=30, latent_dim=16, projection_dim=16
    )


def test_learning_curves_are_drawn_after_the_hook_returns(tmp_path, monkeypatch):
    """The hook attaches the figure to the running trial and returns while the drawing is
    still held back; the trial finishes; the drawn figure then replaces the placeholder."""
    gate = threading.Event()
    drawn_on: list[threading.Thread] = []
    original = figures.learning_curves

    def held_back(curve, title):
        drawn_on.append(threading.current_thread())
        assert gate.wait(timeout=120), "never released"
        return original(curve, title)

    monkeypatch.setattr(figures, "learning_curves", held_back)
    study, trial, run = _tiny_trial(tmp_path)
    hook = make_trial_artifact_hook(tmp_path / "artifacts")
    hook(trial, run, None, {})
    # Returned with the drawing still waiting: it is not the trial's to wait for.
    assert not gate.is_set() and hook.renderer.pending == 1
    study.tell(trial, 0.5)
    finished = study.trials[0]
    assert finished.state == optuna.trial.TrialState.COMPLETE
    found = trial_artifacts(finished)
    assert set(found) == {"learning_curves.png"}  # recorded on the trial itself
    path = tmp_path / "artifacts" / found["learning_curves.png"]
    assert path.read_bytes() == placeholder_png()
    gate.set()
    assert hook.flush(timeout=120)
    assert drawn_on and drawn_on[0] is not threading.current_thread()
    png = path.read_bytes()
    assert png[:8] == PNG_MAGIC and png != placeholder_png()
    assert hook.renderer.drawn == 1 and not hook.renderer.failed
    assert finished.user_attrs["artifact_seconds"] > 0


def test_a_figure_that_cannot_be_drawn_leaves_a_note_not_a_failure(tmp_path, monkeypatch):
    def broken(curve, title):
        raise ValueError("no axes today")

    monkeypatch.setattr(figures, "learning_curves", broken)
    study, trial, run = _tiny_trial(tmp_path)
    hook = make_trial_artifact_hook(tmp_path / "artifacts")
    hook(trial, run, None, {})
    study.tell(trial, 0.5)
    assert hook.flush(timeout=120)
    assert hook.renderer.failed and "no axes today" in hook.renderer.failed[0]
    found = trial_artifacts(study.trials[0])
    png = (tmp_path / "artifacts" / found["learning_curves.png"]).read_bytes()
    assert png[:8] == PNG_MAGIC and png != placeholder_png()  # the error, drawn as a note
    assert "artifact_error" not in study.trials[0].user_attrs


def test_a_final_trials_learning_curves_join_the_promoted_pretraining_and_its_probe(
    tmp_path, monkeypatch
):
    """A final trial trains only the probe: its figure is the promoted configuration's
    pretraining (every leg, passed as ``source_curve``), then its own probe epochs."""
    drawn = []
    monkeypatch.setattr(figures, "learning_curves", lambda curve, title: drawn.append(curve))
    study, _, run = _tiny_trial(tmp_path)
    final = study.ask()
    final.set_user_attr("stage", "final")
    probe = {"phase": "probe", "epoch": 1, "epochs": 1, "train_loss": 0.4, "metrics": {}}
    final.set_user_attr(search.curve_attr("probe", 1), probe)
    source = [
        {"phase": "pretrain", "epoch": e, "epochs": 2, "train_loss": 1 / e, "metrics": {}}
        for e in (1, 2)
    ]
    trial_drawings(final, run, {"source_curve": source})["learning_curves.png"]()
    [curve] = drawn
    assert [(c["phase"], c["epoch"]) for c in curve] == [
        ("pretrain", 1), ("pretrain", 2), ("probe", 1),
    ]  # fmt: skip


@pytest.mark.slow
def test_every_trial_of_both_studies_has_its_drawn_learning_curves(finished):
    store = finished / "artifacts"
    checked = 0
    for name in STUDIES:
        for stage, study in _stage_studies(finished, name).items():
            for trial in study.get_trials():
                if trial.state != optuna.trial.TrialState.COMPLETE:
                    continue
                found = trial_artifacts(trial)
                assert "learning_curves.png" in found, (name, stage, trial.number)
                if name == "fid-autoencoder":
                    assert "val_reconstructions.png" in found
                if stage == "final":
                    assert "tsne.png" in found
                for artifact_id in found.values():
                    png = (store / artifact_id).read_bytes()
                    assert png[:8] == PNG_MAGIC and png != placeholder_png()
                assert not trial.user_attrs.get("artifact_error")
                checked += 1
    assert checked >= 6  # every stage of both studies
