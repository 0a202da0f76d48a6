"""Guards that no other test exercised: each test here fails when its guard is removed.

- the final stage really scores the promoted encoder (``Run.load_pretrained`` loads weights);
- the last screen epoch is never pruned (the trial completes and can be promoted);
- Hyperband / successive halving get the configured ``min_resource`` and ``reduction_factor``;
- ``grace_period`` must exceed ``heartbeat_interval``;
- the config stored in the studies hides the storage password.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from conftest import run_module
from sqlalchemy.engine import make_url

from models.config import DataConfig, ModelConfig, ProbeConfig, TrainConfig
from models.data import load_splits
from models.training import Run
from search.config import ConfigError, load_config
from search.objective import TrialRunner
from search.stages import make_pruner, open_studies

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A screen trial on digits that takes about a second on a CPU core.
TINY = (
    "data.train_subset=192",
    "data.val_subset=64",
    "data.test_subset=64",
    "train.max_batches=2",
    "train.device=cpu",
    "train.knn_k=5",
    "search.space.channels.choices=[8]",
    "search.space.batch_size.choices=[32]",
    "model.latent_dim=16",
    "model.projection_dim=16",
)


# ---- 1. the final stage loads the promoted encoder -----------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_splits(DataConfig(name="digits", train_subset=192, val_subset=64, test_subset=64))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the state-dict entries that differ (all of them if the keys differ)."""
    if a.keys() != b.keys():
        return sorted(set(a) | set(b))
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("task", ["autoencoder", "guided", "contrastive"])
def test_load_pretrained_restores_the_trained_encoder(digits, tmp_path: Path, task: str) -> None:
    model = ModelConfig(channels=4, latent_dim=16, projection_dim=16)
    train = TrainConfig(
        epochs=2,
        batch_size=32,
        max_batches=2,
        progress=False,
        device="cpu",
        knn_k=5,
        probe=ProbeConfig(epochs=1, batch_size=32),
    )
    trained = Run(task, digits, model, train, checkpoint_dir=tmp_path / "source")
    trained.pretrain()
    assert (tmp_path / "source" / "pretrain.pt").is_file()

    fresh = Run(task, digits, model, train)  # same seed: the initial weights of `trained`
    loaded = Run(task, digits, model, train, checkpoint_dir=tmp_path / "final")
    loaded.load_pretrained(tmp_path / "source" / "pretrain.pt")

    for name, module in trained.pretrain_modules().items():
        want = _state(module)
        changed = _differing(_state(fresh.pretrain_modules()[name]), want)
        assert changed, f"{task}: training left the {name} at its initial weights"
        wrong = _differing(_state(loaded.pretrain_modules()[name]), want)
        assert not wrong, (
            f"{task}: load_pretrained did not restore the trained {name}: {len(wrong)} of "
            f"{len(want)} entries differ, e.g. {wrong[:3]}"
        )
    # What the final stage scores: the frozen encoder's latents (and for guided, its classifier).
    torch.testing.assert_close(
        loaded.embed(digits.val_x), trained.embed(digits.val_x), rtol=0, atol=0
    )
    assert not torch.equal(fresh.embed(digits.val_x), trained.embed(digits.val_x))
    if task == "guided":
        assert loaded.evaluate() == trained.evaluate()


def test_load_pretrained_without_checkpoint_is_an_error(digits, tmp_path: Path) -> None:
    train = TrainConfig(epochs=1, batch_size=32, max_batches=1, progress=False, device="cpu")
    run = Run("contrastive", digits, ModelConfig(channels=4, latent_dim=16), train)
    with pytest.raises(FileNotFoundError, match="pretrain checkpoint"):
        run.load_pretrained(tmp_path / "missing" / "pretrain.pt")


# ---- 2. the last screen epoch is never pruned ----------------------------------------------


