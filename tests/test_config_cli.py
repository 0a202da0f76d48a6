"""Study files and overrides: every mistake exits 2 with one line naming the key, before storage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART_SETTINGS, assert_one_line_error

from search.config import ConfigError, available_studies, load_config, public_config
from search.naming import rung_ladder
from search.space import baseline_params, suggest
from search.stages import open_studies

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
        ("checkpoints_dir=nosuchproto://bucket/ckpt", "checkpoints_dir"),  # no such backend
        ("data.name=imagenet", "data.name"),
        ("train.aug_strength=3", "train.aug_strength"),
        ("devices=gpu0", "devices"),
        ("stage=polish", "stage"),
        # budgets that do not nest: first rung <= screen epochs <= long budget
        ("search.pruner.min_resource=100", "search.pruner.min_resource"),  # past the long budget
        ("search.pruner.min_resource=9", "search.pruner.min_resource"),  # one rung: no ladder
        ("search.pruner.min_resource=4", "search.pruner.min_resource"),  # past the screen
        ("stages.promote.epochs=2", "stages.screen.epochs"),  # screen longer than the long run
        ("stages.promote.epochs=1", "stages.promote.epochs"),  # no room for two rungs
        # rules owned by the training code (models/), checked when the study is loaded
        ("task=jigsaw", "task"),
        ("model.encoder_kernels=[4,5,3]", "model.encoder_kernels"),  # even kernel
        ("model.encoder_kernels=[5,5]", "model.encoder_kernels"),  # digits' networks need 3
        ("model.decoder_upsample=bicubic", "model.decoder_upsample"),
        ("train.temperature=0", "train.temperature"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("train.aug_strength=5", "train.aug_strength"),
        ("train.probe.optim.lr=0", "train.probe.optim.lr"),
        ("train.device=tpu", "train.device"),
        (
            "search.space.kernel={target: model.encoder_kernels.0, choices: [5, 4]}",
            "search.space.kernel",
        ),  # fmt: skip
        ("search.space.optimizer.when={adam_lr: 0.001}", "search.space.optimizer.when"),  # cycle
    ],
)
@pytest.mark.slow
def test_bad_override_exits_2_naming_the_key_and_writes_nothing(tmp_path, override, key):
    runs = tmp_path / "runs"
    result = cli("search.run", "study=quickstart", f"runs_dir={runs}", override, cwd=tmp_path)
    assert_one_line_error(result, key)
    assert not runs.exists()  # nothing was created, let alone written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.slow
def test_cuda_device_without_cuda_exits_2(tmp_path):
    runs = tmp_path / "runs"
    result = cli(
        "search.run", "study=quickstart", f"runs_dir={runs}", "train.device=cuda", cwd=tmp_path
    )
    assert_one_line_error(result, "train.device")
    assert "no CUDA device" in result.stderr
    assert not runs.exists()


def test_cuda_device_index_must_be_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_config("quickstart", ["train.device=cuda:1"]).train.device == "cuda:1"
    with pytest.raises(
        ConfigError,
        match=r"^train\.device: 'cuda:2' is not a visible CUDA device; allowed: .*cuda:0, cuda:1$",
    ):
        load_config("quickstart", ["train.device=cuda:2"])
    with pytest.raises(ConfigError, match=r"^train\.device: unknown device 'cuda:x'"):
        load_config("quickstart", ["train.device=cuda:x"])


@pytest.mark.slow
def test_circular_when_in_a_study_file_exits_2(tmp_path):
    """A cycle of ``when`` (a -> b -> c -> a) fails validation; --dry-run prints no traceback."""
    text = (REPO / "studies" / "quickstart.yaml").read_text()
    for spec, when in (
        ("channels: {target: model.channels, choices: [8, 16]", "aug_strength: 1.0"),
        ("batch_size: {target: train.batch_size, choices: [32, 64, 128]", "channels: 8"),
        ("aug_strength: {target: train.aug_strength, low: 0.25, high: 1.5", "batch_size: 32"),
    ):
        assert f"{spec}}}" in text
        text = text.replace(f"{spec}}}", f"{spec}, when: {{{when}}}}}")
    assert text.count("when: {") == 9  # the three above and quickstart's own six
    study = tmp_path / "cycle.yaml"
    study.write_text(text)
    runs = tmp_path / "runs"
    for extra in ([], ["--dry-run"]):
        result = cli("search.run", f"study={study}", f"runs_dir={runs}", *extra, cwd=tmp_path)
        assert_one_line_error(result, "search.space.channels.when: circular")
        assert "channels -> aug_strength -> batch_size -> channels" in result.stderr
    assert not runs.exists()
    with pytest.raises(ConfigError, match=r"^search\.space\.channels\.when: circular"):
        load_config(str(study))


@pytest.mark.slow
def test_unknown_study_lists_the_known_ones(tmp_path):
    result = cli("search.run", "study=cifar_contrastiv", cwd=tmp_path)
    assert result.returncode == 2
    assert "study: unknown study 'cifar_contrastiv'" in result.stderr
    assert "cifar_contrastive" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "url,says",
    [
        # nothing listens at port 1: a mistyped port as likely as a restart
        ("postgresql+psycopg://alice:s3cret@127.0.0.1:1/nowhere", "check the host and port"),
        # the server answers and refuses the login (an unknown role)
        pytest.param(
            "postgresql+psycopg://alice:s3cret@127.0.0.1:5432/nowhere",
            "alice",
            marks=pytest.mark.postgres,
        ),
    ],
    ids=["refused", "login-refused"],
)
def test_unreachable_postgres_exits_2_and_hides_the_password(tmp_path, url, says):
    result = cli(
        "search.run", "study=quickstart", f"storage={url}", f"runs_dir={tmp_path}/r", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "error: storage: cannot connect to" in result.stderr and says in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert "***" in result.stderr


@pytest.mark.slow
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
@pytest.mark.slow
def test_every_study_passes_dry_run_without_touching_storage(tmp_path, study):
    result = cli(
        "search.run", f"study={study}", f"runs_dir={tmp_path}/runs", "--dry-run", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "# search space" in result.stdout and f"name: {study}" in result.stdout
    assert not (tmp_path / "runs").exists()
    # What it prints is a study file of the same study (the storage shown resolved).
    printed = tmp_path / f"{study}.yaml"
    printed.write_text(
        "".join(f"{line}\n" for line in result.stdout.splitlines() if line[:1] != "#")
    )
    again, original = (
        public_config(load_config(s, [f"runs_dir={tmp_path}/runs"])) for s in (str(printed), study)
    )
    assert {k: v for k, v in again.items() if k != "storage"} == {
        k: v for k, v in original.items() if k != "storage"
    }
    assert "type: float\n      low: null" not in result.stdout  # no unused schema fields


@pytest.mark.parametrize("study", available_studies())
def test_study_defaults_are_in_its_space(study):
    """The report's configuration is a point of the space: every unconditional parameter has
    a baseline value."""
    cfg = load_config(study)
    params = baseline_params(cfg)
    top_level = [n for n, s in cfg.search.space.items() if not s.when]
    assert set(top_level) <= set(params), set(top_level) - set(params)


# The settings written in the study files, as parameters of their spaces (copied by hand from
# the YAML, not computed): conditional parameters of other optimizers are inactive, and
# sgd_schedule/lars_schedule are left out as they are.
STUDY_SETTINGS = {
    "quickstart": QUICKSTART_SETTINGS,
    "cifar_contrastive": {
        "encoder_kernel_1": 7,
        "encoder_kernel_2": 7,
        "encoder_kernel_3": 5,
        "channels": 256,
        "encoder_dropout": 0.0,
        "batch_size": 128,
        "optimizer": "adam",
        "adam_lr": 1.0e-3,
        "weight_decay": 0.0,
        "temperature": 0.15,
        "aug_strength": 1.0,
    },
}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
@pytest.mark.parametrize("study", sorted(STUDY_SETTINGS))
def test_first_screen_trial_is_the_study_files_settings(tmp_path, study):
    """The screen enqueues the study's own settings; its first trial samples exactly them."""
    cfg = load_config(study)
    studies = open_studies(cfg, f"sqlite:///{tmp_path / 'db.sqlite'}")
    studies.screen.enqueue_trial(  # as search.stages.run_screen does
        baseline_params(cfg), user_attrs={"baseline": "report"}, skip_if_exists=True
    )
    trial = studies.screen.ask()
    assert suggest(trial, cfg.search.space) == STUDY_SETTINGS[study]
    assert trial.params == STUDY_SETTINGS[study]


