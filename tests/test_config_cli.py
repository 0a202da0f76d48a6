"""Study files and overrides: every mistake exits 2 with one line naming the key, before storage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from search.config import ConfigError, available_studies, load_config
from search.space import apply, baseline_params

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.epoch=3", "train.epoch"),  # unknown key (typo)
        ("optimizer=adam", "optimizer"),  # unknown top-level key
        ("train.epochs=three", "train.epochs"),  # wrong type
        ("model.channels=1.5", "model.channels"),  # wrong type
        ("search.space.adam_lr.high=0.0003", "search.space.adam_lr"),  # empty range
        ("search.space.temperature.low=2.0", "search.space.temperature"),  # inverted range
        ("search.space.channels.choices=[]", "search.space.channels.choices"),  # empty choices
        ("train.optim.name=rmsprop", "train.optim.name"),  # unknown optimizer
        ("search.sampler.name=grid", "search.sampler.name"),  # unknown sampler
        ("search.pruner.name=patient", "search.pruner.name"),  # unknown pruner
        ("search.space.optimizer.choices=[adam,adamw]", "search.space.optimizer"),
        ("search.space.adam_lr.when.optimizer=[sgd,adamw]", "search.space.adam_lr.when.optimizer"),
        ("search.space.channels.target=model.width", "search.space.channels.target"),
        ("search.space.channels.choices=[wide]", "search.space.channels"),
        ("storage=mysql://root@127.0.0.1/test", "storage"),  # unsupported database
        ("storage=sqlite://", "storage"),  # in-memory: cannot be shared or resumed
        ("storage=nonsense", "storage"),  # unparsable
        ("data.name=imagenet", "data.name"),
        ("train.aug_strength=3", "train.aug_strength"),
        ("devices=gpu0", "devices"),
        ("stage=polish", "stage"),
    ],
)
def test_bad_override_exits_2_naming_the_key_and_writes_nothing(tmp_path, override, key):
    runs = tmp_path / "runs"
    result = cli("search.run", "study=quickstart", f"runs_dir={runs}", override, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {key}"), lines[0]
    assert not runs.exists()  # nothing was created, let alone written


def test_unknown_study_lists_the_known_ones(tmp_path):
    result = cli("search.run", "study=cifar_contrastiv", cwd=tmp_path)
    assert result.returncode == 2
    assert "study: unknown study 'cifar_contrastiv'" in result.stderr
    assert "cifar_contrastive" in result.stderr


def test_unreachable_postgres_exits_2_and_hides_the_password(tmp_path):
    url = "postgresql+psycopg://alice:s3cret@127.0.0.1:1/nowhere"
    result = cli(
        "search.run", "study=quickstart", f"storage={url}", f"runs_dir={tmp_path}/r", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "error: storage: cannot connect to" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert "***" in result.stderr


def test_bad_input_to_existing_study_leaves_it_intact(tmp_path):
    """A bad override on a second run must not touch what the first run stored."""
    runs = tmp_path / "runs"
    ok = cli(
        "search.run", "study=quickstart", f"runs_dir={runs}", "stage=screen",
        "stages.screen.trials=1", "stages.screen.epochs=1", "train.max_batches=2",
        "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    db = runs / "ssl-search.db"
    before = db.read_bytes()
    bad = cli("search.run", "study=quickstart", f"runs_dir={runs}", "train.epochs=-1", cwd=tmp_path)
    assert bad.returncode == 2 and "train.epochs" in bad.stderr
    assert db.read_bytes() == before


def test_study_accepts_a_user_yaml_path(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text((REPO / "studies" / "quickstart.yaml").read_text())
    cfg = load_config(str(own), ["stages.screen.trials=3"])
    assert cfg.name == "mine" and cfg.stages.screen.trials == 3
    with pytest.raises(ConfigError, match="study: no such study file"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("study", available_studies())
def test_every_study_passes_dry_run_without_touching_storage(tmp_path, study):
    result = cli(
        "search.run", f"study={study}", f"runs_dir={tmp_path}/runs", "--dry-run", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "# search space" in result.stdout and f"name: {study}" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("study", available_studies())
def test_study_defaults_are_its_baseline_trial(study):
    """The report's configuration is a point of the space, enqueued as the first trial."""
    cfg = load_config(study)
    params = baseline_params(cfg)
    top_level = [n for n, s in cfg.search.space.items() if not s.when]
    assert set(top_level) <= set(params), set(top_level) - set(params)
    assert OmegaConf.to_container(apply(cfg, params)) == OmegaConf.to_container(cfg)


def test_report_defaults_in_study_files():
    """Spot-check the report's settings (spec tables) in the study files."""
    c = load_config("cifar_contrastive")
    assert (c.train.batch_size, c.train.epochs, c.train.temperature) == (128, 200, 0.15)
    assert c.stages.promote.epochs == 100 and c.model.channels == 256
    m = load_config("mnist_contrastive")
    assert (m.train.batch_size, m.train.epochs, m.train.temperature) == (48, 100, 0.5)
    g = load_config("mnist_guided")
    assert (g.train.batch_size, g.train.epochs, g.train.optim.name) == (32, 10, "adam")
    a = load_config("cifar_autoencoder")
    assert list(a.model.decoder_kernels) == [5, 7, 7, 7] and a.train.probe.epochs == 20
    for name in (s for s in available_studies() if s != "quickstart"):
        cfg = load_config(name)
        assert cfg.search.pruner.name == "hyperband"
        space = {s.target for s in cfg.search.space.values()}
        assert {"model.channels", "train.optim.name", "train.optim.lr", "train.batch_size"} <= space
        assert {"model.encoder_kernels.0", "train.optim.weight_decay"} <= space
        if cfg.task == "contrastive":
            assert {"train.temperature", "train.aug_strength"} <= space
        if cfg.task == "autoencoder":
            assert "model.decoder_upsample" in space
