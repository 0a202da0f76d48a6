"""A study keeps the settings it was made with: a later run that would train its trials
differently is refused (one line, exit 2) before anything is written; where and how it runs, and
its budgets, may change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from search.config import ConfigError, changed_settings, load_config, public_config, storage_url
from search.stages import open_studies

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, *overrides: str):
    return load_config("quickstart", [f"runs_dir={tmp_path / 'runs'}", *overrides])


def _stored(url: str, name: str = "quickstart") -> dict:
    return optuna.load_study(study_name=f"{name}.screen", storage=url).user_attrs["config"]


def test_a_rerun_that_trains_differently_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    first = _config(tmp_path)
    url = storage_url(first)
    studies = open_studies(first, url)
    studies.screen.enqueue_trial({"channels": 8})
    before = _stored(url)

    changed = _config(tmp_path, "model.channels=8", "search.space.temperature.low=0.2")
    with pytest.raises(ConfigError) as caught:
        open_studies(changed, url)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("model.channels: study 'quickstart' in sqlite:///")
    assert "model.channels 16 -> 8" in message
    assert "search.space.temperature.low 0.1 -> 0.2" in message
    assert "name=quickstart-2" in message
    # Nothing written: the stored settings and the queued trial are as they were.
    assert _stored(url) == before
    assert len(optuna.load_study(study_name="quickstart.screen", storage=url).trials) == 1

    # The same settings again, or a new name, are accepted.
    open_studies(_config(tmp_path), url)
    open_studies(_config(tmp_path, "model.channels=8", "name=quickstart-2"), url)


def test_budgets_and_places_may_change_and_the_budgets_are_stored(tmp_path: Path) -> None:
    """The stored config is the creator's with each later run's budgets: a worker elsewhere,
    with its own folders and device count, leaves the locations as the creator set them."""
    first = _config(tmp_path)
    url = storage_url(first)
    open_studies(first, url)
    later = _config(
        tmp_path,
        "stages.screen.trials=20",
        "stages.promote.top_k=3",
        "workers=2",
        "devices=cpu",
        "train.progress=false",
        "max_retries=5",
        "search.sampler.name=random",
        f"checkpoints_dir={tmp_path / 'shared-checkpoints'}",
    )
    open_studies(later, url)
    for stage in ("screen", "promote", "final"):
        stored = optuna.load_study(study_name=f"quickstart.{stage}", storage=url).user_attrs
        config = stored["config"]
        assert config["stages"]["screen"]["trials"] == 20, stage
        assert config["stages"]["promote"]["top_k"] == 3
        assert config["search"]["sampler"]["name"] == "random"
        assert config["workers"] == 1 and config["max_retries"] == 3  # the creator's
        assert config["checkpoints_dir"] == ""
        assert stored["stage"] == stage


def test_settings_one_side_lacks_count_as_their_defaults() -> None:
    cfg = load_config("quickstart")
    assert changed_settings(_plain(cfg), cfg) == []
    # A study made before ``train.amp`` and ``data.split_seed`` existed: at their defaults.
    older = _plain(cfg)
    del older["train"]["amp"], older["data"]["split_seed"]
    assert changed_settings(older, cfg) == []
    # ... but not when this run sets one away from its default.
    assert changed_settings(older, load_config("quickstart", ["data.split_seed=3"])) == [
        ("data.split_seed", 0, 3)
    ]


def test_a_parameter_added_to_or_removed_from_the_space_is_a_change() -> None:
    cfg = load_config("quickstart")
    fewer = _plain(cfg)
    del fewer["search"]["space"]["temperature"]
    ((key, before, after),) = changed_settings(fewer, cfg)
    assert (key, repr(before), after) == ("search.space.temperature", "unset", "searched")
    more = _plain(cfg)
    more["search"]["space"]["momentum"] = {"target": "train.optim.momentum", "low": 0.5, "high": 1}
    assert [key for key, _, _ in changed_settings(more, cfg)] == ["search.space.momentum"]
    # A parameter stored without the fields added since counts them at their defaults.
    terse = _plain(cfg)
    del terse["search"]["space"]["temperature"]["when"], terse["search"]["space"]["channels"]["log"]
    assert changed_settings(terse, cfg) == []


def _plain(cfg) -> dict:
    """The config as the study stores it."""
    return json.loads(json.dumps(public_config(cfg)))


def test_the_cli_refuses_a_changed_study_in_one_line_with_exit_2(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    open_studies(_config(tmp_path), storage_url(_config(tmp_path)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "search.run",
            "study=quickstart",
            f"runs_dir={runs}",
            "model.channels=8",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.channels: study 'quickstart'")
    assert "model.channels 16 -> 8" in lines[0]


def test_train_epochs_counts_only_where_it_is_the_long_budget() -> None:
    """Each trial's epochs are its stage's: ``train.epochs`` changes what trials compute only
    when ``stages.promote.epochs`` is 0 and it is the long budget."""
    cfg = load_config("quickstart")  # stages.promote.epochs: 9
    assert changed_settings(_plain(cfg), load_config("quickstart", ["train.epochs=30"])) == []
    zero = load_config("quickstart", ["stages.promote.epochs=0"])
    changed = load_config("quickstart", ["stages.promote.epochs=0", "train.epochs=12"])
    assert changed_settings(_plain(zero), changed) == [("train.epochs", 9, 12)]