@pytest.mark.slow
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
        assert cfg.search.pruner.name == "asha"  # rungs over the whole budget
        assert 1 <= cfg.search.pruner.min_resource < cfg.stages.promote.epochs
        space = {s.target for s in cfg.search.space.values()}
        assert {"model.channels", "train.optim.name", "train.optim.lr", "train.batch_size"} <= space
        assert {"model.encoder_kernels.0", "train.optim.weight_decay"} <= space
        if cfg.task == "contrastive":
            assert {"train.temperature", "train.aug_strength"} <= space
        if cfg.task == "autoencoder":
            assert "model.decoder_upsample" in space


def test_readme_study_table_matches_the_study_files():
    """The README's table of studies states each file's budget: configurations, rungs, top_k."""
    section = (REPO / "README.md").read_text().split("\n## Studies\n")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[-1]
    assert set(rows) == set(available_studies())
    for name, budget in rows.items():
        cfg = load_config(name)
        ladder = ", ".join(str(r) for r in rung_ladder(cfg))
        expected = f"{cfg.stages.screen.trials}; {ladder}; top {cfg.stages.promote.top_k}"
        assert budget == expected, name


def test_a_section_under_a_plain_settings_name_is_one_line_naming_the_section(tmp_path):
    study = tmp_path / "typo.yaml"  # 'stage:' (the stage to run) written for 'stages:'
    study.write_text("task: contrastive\ndata: {name: digits}\nstage:\n  screen: {trials: 2}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(study))
    assert str(caught.value) == (
        "stage: expected a single value, got a mapping; did you mean stages?"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,key",
    [
        (["study=mnist_guided", "data.root=/nonexistent"], "data.root: MNIST not found"),
        (["study=quickstart", "devices=0"], "devices: 'cuda:0' asks for CUDA"),
        (["study=quickstart", "workers=2", "devices=0,1"], "devices: '0,1' asks for GPUs"),
    ],
)
def test_what_only_this_machine_can_tell_is_checked_before_anything_is_written(tmp_path, args, key):
    """Missing data or absent GPUs: one line, exit 2, no database, no folders."""
    if "devices=0" in args[-1] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    runs = tmp_path / "runs"
    result = cli("search.run", *args, f"runs_dir={runs}", cwd=tmp_path)
    assert_one_line_error(result, key)
    assert not runs.exists()


def test_output_piped_into_a_reader_that_stopped_is_not_a_traceback():
    """``python -m search.run study=quickstart --dry-run | head -2``: the reader closes the pipe
    early; the command stops quietly, as a process killed by SIGPIPE would (exit 141)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.run", "study=quickstart", "--dry-run"],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # before the command writes anything
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert stderr == ""


def test_the_storage_gone_is_one_line_and_another_broken_pipe_is_not_hidden(capsys):
    """Every command: a database that stays away past the retry bound is one line (exit 1,
    not a usage error); a broken pipe that is not the closed standard output (a socket reset
    during an upload, say) keeps its traceback."""
    from search.cli import guarded
    from search.database import StorageUnavailableError

    @guarded
    def storage_gone() -> int:
        raise StorageUnavailableError("storage sqlite:///x.db: get_trials failed for 60 s: locked")

    with pytest.raises(SystemExit) as stopped:
        storage_gone()
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        "error: storage sqlite:///x.db: get_trials failed for 60 s: locked; run the same "
        "command again once it is back\n"
    )

    @guarded
    def socket_reset() -> int:
        raise BrokenPipeError("upload: connection reset")

    with pytest.raises(BrokenPipeError):
        socket_reset()


@pytest.mark.parametrize(
    "command,option",
    [
        ("search.report", ["--out", "report-here"]),
        ("search.dashboard", ["--print-command"]),
        ("search.give_up", []),
        ("search.run", ["--status"]),
    ],
)
def test_key_value_arguments_may_follow_an_option(tmp_path, command, option):
    """``python -m search.report study=quickstart --out x runs_dir=y``: every command reads
    ``runs_dir=`` after its options as before them (argparse alone would refuse it)."""
    runs = tmp_path / "elsewhere"
    extra = ["configuration=1"] if command == "search.give_up" else []
    result = cli(command, "study=quickstart", *option, f"runs_dir={runs}", *extra, cwd=tmp_path)
    assert "unrecognized arguments" not in result.stderr, result.stderr
    assert str(runs) in result.stdout + result.stderr, (result.stdout, result.stderr)


@pytest.mark.parametrize("database", [False, True])
def test_stage_final_of_a_study_that_never_ran_writes_nothing(tmp_path, database):
    """``stage=final`` evaluates a search that ran: on a new name (a typo) it is one line,
    exit 2, and the database, if there is one, is left as it was (no empty studies)."""
    runs = tmp_path / "runs"
    db = runs / "ssl-search.db"
    if database:
        runs.mkdir()
        import optuna

        optuna.create_study(storage=f"sqlite:///{db}", study_name="other.screen")
        before = db.read_bytes()
    result = cli(
        "search.run",
        "study=quickstart",
        "name=typo",
        "stage=final",
        f"runs_dir={runs}",
        cwd=tmp_path,
    )
    line = assert_one_line_error(result, "storage" if not database else "study")
    if database:
        assert "'typo'" in line and "found: other" in line and "stage=final" in line
        assert db.read_bytes() == before
    else:
        assert not runs.exists()


def test_ctrl_c_before_a_command_set_up_its_own_handling_is_one_line(capsys):
    """Ctrl-C while a command still loads its settings, data or imports (search.run handles
    it only once its study is open) once printed a traceback through whatever was loading."""
    from search.cli import guarded

    def loading() -> int:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        guarded(loading)()
    assert stopped.value.code == 130  # 128 + SIGINT, as the shell reports it
    assert capsys.readouterr().err.splitlines() == [
        "interrupted; run the same command again to go on"
    ]


def test_a_study_file_read_only_for_its_locations_names_itself_before_resolving(tmp_path):
    """``runs_dir: runs/${name}`` in a study file without a name: load_config names the study
    after its file first; load_locations (--status, report, dashboard) must do the same."""
    from search.config import load_locations

    study = tmp_path / "interp.yaml"
    study.write_text(f"task: guided\ndata: {{name: digits}}\nruns_dir: {tmp_path}/runs/${{name}}\n")
    for cfg in (load_config(str(study)), load_locations(str(study))):
        assert cfg.name == "interp" and cfg.runs_dir == f"{tmp_path}/runs/interp"
    assert load_locations(str(study), ["name=other"]).runs_dir == f"{tmp_path}/runs/other"