class PruneAtStep(optuna.pruners.BasePruner):
    """Says "prune" exactly when the trial's last reported step is ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.asked: list[int] = []

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.asked.append(trial.last_step)
        return trial.last_step == self.step


@pytest.mark.parametrize(
    ("prune_at", "state", "epochs_run"),
    [(2, optuna.trial.TrialState.COMPLETE, 2), (1, optuna.trial.TrialState.PRUNED, 1)],
    ids=["last-epoch-completes", "earlier-epoch-prunes"],
)
@pytest.mark.slow
def test_screen_never_prunes_after_the_last_epoch(
    tmp_path: Path, prune_at: int, state: optuna.trial.TrialState, epochs_run: int
) -> None:
    cfg = load_config(
        "quickstart",
        [
            *TINY,
            "stages.screen.epochs=2",
            "search.pruner.name=hyperband",  # the previous pipeline's pruned screen
            f"runs_dir={tmp_path / 'runs'}",
        ],
    )
    pruner = PruneAtStep(prune_at)
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 's.db'}",
        study_name="guard.screen",
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=pruner,
    )
    study.optimize(TrialRunner(cfg, device="cpu", progress=False).screen, n_trials=1)
    (trial,) = study.get_trials()
    assert trial.state == state, (
        f"pruner says prune at step {prune_at} of 2; asked at steps {pruner.asked}; "
        f"trial ended {trial.state.name} ({trial.user_attrs.get('prune_reason')})"
    )
    assert trial.user_attrs["epochs_run"] == epochs_run
    assert sorted(trial.intermediate_values) == list(range(1, epochs_run + 1))
    if state == optuna.trial.TrialState.COMPLETE:
        assert trial.value == trial.intermediate_values[2]
        assert "prune_reason" not in trial.user_attrs
    else:
        assert trial.user_attrs["prune_reason"].startswith("pruned after epoch 1/2")


# ---- 3. the pruner gets the configured rungs ------------------------------------------------


def _rungs(min_resource: int, reduction_factor: int, epochs: int) -> set[int]:
    """Steps where successive halving compares trials: min_resource * rf**k (Hyperband's
    bracket s starts at rate s, i.e. at min_resource * rf**s, on the same grid)."""
    out, step = set(), min_resource
    while step <= epochs:
        out.add(step)
        step *= reduction_factor
    return out


def _prune_steps(pruner: optuna.pruners.BasePruner, epochs: int, n_trials: int = 60) -> Counter:
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0), pruner=pruner
    )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(1, epochs + 1):
            trial.report(x + 0.01 * step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x

    study.optimize(objective, n_trials=n_trials)
    return Counter(t.last_step for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)


# min_resource != reduction_factor somewhere, so swapping them changes the rungs too.
@pytest.mark.parametrize("name", ["hyperband", "successive_halving"])
@pytest.mark.parametrize(
    ("min_resource", "reduction_factor", "epochs"), [(2, 2, 8), (1, 3, 9), (2, 3, 18)]
)
def test_pruner_prunes_at_the_configured_rungs(
    name: str, min_resource: int, reduction_factor: int, epochs: int
) -> None:
    cfg = load_config(
        "quickstart",
        [
            f"search.pruner.name={name}",
            f"search.pruner.min_resource={min_resource}",
            f"search.pruner.reduction_factor={reduction_factor}",
            f"stages.screen.epochs={epochs}",
            f"stages.promote.epochs={epochs}",
        ],
    )
    steps = _prune_steps(make_pruner(cfg), epochs)
    expected = _rungs(min_resource, reduction_factor, epochs)
    assert set(steps) == expected, (
        f"{name} min_resource={min_resource} reduction_factor={reduction_factor}: pruned at "
        f"steps {dict(sorted(steps.items()))}, expected exactly the rungs {sorted(expected)}"
    )


# ---- 4. grace_period must exceed heartbeat_interval ----------------------------------------


@pytest.mark.parametrize("grace", [10, 5])
def test_grace_period_must_exceed_heartbeat_interval(grace: int) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", ["heartbeat_interval=10", f"grace_period={grace}"])
    message = str(caught.value)
    assert message.startswith("grace_period"), message
    assert "heartbeat_interval" in message and "\n" not in message
    load_config("quickstart", ["heartbeat_interval=10", "grace_period=11"])  # just above: fine


@pytest.mark.slow
def test_run_rejects_grace_period_below_heartbeat_before_writing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # Sized so that, were the check missing, the run would still end within seconds.
    done = run_module(
        "search.run",
        "study=quickstart",
        "grace_period=5",
        "heartbeat_interval=10",
        f"runs_dir={runs}",
        *TINY,
        "stage=screen",
        "stages.screen.trials=1",
        "stages.screen.epochs=1",
        "--no-progress",
        timeout=300,
    )
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: grace_period"), done.stderr
    assert not runs.exists()


# ---- 5. the stored study config hides the storage password ---------------------------------


@pytest.fixture
def postgres_db_with_password(postgres_db_url):
    """A fresh database (conftest's, dropped afterwards) as a URL carrying a password: the
    local server trusts local connections, so any password works."""
    url = make_url(postgres_db_url).set(password="s3cr3t-pw")
    yield url.database, url.render_as_string(hide_password=False)


@pytest.mark.postgres
def test_stored_config_hides_the_storage_password(postgres_db_with_password, tmp_path: Path):
    db, url = postgres_db_with_password
    cfg = load_config("quickstart", [f"storage={url}", f"runs_dir={tmp_path / 'runs'}"])
    assert cfg.storage == url
    open_studies(cfg, url)
    names = {f"{cfg.name}.{stage}" for stage in ("screen", "promote", "final")}
    summaries = optuna.get_all_study_summaries(storage=url, include_best_trial=False)
    assert {s.study_name for s in summaries} == names
    for name in sorted(names):
        config = optuna.load_study(study_name=name, storage=url).user_attrs["config"]
        assert "s3cr3t-pw" not in json.dumps(config), f"{name}: password in the stored config"
        assert config["storage"] == f"postgresql+psycopg://postgres:***@127.0.0.1:5432/{db}"
        assert config["name"] == cfg.name  # the rest is stored as resolved
    # Nowhere else either: no row of any table (attrs, claims, ...) holds the password.
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            tables = sqlalchemy.inspect(conn).get_table_names()
            assert "study_user_attributes" in tables
            for table in tables:
                rows = conn.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')).fetchall()
                assert "s3cr3t-pw" not in repr(rows), f"password stored in table {table}"
    finally:
        engine.dispose()


# ---- a metric that is not a number ---------------------------------------------------------


@pytest.mark.slow
def test_a_metric_that_is_not_a_number_fails_the_trial_as_diverged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration whose metric is NaN is a result (diverged, ranked last), not a fault:
    returned as is, Optuna would fail it without a reason, and a failure without a reason is
    retried as a dead worker's."""
    from search.naming import diverged

    monkeypatch.setattr(Run, "knn_accuracy", lambda self, features=None: float("nan"))
    cfg = load_config("quickstart", [*TINY, f"runs_dir={tmp_path / 'runs'}"])
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'nan.db'}", study_name="nan.screen", direction="maximize"
    )
    runner = TrialRunner(cfg, device="cpu", progress=False)
    study.optimize(runner.screen, n_trials=1, catch=(RuntimeError,))
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL
    assert diverged(trial.user_attrs), trial.user_attrs.get("fail_reason")
