"""Bad input is refused when the study is loaded, before anything is written.

Every numeric setting must be finite and within a stated range, the study name a plain word,
interpolations must resolve, overrides hold no control characters, every value a search space
can produce must pass the training code's rules, an ImageFolder path must exist, and a study
file that is not a mapping of settings is refused without quoting it. Most cases go through
:func:`search.config.load_config` in-process (fast); a handful run the real command, which must
exit 2 with one line and create no ``runs_dir``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_module
from conftest import assert_one_line_error as one_line_error
from omegaconf import OmegaConf

from search.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
UNSET = "SSL_SEARCH_TEST_UNSET_VARIABLE"
SECRET = "hunter2-s3cret-token-0042"

# (overrides, the key the one-line message starts with)
BAD_OVERRIDES = [
    # models: kernels, device
    (["model.encoder_kernels=[4,5,3]"], "model.encoder_kernels[0]"),  # even
    (["model.encoder_kernels=[5,5]"], "model.encoder_kernels"),  # digits' networks need 3
    (["model.encoder_kernels=[5,5,999]"], "model.encoder_kernels[2]"),  # larger than the image
    (["train.device=tpu"], "train.device"),
    (["train.device=cuda:99"], "train.device"),  # no CUDA here, or not a visible index
    # models: optimizer and loss
    (["train.optim.lr=inf"], "train.optim.lr"),
    (["train.optim.lr=nan"], "train.optim.lr"),
    (["train.optim.lr=0"], "train.optim.lr"),
    (["train.optim.lr=1e6"], "train.optim.lr"),
    (["train.probe.optim.lr=-inf"], "train.probe.optim.lr"),
    (["train.optim.momentum=-5"], "train.optim.momentum"),
    (["train.optim.momentum=1.0"], "train.optim.momentum"),
    (["train.probe.optim.momentum=2"], "train.probe.optim.momentum"),
    (["train.optim.weight_decay=inf"], "train.optim.weight_decay"),
    (["train.optim.weight_decay=-1e-4"], "train.optim.weight_decay"),
    (["train.optim.warmup_epochs=1000000000"], "train.optim.warmup_epochs"),
    (["train.temperature=inf"], "train.temperature"),
    # models: widths
    (["model.channels=1e26"], "model.channels"),
    (["model.channels=100000000000000000000000000"], "model.channels"),
    (["model.channels=4097"], "model.channels"),
    (["model.channels=0"], "model.channels"),
    (["model.latent_dim=100000"], "model.latent_dim"),
    (["model.projection_dim=0"], "model.projection_dim"),
    # models: seeds, epochs, batches, sizes
    (["train.seed=-1"], "train.seed"),
    (["train.seed=4294967296"], "train.seed"),  # 2**32
    (["data.split_seed=-1"], "data.split_seed"),
    (["train.epochs=0"], "train.epochs"),
    (["train.epochs=1000000"], "train.epochs"),
    (["train.batch_size=1"], "train.batch_size"),
    (["train.batch_size=10000000000"], "train.batch_size"),
    (["train.probe.epochs=1000000"], "train.probe.epochs"),
    (["train.probe.batch_size=1000000000"], "train.probe.batch_size"),
    (["train.knn_k=100000000000"], "train.knn_k"),
    (["data.train_subset=5"], "data.train_subset"),  # fewer images than kNN neighbours (10)
    (["train.knn_max_train=5"], "train.knn_max_train"),  # a memory bank smaller than that
    (["train.max_batches=-1"], "train.max_batches"),
    (["data.train_subset=1000000000000"], "data.train_subset"),
    # the search service's own settings
    (["workers=0"], "workers"),
    (["workers=100000"], "workers"),
    (["stages.screen.trials=10000000000"], "stages.screen.trials"),
    (["stages.promote.epochs=1000000"], "stages.promote.epochs"),
    (["search.sampler.n_startup_trials=-1"], "search.sampler.n_startup_trials"),
    (["search.pruner.reduction_factor=1000"], "search.pruner.reduction_factor"),
    (["heartbeat_interval=1000000000"], "heartbeat_interval"),
    (["grace_period=1000000000"], "grace_period"),
    (["max_retries=1000000"], "max_retries"),
    (["devices=0,99999"], "devices"),
    # where checkpoints go: a folder or a writable fsspec URL
    (["checkpoints_dir=nosuchproto://bucket/ckpt"], "checkpoints_dir"),
    (["checkpoints_dir=https://example.org/ckpt"], "checkpoints_dir"),
    (["checkpoints_dir=memory://"], "checkpoints_dir"),
    (["artifacts_dir=s3://bucket/figures"], "artifacts_dir"),  # not a folder named "s3:"
    (["runs_dir=gs://bucket/runs"], "runs_dir"),
    # a folder under a file: every trial would fail, each after it started
    ([f"checkpoints_dir={__file__}/ck"], "checkpoints_dir"),
    ([f"artifacts_dir={__file__}/a"], "artifacts_dir"),
    # the study name
    (["name=" + "a" * 300], "name"),
    (["name=" + "a" * 101], "name"),
    (["name=a/b"], "name"),
    (["name=..\\evil"], "name"),
    (["name=.."], "name"),
    (["name=.hidden"], "name"),
    (["name=a..b"], "name"),
    (["name=trailing."], "name"),
    (["name=with space"], "name"),
    (["name=caf\u00e9"], "name"),
    # interpolations
    ([f"name=${{oc.env:{UNSET}}}"], "name"),
    ([f"train.epochs=${{oc.env:{UNSET}}}"], "train.epochs"),
    (["name=${oc.decode:'[1,'}"], "name"),
    (["name=${no_such_resolver:x}"], "name"),
    (["train.epochs=${name}"], "train.epochs"),  # resolves to a string
    (["train.epochs=${train.no_such_key}"], "train.epochs"),
    (["train.epochs=${"], "train.epochs"),  # unparsable interpolation
    (["train.epochs=[1,"], "train.epochs"),  # unparsable value
    # control characters (keys and values)
    (["name=a\x01b"], "name"),
    (["train\x07.epochs=3"], "train\\x07.epochs"),
    (["train.epochs=3\x1b[31m"], "train.epochs"),
    (["description=left\u202eright"], "description"),
    (["description=two\nlines"], "description"),
    # search-space values go through the same rules as direct settings
    (["search.space.lars_lr.high=inf"], "search.space.lars_lr"),
    (["search.space.lars_lr.high=1000"], "search.space.lars_lr"),  # lr above its bound
    (["search.space.lars_lr.log=false", "search.space.lars_lr.low=0"], "search.space.lars_lr"),
    (["search.space.channels.choices=[8,100000]"], "search.space.channels"),
    (["search.space.batch_size.choices=[32,1]"], "search.space.batch_size"),
    (["search.space.k={target: model.encoder_kernels.0, choices: [5, 4]}"], "search.space.k"),
    (
        ["search.space.k={target: model.encoder_kernels.0, type: int, low: 3, high: 7}"],
        "search.space.k",
    ),  # 4 and 6 are in the range
    (["search.space.m={target: train.optim.momentum, low: 0.5, high: 1.0}"], "search.space.m"),
    (
        ["search.space.k={target: train.batch_size, type: int, low: 2, high: 100000000000}"],
        "search.space.k",
    ),
    (["search.space.c={target: model.channels, low: 8, high: 16}"], "search.space.c"),  # floats
    (
        ["search.space.c={target: model.channels, type: int, low: 8, high: 16, step: 0}"],
        "search.space.c.step",
    ),
    (
        ["search.space.a={target: train.aug_strength, low: 0.1, high: 1.0, step: .inf}"],
        "search.space.a.step",
    ),  # fmt: skip
    (
        ["search.space.k={target: model.encoder_kernels, choices: [[3,5,7]]}"],
        "search.space.k.choices",
    ),  # fmt: skip
    (["search.space.w={target: workers, choices: [1, 2]}"], "search.space.w.target"),
    (["search.space.n={target: name, choices: [a, b]}"], "search.space.n.target"),
    # settings the service sets for each trial itself: searched, they would be ignored
    (["search.space.d={target: data.train_subset, choices: [100, 200]}"], "search.space.d.target"),
    (["search.space.s={target: train.seed, choices: [1, 2]}"], "search.space.s.target"),
    (["search.space.e={target: train.epochs, choices: [2, 3]}"], "search.space.e.target"),
    (["search.space.v={target: train.device, choices: [cpu]}"], "search.space.v.target"),
    # settings that define the yardstick, the budget or only the final stage: never ranked
    (["search.space.k={target: train.knn_k, choices: [5, 20]}"], "search.space.k.target"),
    (["search.space.b={target: train.max_batches, choices: [5, 20]}"], "search.space.b.target"),
    (["search.space.p={target: train.probe.optim.lr, choices: [0.1]}"], "search.space.p.target"),
    (["search.space.a={target: train.amp, choices: [off, bf16]}"], "search.space.a.target"),
    # storage and checkpoints_dir URLs that would fail later, with a traceback or elsewhere
    (["storage=postgresql+pg8000://u:pw@h/db"], "storage"),  # its driver is not installed
    (["storage=postgresql+psycopg://u:p@ss@127.0.0.1:1/db"], "storage"),  # '@' unencoded
    (["checkpoints_dir=gs://my-bucket]/ckpt"], "checkpoints_dir"),  # urllib: "invalid IPv6"
    (["checkpoints_dir=ftp://user:pa/ss@127.0.0.1:1/ckpt"], "checkpoints_dir"),  # '/' unencoded
    # an ImageFolder that is not there
    (["data.name=imagefolder"], "data.path"),
    (["data.name=imagefolder", "data.path=/nonexistent/images"], "data.path"),
]


def assert_refused(overrides: list[str], key: str, study: str = "quickstart") -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(study, overrides)
    message = str(caught.value)
    assert message.startswith(key), message
    assert message[len(key)] in ":[", message  # the key itself, not a longer one
    assert "\n" not in message and message.isprintable(), repr(message)
    return message


@pytest.mark.parametrize("overrides,key", BAD_OVERRIDES, ids=lambda v: repr(v)[:60])
def test_bad_value_is_refused_at_load(monkeypatch, overrides, key):
    monkeypatch.delenv(UNSET, raising=False)
    assert_refused(overrides, key)


def test_messages_state_the_allowed_range():
    assert "[1, 256]" in assert_refused(["workers=100000"], "workers")
    assert "[0, 2**32)" in assert_refused(["train.seed=-1"], "train.seed")
    assert "[0, 1)" in assert_refused(["train.optim.momentum=-5"], "train.optim.momentum")
    assert "4096" in assert_refused(["model.channels=5000"], "model.channels")
    assert "(0, 100]" in assert_refused(["train.optim.lr=inf"], "train.optim.lr")
    name = assert_refused(["name=a/b"], "name")
    assert "letters, digits, '-', '_' or '.'" in name and "1-100" in name
    escaped = assert_refused(["train.epochs=3\x1b[31m"], "train.epochs")
    assert "\\x1b" in escaped and "\x1b" not in escaped  # shown escaped, never raw


def test_messages_say_what_a_setting_takes_in_the_projects_words():
    """OmegaConf's words ("Merge error: int is not a subclass of StagesConfig") become what the
    setting takes."""
    assert assert_refused(["train.batch_size=abc"], "train.batch_size").endswith(
        "must be an integer, got 'abc'"
    )
    assert "must be a number, got 'hot'" in assert_refused(
        ["train.temperature=hot"], "train.temperature"
    )
    assert "true or false, got 'maybe'" in assert_refused(
        ["stages.final.enabled=maybe"], "stages.final.enabled"
    )
    assert "must be a list, e.g. model.encoder_kernels=[" in assert_refused(
        ["model.encoder_kernels=5"], "model.encoder_kernels"
    )
    stages = assert_refused(["stages=3"], "stages")
    assert "a section, not a single value" in stages and "stages.screen.trials=..." in stages
    optim = assert_refused(["train.optim=adam"], "train.optim")
    assert "train.optim.name=..., train.optim.lr=..." in optim
    space = assert_refused(["search.space.channels=3"], "search.space.channels")
    assert "search.space.channels.target=..." in space
    assert "search.space.NAME.target=..." in assert_refused(["search.space=3"], "search.space")


def test_a_warm_up_must_end_before_the_shortest_schedule_it_opens():
    """The schedule would cut a longer warm-up to one epoch less without a word: written in the
    study it is refused, naming the schedule that is too short for it. A searched range may
    reach the long budget (its top values train alike, README "The schedule choice")."""
    key = "train.optim.warmup_epochs"
    long = assert_refused([f"{key}=9"], key)
    assert long.endswith("of 9 (the long budget, stages.promote.epochs); allowed: 0 to 8"), long
    assert load_config("quickstart", [f"{key}=8"]).train.optim.warmup_epochs == 8
    single = assert_refused([f"{key}=5", "train.epochs=5"], key)
    assert single.endswith("of 5 (train.epochs, as search.train trains it); allowed: 0 to 4")
    screen = assert_refused([f"{key}=3", "search.pruner.name=median"], key)
    assert screen.endswith("of 3 (stages.screen.epochs); allowed: 0 to 2"), screen
    load_config("quickstart", [f"{key}=3"])  # under rungs the screen's legs run the long schedule
    probe = assert_refused(
        ["train.probe.optim.warmup_epochs=15"], "train.probe.optim.warmup_epochs"
    )
    assert probe.endswith("of 15 (train.probe.epochs); allowed: 0 to 14"), probe
    load_config("quickstart", ["train.probe.optim.warmup_epochs=14"])
    load_config("quickstart", ["search.space.lars_warmup_epochs.high=12"])


def test_boundary_values_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv(UNSET.replace("UNSET", "SET"), "from-env")
    images = tmp_path / "images"
    (images / "train").mkdir(parents=True)
    (images / "test").mkdir()
    cfg = load_config(
        "quickstart",
        [
            "train.optim.momentum=0.0",
            "train.probe.optim.momentum=0.999",
            "train.optim.lr=100",
            "train.optim.weight_decay=0",
            f"train.seed={2**32 - 1}",
            "data.split_seed=0",
            "workers=256",
            "model.channels=4096",
            "train.epochs=10000",
            "name=" + "a" * 100,
            "search.space.lars_lr.high=100",
        ],
    )
    assert cfg.workers == 256 and cfg.train.seed == 2**32 - 1
    assert load_config("quickstart", ["name=ok.v1-x_2"]).name == "ok.v1-x_2"
    cfg = load_config(
        "quickstart",
        [
            f"name=${{oc.env:{UNSET.replace('UNSET', 'SET')}}}",
            "checkpoints_dir=${runs_dir}/ckpt",
            "data.name=imagefolder",
            f"data.path={images}",
            "search.space.k={target: model.encoder_kernels.0, type: int, low: 3, high: 7, step: 2}",
        ],
    )
    assert cfg.name == "from-env" and cfg.checkpoints_dir == "runs/ckpt"
    # Resolved once, at load: what is validated is what gets stored.
    assert "${" not in OmegaConf.to_yaml(cfg)


def test_an_interpolation_that_resolves_to_another_is_refused(monkeypatch):
    monkeypatch.setenv(UNSET.replace("UNSET", "NESTED"), "${oc.env:HOME}")
    assert_refused([f"name=${{oc.env:{UNSET.replace('UNSET', 'NESTED')}}}"], "name")


def test_a_password_holding_an_interpolation_is_refused_masked_with_how_to_write_it(monkeypatch):
    """A storage URL passed through the environment whose password holds ``${``: OmegaConf
    would read it as an interpolation, so it is refused in one line that masks the password
    and says how to write it; percent-encoded, the same password reaches the database."""
    from sqlalchemy import make_url

    name = UNSET.replace("UNSET", "DOLLAR_URL")
    monkeypatch.setenv(name, "postgresql+psycopg://me:pa${ss}wd@db/studies")
    message = assert_refused([f"storage=${{oc.env:{name}}}"], "storage")
    assert "pa${ss}wd" not in message and "ss}wd" not in message and "%24" in message
    monkeypatch.setenv(name, "postgresql+psycopg://me:pa%24{ss}wd@db/studies")
    cfg = load_config("quickstart", [f"storage=${{oc.env:{name}}}"])
    assert make_url(cfg.storage).password == "pa${ss}wd"


def test_image_folder_needs_train_and_test(tmp_path):
    (tmp_path / "train").mkdir()
    message = assert_refused(["data.name=imagefolder", f"data.path={tmp_path}"], "data.path")
    assert "test" in message


# ---- study files: refused without quoting them -----------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        (f"{SECRET}\nsecond line\n", "found a string"),  # a scalar document
        ("42\n", "found a number"),
        (f"- {SECRET}\n- b\n", "found a list"),
        (f"task: contrastive\nkey: [{SECRET},\n", "not valid YAML: syntax error at line 3"),
        (f"task: {SECRET}: nested\n", "not valid YAML: syntax error at line 1, column"),
        (f"a: !!python/object:os.system {SECRET}\n", "an unsupported !tag at line 1"),
        (f"{SECRET}: 1\n{SECRET}: 2\n", "a duplicate key at line 2"),
        (f"root:{SECRET}:20228:0:99999:7:::\n", "line 1: keys must be names"),  # /etc/shadow
        (f"user:x:{SECRET}:/home:/bin/sh\n", "found a string"),  # /etc/passwd
    ],
)
def test_study_file_that_is_not_settings_is_not_quoted(tmp_path, text, expected):
    study = tmp_path / "secret"  # any readable file, with or without .yaml
    study.write_text(text)
    message = assert_refused([], "study", study=str(study))
    assert expected in message, message
    assert SECRET not in message and "second line" not in message
    assert str(study) in message


def test_study_file_that_is_not_text(tmp_path):
    study = tmp_path / "binary.yaml"
    study.write_bytes(b"\xff\xfe" + SECRET.encode() + b"\x00\x01")
    message = assert_refused([], "study", study=str(study))
    assert "not UTF-8 text" in message and SECRET not in message


def test_empty_study_file_only_misses_its_task(tmp_path):
    for text in ("", "~\n", "# nothing\n"):
        study = tmp_path / "empty.yaml"
        study.write_text(text)
        assert_refused([], "task", study=str(study))


# ---- the real command: exit 2, one line, nothing created ------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != UNSET}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "search.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, key: str) -> str:
    line = one_line_error(result, key)
    assert line.isprintable(), repr(line)
    return line


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["train.optim.lr=inf"], "train.optim.lr"),
        (["train.seed=4294967296"], "train.seed"),
        (["workers=100000"], "workers"),
        ([f"name=${{oc.env:{UNSET}}}"], "name"),
        (["name=${oc.decode:'[1,'}"], "name"),
        (["train.epochs=3\x1b[31m"], "train.epochs"),
        (["data.name=imagefolder", "data.path=/nonexistent/images"], "data.path"),
        # A URL no one answers at (a refused port): probed before the study is written, not
        # found out by every configuration failing in turn.
        (["checkpoints_dir=ftp://127.0.0.1:1/ckpt"], "checkpoints_dir"),
    ],
    ids=lambda v: repr(v)[:40],
)
@pytest.mark.slow
def test_command_refuses_before_creating_anything(tmp_path, overrides, key):
    runs = tmp_path / "runs"
    result = cli("study=quickstart", f"runs_dir={runs}", *overrides, cwd=tmp_path)
    line = assert_one_line_error(result, key)
    assert "\x1b" not in result.stderr
    assert not runs.exists(), f"{runs} created although the input was refused: {line}"


@pytest.mark.slow
def test_command_does_not_print_a_secret_study_file(tmp_path):
    study = tmp_path / "shadow"
    study.write_text(f"{SECRET}\n")
    runs = tmp_path / "runs"
    result = cli(f"study={study}", f"runs_dir={runs}", cwd=tmp_path)
    assert_one_line_error(result, "study")
    assert "found a string" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert not runs.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.slow
def test_refused_value_leaves_the_study_name_usable(tmp_path):
    """Before the fix a bad value created the study with it; the fixed command then trained
    nothing ('no completed screen trial'). Now nothing is stored, and the good run trains."""
    runs = tmp_path / "runs"
    common = [f"runs_dir={runs}", "name=fixme", "stage=screen", "--no-progress"]
    bad = cli("study=quickstart", *common, "train.optim.lr=inf", cwd=tmp_path)
    assert_one_line_error(bad, "train.optim.lr")
    assert not runs.exists()
    good = cli(
        "study=quickstart", *common, "stages.screen.trials=1", "stages.screen.epochs=1",
        "train.max_batches=2", cwd=tmp_path,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "[fixme.screen] 1 complete" in good.stdout, good.stdout


def test_a_list_item_is_set_by_its_index_and_checked_like_the_list():
    """``model.encoder_kernels.0=5`` sets one item (a dotlist would make it a mapping, which
    does not merge into a list); a bad item or index is one line naming it."""
    cfg = load_config("quickstart", ["model.encoder_kernels.0=7", "model.encoder_kernels.2=5"])
    assert list(cfg.model.encoder_kernels)[0] == 7 and list(cfg.model.encoder_kernels)[2] == 5
    for item, words in [
        ("model.encoder_kernels.0=4", "odd"),
        ("model.encoder_kernels.0=abc", "must be an integer, got 'abc'"),
        ("model.encoder_kernels.9=5", "out of range"),
        ("model.encoder_kernels.x=5", "index"),
        ("model.encoder_kernels=null", None),
    ]:
        if words is None:  # an item of a list that is null: nothing to index into
            with pytest.raises(ConfigError, match=r"^model\.encoder_kernels\.0: cannot be set"):
                load_config("quickstart", [item, "model.encoder_kernels.0=5"])
            continue
        with pytest.raises(ConfigError) as caught:
            load_config("quickstart", [item])
        message = str(caught.value)
        assert message.startswith("model.encoder_kernels") and words in message, message
        assert "\n" not in message


@pytest.mark.slow
def test_a_worker_joins_only_a_study_that_exists_and_bad_data_writes_nothing(tmp_path):
    """A typo in ``name=`` or ``storage=`` used to make a new study that nobody watched, and a
    worker whose copy of the data was missing wrote the study before it failed, so the name was
    then refused as one 'made with other settings'. Both are one-line errors that write nothing;
    ``--create`` (several workers started at once on an empty database) still makes it."""
    from search.config import storage_url
    from search.stages import open_studies

    runs = tmp_path / "runs"

    def command(module: str, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        return subprocess.run(
            [sys.executable, "-m", module, "study=quickstart", f"runs_dir={runs}", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    assert "no database at" in assert_one_line_error(command("search.worker"), "storage")
    assert "no database at" in assert_one_line_error(command("search.dashboard"), "storage")
    assert not runs.exists()
    cfg = load_config("quickstart", [f"runs_dir={runs}"])
    storage = open_studies(cfg, storage_url(cfg)).screen._storage

    def names() -> list[str]:
        return sorted(s.study_name for s in storage.get_all_studies())

    before = names()
    line = assert_one_line_error(command("search.worker", "name=quickstrat"), "study")
    assert "no study 'quickstrat'" in line and "found: quickstart" in line and "--create" in line
    line = assert_one_line_error(command("search.dashboard", "name=quickstrat"), "study")
    assert "no study 'quickstrat'" in line and "every study" in line
    missing = ["name=wkbad", "data.name=mnist", f"data.root={tmp_path / 'nothing'}", "--create"]
    assert_one_line_error(command("search.worker", *missing), "data.root")
    assert names() == before
    assert not (runs / "artifacts").exists()  # its artifact folder is made by its first trial


@pytest.mark.parametrize(
    "override,says",
    [
        ("epochs=5", "epochs: Key 'epochs' not in 'StudyConfig'. Did you mean train.epochs or"),
        ("trials=4", "trials: Key 'trials' not in 'StudyConfig'. Did you mean stages.screen.trials?"),
        ("train.top_k=2", "train.top_k: Key 'top_k' not in 'TrainConfig'. Did you mean stages.promote.top_k?"),
        ("train.epoch=5", "train.epoch: Key 'epoch' not in 'TrainConfig'. Did you mean: 'epochs'?"),
        ("zzz=1", "zzz: Key 'zzz' not in 'StudyConfig'"),
    ],
)  # fmt: skip
def test_a_setting_given_in_the_wrong_section_is_pointed_to(override, says):
    with pytest.raises(ConfigError) as refused:
        load_config("quickstart", [override])
    assert str(refused.value).startswith(says), str(refused.value)
    assert override != "zzz=1" or "mean" not in str(refused.value)


@pytest.mark.postgres
def test_a_worker_on_a_mistyped_postgres_database_writes_nothing_there(tmp_path, postgres_db_url):
    """A PostgreSQL URL naming another (empty) database: the worker refuses in one line and
    leaves that database without Optuna's tables; ``--status`` and reports likewise."""
    import sqlalchemy

    for module, extra in (("search.worker", []), ("search.run", ["--status"])):
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        refused = subprocess.run(
            [sys.executable, "-m", module, "study=quickstart", f"storage={postgres_db_url}",
             f"runs_dir={tmp_path / 'runs'}", *extra],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        line = assert_one_line_error(refused, "storage")
        assert "no studies in" in line and "no Optuna tables" in line
    engine = sqlalchemy.create_engine(postgres_db_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


# ---- a search space that would not search what it says ---------------------------------------


@pytest.mark.parametrize(
    "overrides,key,says",
    [
        # a second parameter on temperature's setting: one of the two would do nothing
        (
            ["search.space.t2.target=train.temperature", "search.space.t2.low=0.2",
             "search.space.t2.high=0.9"],
            "search.space.t2.target", "also written by search.space.temperature",
        ),
        # a condition on a range never matches: the parameter would never be sampled
        (
            ["search.space.wd.target=train.optim.weight_decay", "search.space.wd.low=0.0",
             "search.space.wd.high=0.1", "search.space.wd.when.temperature=0.5"],
            "search.space.wd.when.temperature", "temperature is a range",
        ),
        (["search.space.adam_lr.when.optimizer=[]"], "search.space.adam_lr.when.optimizer",
         "empty"),
        # a choice twice weighs double (8 and "8" write the same setting)
        (["search.space.channels.choices=[8,8,16]"], "search.space.channels.choices",
         "given twice"),
        (['search.space.channels.choices=[8,"8"]'], "search.space.channels.choices",
         "given twice"),
        # a step that does not divide the range: its high end is never sampled
        (["search.space.lars_warmup_epochs.high=3", "search.space.lars_warmup_epochs.step=2"],
         "search.space.lars_warmup_epochs.step", "or high 2"),
        # the previous pipeline: a long run shorter than the screen, a median never pruning
        (["search.pruner.name=hyperband", "stages.promote.epochs=2"], "stages.promote.epochs",
         "shorter than the screen"),
        (["search.pruner.name=median", "search.pruner.min_resource=50"],
         "search.pruner.min_resource", "would never prune a screen of 3; allowed: 1 to 2"),
        # a list where a mapping belongs: OmegaConf's error named no key (or the wrong advice)
        (["search.space=[1]"], "search.space", "must be a section"),
        (["search.space.adam_lr.when=[optimizer]"], "search.space.adam_lr.when",
         "must be a mapping"),
        # nothing after the = : OmegaConf's words named a Python type
        (["name="], "name", "needs a value (a text), got nothing"),
        (["train.epochs="], "train.epochs", "needs a value (an integer), got nothing"),
        # a stage that would do nothing and say it succeeded
        (["stage=final", "stages.final.enabled=false"], "stage", "would run nothing"),
    ],
)  # fmt: skip
def test_settings_that_would_not_do_what_they_say_are_refused(overrides, key, says):
    message = assert_refused(overrides, key)
    assert says in message, message


def test_search_space_shared_targets_and_ranges_that_are_fine_pass():
    load_config("quickstart", ["search.space.lars_warmup_epochs.step=1"])  # divides 0..2
    # choices win over the file's range: the way to pin a parameter from the command line
    cfg = load_config("quickstart", ["search.space.adam_lr.choices=[0.003]"])
    assert list(cfg.search.space.adam_lr.choices) == [0.003]
    load_config("quickstart", ["search.pruner.name=median", "search.pruner.min_resource=2"])


def _with_section(text: str, header: str, replacement: str) -> str:
    """``text`` with the block that starts at line ``header`` (and its indented lines) replaced."""
    lines = text.splitlines()
    start = lines.index(header)
    indent = len(header) - len(header.lstrip())
    end = start + 1
    while end < len(lines) and (len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return "\n".join([*lines[:start], replacement, *lines[end:]]) + "\n"


@pytest.mark.parametrize(
    "header,replacement,key,says",
    [
        ("  space:", "  space:\n    - {target: model.channels, choices: [8]}", "search.space",
         "must be a section"),
        ("stages:", "stages: [1, 2]", "stages", "must be a section"),
        ("data: {name: digits}", "data: [digits]", "data", "must be a section"),
    ],
)  # fmt: skip
def test_a_study_file_with_a_list_for_a_section_names_the_key(
    tmp_path, header, replacement, key, says
):
    """Before: a traceback (TypeError, exit 1), or an error naming ``config``."""
    text = (REPO_ROOT / "studies" / "quickstart.yaml").read_text()
    study = tmp_path / "study.yaml"
    study.write_text(_with_section(text, header, replacement))
    message = assert_refused([], key, study=str(study))
    assert says in message, message
    study.write_text(text.replace("when: {optimizer: adam}", "when: [optimizer]", 1))
    message = assert_refused([], "search.space.adam_lr.when", study=str(study))
    assert "must be a mapping" in message, message


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("oom_half_batch=7", "oom_half_batch", "7"),
        ("stages.final.enabled=0", "stages.final.enabled", "0"),
        ("stages.final.enabled='1'", "stages.final.enabled", "'1'"),
        ("search.space.adam_lr.log=2.5e-3", "search.space.adam_lr.log", "0.0025"),
    ],
)
def test_a_number_for_true_or_false_is_refused(override, key, value):
    """OmegaConf reads any number as a boolean (``log: 7`` was true, ``enabled: 0`` false);
    a value meant for another setting hid that way."""
    assert assert_refused([override], key).endswith(f"must be true or false, got {value}")


def test_a_number_for_true_or_false_in_a_study_file_is_refused(tmp_path):
    text = (REPO_ROOT / "studies" / "quickstart.yaml").read_text()
    study = tmp_path / "study.yaml"
    study.write_text(text.replace("log: true", "log: 7", 1))
    assert "log: true" in text
    message = assert_refused([], "search.space.adam_lr.log", study=str(study))
    assert message.endswith("must be true or false, got 7"), message
    study.write_text(text.replace("log: true", "log: 'yes'", 1))
    assert load_config(str(study)).search.space.adam_lr.log is True  # a word is fine
    assert load_config(str(study), ["oom_half_batch=n"]).oom_half_batch is False


UNSET_STORAGE = f"storage=${{oc.env:{UNSET}}}"  # as the README passes a password


@pytest.mark.parametrize(
    "module,study,override,key",
    [
        ("search.report", "all", UNSET_STORAGE, "storage: cannot resolve its interpolation"),
        ("search.report", "in-storage", UNSET_STORAGE, "storage: cannot resolve its interpolation"),
        (
            "search.dashboard",
            "in-storage",
            UNSET_STORAGE,
            "storage: cannot resolve its interpolation",
        ),
        (
            "search.give_up",
            "in-storage",
            UNSET_STORAGE,
            "storage: cannot resolve its interpolation",
        ),
        ("search.report", "all", "storage=[1,", "storage: cannot parse"),
        ("search.dashboard", "in-storage", "data.root=[1,", "data.root: cannot parse"),
        ("search.report", "in-storage", "runs_dir=a\x01b", "runs_dir: control characters"),
    ],
)
def test_commands_that_read_a_study_in_storage_refuse_a_bad_override_in_one_line(
    tmp_path, module, study, override, key
):
    """With ``study=all`` or a name found only in storage, these commands once merged the
    overrides with no checks: an unset ``${oc.env:...}`` or an unclosed ``[`` ended in
    OmegaConf's or YAML's traceback. Nothing is written."""
    args = [f"study={study}", f"runs_dir={tmp_path}", override]
    if module == "search.dashboard":
        args.append("--print-command")
    if module == "search.give_up":
        args.append("configuration=0")
    assert_one_line_error(run_module(module, *args, timeout=180), key)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("label", ["a\nb", "", "tab\there"])
def test_a_worker_label_that_would_break_its_lines_is_refused(tmp_path, label):
    """The label starts every line the worker prints: a newline in it split each in two."""
    done = run_module("search.worker", "study=quickstart", f"runs_dir={tmp_path}", f"label={label}")
    line = assert_one_line_error(done, "label")
    assert "printable" in line
    assert list(tmp_path.iterdir()) == []


def test_a_value_yaml_reads_as_a_mapping_says_to_quote_it():
    """``storage=sqlite:///:memory:`` ends in ':', so YAML reads a mapping; the message once
    guessed a section (``did you mean stages?``)."""
    with pytest.raises(ConfigError) as refused:
        load_config("quickstart", ["storage=sqlite:///:memory:"])
    assert str(refused.value).startswith("storage: expected a single value, got a mapping")
    assert "quote the value" in str(refused.value) and "stages" not in str(refused.value)
    with pytest.raises(ConfigError, match="in-memory SQLite database cannot be shared"):
        load_config("quickstart", ['storage="sqlite:///:memory:"'])  # quoted: read as a URL
