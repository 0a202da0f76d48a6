"""Every worker of a study trains on the same images: the data's content digest.

A machine with torchvision's CIFAR-10 pickles and another with the JPEG copy (or another
``data.root`` of an image folder) would rank configurations on different validation images and
continue each other's checkpoints. The study records its first worker's
:attr:`models.data.ImageSplits.digest`; a worker whose images differ is refused in one line
before it takes a trial, and a checkpoint is resumed only on the images it was trained on.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import REPO_ROOT, assert_one_line_error, run_module

from models.data import content_digest, load_splits
from models.errors import DataError
from search.config import load_config, to_dataclasses
from search.naming import DATA_DIGEST_ATTR, run_fingerprint
from search.objective import TrialRunner
from search.stages import check_same_images, open_studies


def test_the_digest_is_the_images_not_where_they_were_read(
    tmp_path: Path, shared_data: Path
) -> None:
    """The real MNIST read from two places (another machine's mount, say) is the same images;
    one pixel, or another subset, is not."""
    elsewhere = tmp_path / "mount"
    (elsewhere / "MNIST").mkdir(parents=True)
    (elsewhere / "MNIST" / "raw").symlink_to(shared_data / "MNIST" / "raw")
    subset = ["data.train_subset=2000", "data.val_subset=500", "data.test_subset=500"]

    def mnist(root: Path, *more: str) -> object:
        cfg = load_config("mnist_guided", [f"data.root={root}", *subset, *more])
        return load_splits(to_dataclasses(cfg)[0])

    here, there = mnist(shared_data), mnist(elsewhere)
    assert here.digest == there.digest and len(here.digest) == 16
    assert mnist(shared_data, "data.split_seed=1").digest != here.digest
    cfg = load_config("quickstart", [f"runs_dir={tmp_path}"])
    first = load_splits(to_dataclasses(cfg)[0])
    pixel = first.val_x.clone()
    pixel.view(-1)[0] ^= 1  # one validation pixel off by one: other images
    images = (first.train_x, first.train_y, pixel, first.val_y, first.test_x, first.test_y)
    assert content_digest(*images) != first.digest
    subset = load_splits(to_dataclasses(load_config("quickstart", ["data.train_subset=100"]))[0])
    assert subset.digest != first.digest
    assert run_fingerprint(cfg, first.digest) != run_fingerprint(cfg, content_digest(*images))


def test_a_worker_with_other_images_is_refused_before_it_takes_a_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config("quickstart", [f"storage={url}", f"runs_dir={tmp_path}"])
    studies = open_studies(cfg, url)
    runner = TrialRunner(cfg, progress=False)
    check_same_images(studies, runner.splits)  # the first worker records its images
    assert studies.screen.user_attrs[DATA_DIGEST_ATTR] == runner.splits.digest
    check_same_images(open_studies(cfg, url), TrialRunner(cfg, progress=False).splits)  # same
    pixel = runner.splits.val_x.clone()
    pixel.view(-1)[0] ^= 1
    s = runner.splits
    other = dataclasses.replace(
        s,
        val_x=pixel,
        digest=content_digest(s.train_x, s.train_y, pixel, s.val_y, s.test_x, s.test_y),
    )
    with pytest.raises(DataError, match=r"^data\.root: this worker's images") as error:
        check_same_images(studies, other)
    assert other.digest in str(error.value) and runner.splits.digest in str(error.value)
    assert studies.screen.user_attrs[DATA_DIGEST_ATTR] == runner.splits.digest  # kept
    assert studies.screen.get_trials() == []  # nothing taken, failed or retried


def test_a_worker_refused_for_its_images_changes_nothing_in_the_study(tmp_path: Path) -> None:
    """Opening the study with other images and a larger budget raises before the run writes
    its budgets into the stored config or claims a sampler seed."""
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config("quickstart", [f"storage={url}", f"runs_dir={tmp_path}"])
    splits = TrialRunner(cfg, progress=False).splits
    studies = open_studies(cfg, url, splits=splits)  # the first worker records its images
    stored = [studies.of(stage).user_attrs["config"] for stage in ("screen", "promote", "final")]
    claims = sorted(studies.claims.taken(""))
    other = dataclasses.replace(splits, digest="0" * 16)
    bigger = load_config("quickstart", [f"storage={url}", f"runs_dir={tmp_path}",
                                        "stages.screen.trials=99"])  # fmt: skip
    with pytest.raises(DataError, match=r"^data\.root: this worker's images"):
        open_studies(bigger, url, splits=other)
    assert [studies.of(stage).user_attrs["config"] for stage in ("screen", "promote", "final")] == (
        stored
    )
    assert stored[0]["stages"]["screen"]["trials"] == 12
    assert sorted(studies.claims.taken("")) == claims  # no sampler seed taken either


def test_search_run_refuses_other_images_in_one_line(tmp_path: Path) -> None:
    """The real command, on a study whose recorded images are not the ones this machine has."""
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config("quickstart", [f"storage={url}", f"runs_dir={tmp_path}"])
    studies = open_studies(cfg, url)
    studies.screen.set_user_attr(DATA_DIGEST_ATTR, "0123456789abcdef")  # another machine's
    stored = studies.screen.user_attrs["config"]
    result = run_module(
        "search.run",
        "study=quickstart",
        f"storage={url}",
        f"runs_dir={tmp_path}",
        "stages.screen.trials=99",  # a budget the stored config would take on, were it run
    )
    line = assert_one_line_error(result, "data.root")
    assert "0123456789abcdef" in line and "same copy of the data" in line
    screen = optuna.load_study(study_name=studies.screen.study_name, storage=url)
    assert screen.get_trials() == []
    assert screen.user_attrs["config"] == stored  # refused before anything was written


def test_a_checkpoint_from_before_the_digest_is_resumed_and_a_strangers_is_not(
    tmp_path: Path,
) -> None:
    """Checkpoints written before the images' digest was part of their identity still resume
    (a study upgraded mid-way loses nothing); one written for other settings is refused."""
    import torch

    from search.naming import checkpoint_identity, standalone_run_relative

    args = ["study=quickstart", f"runs_dir={tmp_path}", "train.epochs=1", "train.max_batches=2",
            "train.probe.epochs=1"]  # fmt: skip
    first = run_module("search.train", *args)
    assert first.returncode == 0, first.stderr
    cfg = load_config("quickstart", args[1:])
    path = tmp_path / "checkpoints" / standalone_run_relative(cfg) / "pretrain.pt"
    state = torch.load(path, weights_only=True)
    digest = load_splits(to_dataclasses(cfg)[0]).digest
    assert state["identity"] == run_fingerprint(cfg, digest) != run_fingerprint(cfg)
    assert checkpoint_identity(cfg, digest, state["identity"]) == state["identity"]
    assert checkpoint_identity(cfg, digest, None) == state["identity"]

    def written_under(identity: str) -> None:
        for each in path.parent.glob("*.pt"):  # every checkpoint of the run's folder
            saved = torch.load(each, weights_only=True)
            saved["identity"] = identity
            torch.save(saved, each)

    written_under(run_fingerprint(cfg))  # as the previous version wrote them
    assert checkpoint_identity(cfg, digest, run_fingerprint(cfg)) == run_fingerprint(cfg)
    again = run_module("search.train", *args)
    assert again.returncode == 0, again.stderr
    assert "other settings" not in again.stdout + again.stderr

    written_under("0123456789abcdef")  # another configuration's
    refused = run_module("search.train", *args)
    line = assert_one_line_error(refused, "checkpoint")
    assert "written for other settings" in line and "--fresh" in line


_FIRST_WORKERS = """
import sys, types
from models.errors import DataError
from search.config import load_config
from search.stages import check_same_images, open_studies
url, runs, digest, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
studies = [
    open_studies(load_config("quickstart", [f"name={n}", f"storage={url}", f"runs_dir={runs}"]), url)
    for n in names
]
print("ready", flush=True)
sys.stdin.readline()  # all start together
for name, one in zip(names, studies):
    try:
        check_same_images(one, types.SimpleNamespace(digest=digest, source="test images"))
        print(name, "took", flush=True)
    except DataError:
        print(name, "refused", flush=True)
"""


@pytest.mark.slow
def test_first_workers_starting_together_agree_on_one_set_of_images(tmp_path: Path) -> None:
    """Four first workers, two with other images, start at once on each of six new studies:
    before, each wrote its digest and read one back, so one that read before another wrote
    went on with its own images; now the first images are a claim, and the others refused."""
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    names = [f"race{i}" for i in range(6)]
    configs = {n: load_config("quickstart", [f"name={n}", f"storage={url}"]) for n in names}
    for cfg in configs.values():
        open_studies(cfg, url)  # the schema and the studies, as search.run makes them first
    digests = ["a" * 16, "b" * 16] * 2
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_WORKERS, url, str(tmp_path), digest, *names],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for digest in digests
    ]
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready"
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    outcomes: dict[str, list[tuple[str, str]]] = {n: [] for n in names}
    for worker, digest in zip(workers, digests, strict=True):
        worker.stdin.close()
        for line in worker.stdout.read().splitlines():
            name, outcome = line.split()
            outcomes[name].append((outcome, digest))
        assert worker.wait(timeout=120) == 0
    for name, cfg in configs.items():
        recorded = open_studies(cfg, url).screen.user_attrs[DATA_DIGEST_ATTR]
        expected = sorted(("took" if d == recorded else "refused", d) for d in digests)
        assert sorted(outcomes[name]) == expected, (name, recorded, outcomes[name])
