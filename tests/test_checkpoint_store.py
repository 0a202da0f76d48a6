"""Checkpoints every worker can reach: ``checkpoints_dir`` as a folder or an fsspec URL.

Real fsspec filesystems throughout: ``memory://`` for the store's own rules (one bucket per
test), ``file://`` for the workers, which run as real processes with caches of their own.
"""

from __future__ import annotations

import importlib.util
import shutil
import uuid
from pathlib import Path, PurePosixPath

import optuna
import pytest
import torch
from conftest import run_module
from optuna.trial import TrialState
from test_rungs import REAL_RUN  # six configurations at rung 1, one continued to rung 3

from search.config import ConfigError, checkpoint_store, load_config, resolved_paths
from search.stages import long_budget_trials, open_studies
from storage.checkpoint_store import (
    CheckpointLocationError,
    CheckpointStore,
    CheckpointTransferError,
    check_location,
    probe_location,
    redact_location,
)

RELATIVE = "quickstart.screen-0123456789ab/trial-00004"


@pytest.fixture
def bucket() -> str:
    """A ``memory://`` location of its own (the memory filesystem is one per process)."""
    return f"memory://test-{uuid.uuid4().hex[:12]}/checkpoints"


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_folder_is_used_as_it_is(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    assert not store.remote
    assert store.local(RELATIVE) == tmp_path / "ckpt" / RELATIVE
    assert store.pull(RELATIVE) == []
    store.push(write(store.local(RELATIVE) / "pretrain.pt", b"x"))  # nothing to copy
    assert store.where(RELATIVE, "pretrain.pt") == str(tmp_path / "ckpt" / RELATIVE / "pretrain.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no cache, no copies


def test_a_pushed_file_is_pulled_into_another_cache(tmp_path: Path, bucket: str) -> None:
    writer = CheckpointStore(bucket, cache=tmp_path / "a")
    reader = CheckpointStore(bucket, cache=tmp_path / "b")
    assert writer.pull(RELATIVE) == [] and not (tmp_path / "a").exists()  # nothing there yet
    writer.push(write(writer.local(RELATIVE) / "pretrain.pt", b"epoch 1"))
    # In place under its name, no temporary upload left beside it.
    remote = f"{bucket}/{RELATIVE}"
    assert [Path(p).name for p in writer.fs.ls(remote, detail=False)] == ["pretrain.pt"]
    assert writer.fs.cat_file(f"{remote}/pretrain.pt") == b"epoch 1"

    assert reader.pull(RELATIVE) == [reader.local(RELATIVE) / "pretrain.pt"]
    assert (reader.local(RELATIVE) / "pretrain.pt").read_bytes() == b"epoch 1"
    assert reader.pull(RELATIVE) == []  # unchanged: not fetched again
    # Another worker continues the configuration: the next pull brings its checkpoint.
    reader.push(write(reader.local(RELATIVE) / "pretrain.pt", b"epoch 3"))
    reader.push(write(reader.local(RELATIVE) / "pretrain-best.pt", b"best"))
    fetched = writer.pull(RELATIVE)
    assert sorted(p.name for p in fetched) == ["pretrain-best.pt", "pretrain.pt"]
    assert (writer.local(RELATIVE) / "pretrain.pt").read_bytes() == b"epoch 3"
    assert writer.pull(RELATIVE) == []


def test_a_cached_file_is_kept_only_while_it_is_the_stores_version(
    tmp_path: Path, bucket: str
) -> None:
    store = CheckpointStore(bucket, cache=tmp_path / "a")
    path = write(store.local(RELATIVE) / "pretrain.pt", b"epoch 1")
    store.push(path)
    assert store.pull(RELATIVE) == [] and path.read_bytes() == b"epoch 1"  # up to date
    # Written here after the last upload (the upload failed, or the worker died first): no other
    # worker can read it, so the store's copy replaces it.
    path.write_bytes(b"epoch 2, never uploaded")
    assert store.pull(RELATIVE) == [path] and path.read_bytes() == b"epoch 1"
    path.unlink()  # set aside, say: the remote copy comes back
    assert store.pull(RELATIVE) == [path] and path.read_bytes() == b"epoch 1"


def test_a_checkpoint_the_store_never_received_is_not_resumed_from(
    tmp_path: Path, bucket: str
) -> None:
    store = CheckpointStore(bucket, cache=tmp_path / "a")
    path = write(store.local(RELATIVE) / "pretrain.pt", b"epoch 1, upload refused")
    kept = write(store.local(RELATIVE) / "pretrain.pt.corrupt", b"set aside")
    assert store.pull(RELATIVE) == []  # the store has no folder: nothing to fetch
    assert not path.exists() and kept.exists()  # not resumed from; older evidence kept
    aside = path.with_name("pretrain.pt.unshared")
    assert aside.read_bytes() == b"epoch 1, upload refused"  # kept, in case it is the only copy
    other = RELATIVE.replace("00004", "00005")
    best = write(store.local(other) / "pretrain-best.pt", b"best")
    store.push(write(store.local(other) / "pretrain.pt", b"epoch 3"))
    assert store.pull(other) == [] and not best.exists()  # never uploaded: set aside
    assert best.with_name("pretrain-best.pt.unshared").exists()
    assert (store.local(other) / "pretrain.pt").read_bytes() == b"epoch 3"


def test_folders_outside_the_store_are_refused(tmp_path: Path, bucket: str) -> None:
    store = CheckpointStore(bucket, cache=tmp_path / "cache")
    for bad in ("../elsewhere", "/etc", ""):
        with pytest.raises(ValueError, match="not inside checkpoints_dir"):
            store.local(bad)
    with pytest.raises(ValueError, match="not inside the checkpoint cache"):
        store.push(write(tmp_path / "other" / "pretrain.pt", b"x"))


def test_clear_deletes_the_folder_here_and_in_the_store(tmp_path: Path, bucket: str) -> None:
    store = CheckpointStore(bucket, cache=tmp_path / "cache")
    store.push(write(store.local(RELATIVE) / "pretrain.pt", b"x"))
    store.clear(RELATIVE)
    assert not store.local(RELATIVE).exists()
    assert not store.fs.exists(f"{bucket}/{RELATIVE}")
    assert CheckpointStore(bucket, cache=tmp_path / "other").pull(RELATIVE) == []


@pytest.mark.parametrize(
    "location,words",
    [
        ("nosuchproto://bucket/ckpt", "unknown URL protocol 'nosuchproto'"),
        ("https://example.org/ckpt", "cannot be written to"),
        ("memory://", "names no bucket or folder"),
        ("simplecache::s3://bucket/ckpt", "chained"),
        ("filecache://bucket/ckpt", "caching"),
    ],
)
def test_unusable_locations_are_refused_in_one_line(location: str, words: str) -> None:
    with pytest.raises(CheckpointLocationError) as caught:
        check_location(location)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_folders_and_usable_urls_pass(tmp_path: Path) -> None:
    for location in ("", "runs/checkpoints", str(tmp_path), "memory://b/x", tmp_path.as_uri()):
        check_location(location)


UNREACHABLE = "ftp://127.0.0.1:1/ckpt"  # a refused port: the filesystem fails as it opens


def test_an_unreachable_url_is_refused_in_one_line_and_a_reachable_one_passes(bucket: str) -> None:
    with pytest.raises(CheckpointLocationError) as caught:
        probe_location(UNREACHABLE)
    assert f"cannot reach {UNREACHABLE}: ConnectionRefusedError" in str(caught.value)
    assert "\n" not in str(caught.value)
    probe_location(bucket)  # a folder not made yet is fine
    probe_location("/nonexistent/folder")  # paths are check_location's


def test_a_transfer_whose_filesystem_fails_to_open_is_a_transfer_error(tmp_path: Path) -> None:
    """Opening the filesystem (which connects, for ftp:// or sftp://) is part of the transfer:
    retried for the store's bound, then a transfer error naming the URL and how long it was
    retried."""
    store = CheckpointStore(UNREACHABLE, cache=tmp_path, retry_seconds=0.5)
    with pytest.raises(
        CheckpointTransferError,
        match=f"cannot download {UNREACHABLE}/{RELATIVE} "
        r"\(still failing after \d+ s of retries\): ConnectionRefusedError",
    ):
        store.pull(RELATIVE)
    with pytest.raises(CheckpointTransferError, match=f"cannot upload {UNREACHABLE}/{RELATIVE}"):
        store.push(write(store.local(RELATIVE) / "pretrain.pt", b"x"))


def test_a_copy_that_fails_for_a_moment_is_retried_in_place(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that refuses twice (an S3 503, a dropped connection) and then answers costs a
    pause: the upload and the download each succeed, nothing fails. A folder standing where a
    file is to go is no blip: it fails at once."""
    import time

    store = CheckpointStore(bucket, cache=tmp_path / "a", retry_seconds=30)
    fs = store.fs
    calls = {"put_file": 0, "get_file": 0}

    def flaky(name: str):  # noqa: ANN202
        real = getattr(fs, name)

        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            if calls[name] <= 2:
                raise (OSError("503 Slow Down") if name == "put_file" else ConnectionResetError())
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(fs, "put_file", flaky("put_file"))
    monkeypatch.setattr(fs, "get_file", flaky("get_file"))
    started = time.monotonic()
    store.push(write(store.local(RELATIVE) / "pretrain.pt", b"weights"))
    reader = CheckpointStore(bucket, cache=tmp_path / "b", retry_seconds=30)
    [fetched] = reader.pull(RELATIVE)
    assert fetched.read_bytes() == b"weights" and calls == {"put_file": 3, "get_file": 3}
    assert time.monotonic() - started < 10  # backoff from 0.1 s, not the whole bound

    monkeypatch.setattr(fs, "put_file", lambda *a, **k: (_ for _ in ()).throw(PermissionError()))
    started = time.monotonic()
    with pytest.raises(CheckpointTransferError, match="PermissionError") as caught:
        store.push(store.local(RELATIVE) / "pretrain.pt")
    assert "still failing" not in str(caught.value) and time.monotonic() - started < 5


def test_a_file_where_a_folder_of_the_url_should_be_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(CheckpointLocationError) as caught:
        probe_location(f"file://{tmp_path}/taken/ckpt")
    assert str(caught.value) == (
        f"cannot make file://{tmp_path}/taken/ckpt: {tmp_path}/taken is a file, not a folder; "
        "give a folder"
    )
    probe_location(f"file://{tmp_path}/not-yet/made/ckpt")  # a folder that can be made is fine
    with pytest.raises(CheckpointLocationError) as caught:  # the location itself a file
        probe_location(f"file://{tmp_path}/taken")
    assert str(caught.value) == (
        f"cannot make file://{tmp_path}/taken: {tmp_path}/taken is a file, not a folder; "
        "give a folder"
    )


def test_a_password_in_the_url_is_masked(tmp_path: Path) -> None:
    assert redact_location("sftp://me:hunter2@host/ckpt") == "sftp://me:***@host/ckpt"
    store = CheckpointStore("sftp://me:hunter2@host/ckpt", cache=tmp_path)
    assert "hunter2" not in store.where(RELATIVE, "pretrain.pt")
    # A failed transfer's message (it becomes a trial's fail_reason) keeps the password out
    # too, when the backend's own text quotes its raw root (memory:// and file:// do).
    raw = FileNotFoundError(f"/me:hunter2@host/ckpt/{RELATIVE}/pretrain.pt")
    failed = store._transfer_error("cannot upload", PurePosixPath(RELATIVE), "pretrain.pt", raw)
    assert isinstance(failed, CheckpointTransferError)
    assert "hunter2" not in str(failed) and "sftp://me:***@host/ckpt/" in str(failed)
    # Secret query values too, by the storage URLs' rule; other parameters stay readable.
    shown = redact_location("az://container/ckpt?sas_token=s3cr3t&account_name=lab")
    assert shown == "az://container/ckpt?sas_token=***&account_name=lab"
    # A query is refused (a backend would take it for part of the path), secret-free message.
    with pytest.raises(
        CheckpointLocationError, match=r"a query \(\?\.\.\.\) is not supported"
    ) as e:
        check_location("memory://b/ckpt?token=s3cr3t")
    assert "s3cr3t" not in str(e.value)
    # A chained URL is refused in a message that masks each link's password.
    with pytest.raises(CheckpointLocationError, match="chained") as e:
        check_location("simplecache::ftp://bob:hunter2@host/ckpt")
    assert "hunter2" not in str(e.value) and "ftp://bob:***@host/ckpt" in str(e.value)
    # Signed URLs: an Azure SAS signature, an S3 presigned signature.
    shown = redact_location("az://c/ckpt?sv=2024&sig=s3cr3t&X-Amz-Signature=s3cr3t2")
    assert "s3cr3t" not in shown and "sv=2024" in shown


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_a_url_whose_backend_is_missing_says_what_to_install() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", ["checkpoints_dir=s3://bucket/ckpt"])
    message = str(caught.value)
    assert (
        message.startswith("checkpoints_dir: s3://") and "pip install 'ssl-search[s3]'" in message
    )


def test_a_url_is_mirrored_in_a_cache_under_runs_dir(tmp_path: Path, bucket: str) -> None:
    cfg = load_config("quickstart", [f"runs_dir={tmp_path}", f"checkpoints_dir={bucket}"])
    folder = resolved_paths(cfg)["checkpoints"]
    assert folder.parent == tmp_path / "checkpoint-cache" and folder.name.startswith("memory-")
    store = checkpoint_store(cfg)
    assert store.remote and store.root == folder
    assert store.where(RELATIVE) == f"{bucket}/{RELATIVE}"
    plain = checkpoint_store(load_config("quickstart", [f"runs_dir={tmp_path}"]))
    assert not plain.remote and plain.root == tmp_path / "checkpoints"


def test_a_continuation_whose_checkpoint_the_url_lacks_fails_naming_the_url(
    tmp_path: Path,
) -> None:
    """Never a silent retrain: the leg fails, naming where the checkpoint should have been,
    and this worker stops (the leg is queued again for one that can read it)."""
    from search.objective import TrialRunner
    from search.stages import StageError, _run_one

    remote = (tmp_path / "remote").as_uri()
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config(
        "quickstart",
        [*REAL_RUN, f"storage={url}", f"runs_dir={tmp_path}", f"checkpoints_dir={remote}"],
    )
    studies = open_studies(cfg, url)
    studies.promote.enqueue_trial(
        {"channels": 8, "batch_size": 32, "optimizer": "adam", "adam_lr": 1e-3,
         "temperature": 0.5, "aug_strength": 1.0},
        user_attrs={"config": 4, "rung_from": 1, "rung_to": 3, "seed": 4,
                    "checkpoint_dir": RELATIVE},
    )  # fmt: skip
    with pytest.raises(StageError, match="this worker stopped"):
        _run_one(studies, "promote", TrialRunner(cfg, progress=False), 0)
    trial = studies.promote.get_trials()[0]
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    assert f"{remote}/{RELATIVE}/pretrain.pt" in reason, reason
    assert "checkpoints_dir" in reason and "every worker" in reason and "s3://" in reason
    assert "epochs_run" not in trial.user_attrs  # nothing was trained
    assert not (tmp_path / "remote").exists()


def _a_leg_failed_after_training(
    cfg: object, studies: object
) -> tuple[optuna.trial.FrozenTrial, Path]:
    """Run one screen leg that trains, writes its checkpoints and then fails (a hook raises, as
    a worker's machine going away would): the failed trial and its checkpoint folder."""
    from search.objective import TrialRunner
    from search.stages import _run_one

    def fails_after_training(*_: object) -> None:
        raise RuntimeError("the machine went away")

    failing = TrialRunner(cfg, progress=False)
    failing.hooks.append(fails_after_training)
    number = _run_one(studies, "screen", failing, max_retries=3)
    failed = studies.screen.get_trials()[number]
    return failed, failing.store.local(failed.user_attrs["checkpoint_dir"])


def test_a_retry_that_cannot_read_its_originals_checkpoint_fails_instead_of_retraining(
    tmp_path: Path,
) -> None:
    """A first leg failed after its rung checkpoint was written (here by a hook that raised);
    its retry runs where that checkpoint cannot be read (another machine's local folder, or a
    changed checkpoints_dir). It fails naming the path and this worker stops; before, it
    trained the leg again from epoch 0 and said nothing."""
    from search.objective import TrialRunner
    from search.stages import StageError, _run_one
    from storage.trial_retry import RetryFailedTrial

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config("quickstart", [*REAL_RUN, f"storage={url}", f"runs_dir={tmp_path}"])
    studies = open_studies(cfg, url)
    failed, folder = _a_leg_failed_after_training(cfg, studies)
    number = failed.number
    assert failed.state == TrialState.FAIL and failed.user_attrs["epochs_run"] == 1
    assert (folder / "pretrain.pt").is_file()
    RetryFailedTrial(max_retry=3)(studies.screen, failed)
    moved = folder.rename(tmp_path / "elsewhere")  # not where this worker looks

    with pytest.raises(StageError, match="this worker stopped"):
        _run_one(studies, "screen", TrialRunner(cfg, progress=False), max_retries=3)
    retry = studies.screen.get_trials()[number + 1]
    assert retry.state == TrialState.FAIL
    reason = retry.user_attrs["fail_reason"]
    assert reason.startswith("CheckpointUnreachableError"), reason
    assert str(folder / "pretrain.pt") in reason and f"retries trial #{number}" in reason
    assert "nothing was retrained" in reason and "every worker" in reason
    assert retry.user_attrs.get("resumed_from_epoch") is None  # nothing was trained
    assert not folder.exists() and (moved / "pretrain.pt").is_file()
    # Queued again for a worker that can read it (counted: this machine wrote it).
    [again] = studies.screen.get_trials(states=(TrialState.WAITING,))
    assert again.params == failed.params
    # Where the checkpoint is readable, that retry resumes from it and trains nothing more.
    moved.rename(folder)
    _run_one(studies, "screen", TrialRunner(cfg, progress=False), max_retries=3)
    done = studies.screen.get_trials()[again.number]
    assert done.state == TrialState.COMPLETE and done.user_attrs["resumed_from_epoch"] == 1


@pytest.mark.parametrize(("every", "refused"), [(1, True), (5, False)])
def test_a_retry_is_held_to_its_originals_checkpoint_every(
    tmp_path: Path, every: int, refused: bool
) -> None:
    """An original that reported 3 of 4 epochs had surely written a checkpoint when it saved
    every epoch, not when it saved every 5 (a per-run setting, so a retry's worker may save
    more often than the original did): then no checkpoint is no sign of an unshared folder."""
    from search.objective import TrialRunner
    from search.stages import StageError, _run_one
    from storage.trial_retry import RetryFailedTrial

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config(
        "quickstart",
        [f"storage={url}", f"runs_dir={tmp_path}", "search.pruner.name=none",
         "stages.screen.epochs=4", "train.max_batches=2", "stage=screen"],
    )  # fmt: skip
    studies = open_studies(cfg, url)
    failed, folder = _a_leg_failed_after_training(cfg, studies)
    number = failed.number
    shutil.rmtree(folder)
    failed.user_attrs = {**failed.user_attrs, "epochs_run": 3, "checkpoint_every": every}
    RetryFailedTrial(max_retry=3)(studies.screen, failed)
    if refused:
        with pytest.raises(StageError, match="this worker stopped"):
            _run_one(studies, "screen", TrialRunner(cfg, progress=False), max_retries=3)
    else:
        _run_one(studies, "screen", TrialRunner(cfg, progress=False), max_retries=3)
    retry = studies.screen.get_trials()[number + 1]
    if refused:
        assert retry.state == TrialState.FAIL
        assert retry.user_attrs["fail_reason"].startswith("CheckpointUnreachableError")
    else:  # trained again from epoch 0: nothing said that a checkpoint had to be there
        assert retry.state == TrialState.COMPLETE and retry.user_attrs["epochs_run"] == 4
        assert retry.user_attrs.get("resumed_from_epoch") is None


def test_a_continuation_whose_checkpoint_is_older_than_its_rung_fails(tmp_path: Path) -> None:
    """The rung checkpoint a leg continues from was lost and an older one is there (a shared
    store rolled back, say): the leg fails naming both epochs instead of resuming earlier."""
    from search.objective import TrialRunner
    from search.stages import _run_one

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config("quickstart", [*REAL_RUN, f"storage={url}", f"runs_dir={tmp_path}"])
    studies = open_studies(cfg, url)
    number = _run_one(studies, "screen", TrialRunner(cfg, progress=False), max_retries=3)
    first = studies.screen.get_trials()[number]
    assert first.state == TrialState.COMPLETE and first.user_attrs["epochs_run"] == 1
    studies.promote.enqueue_trial(
        first.params,
        user_attrs={"config": number, "rung_from": 3, "rung_to": 9, "seed": first.user_attrs["seed"],
                    "checkpoint_dir": first.user_attrs["checkpoint_dir"]},
    )  # fmt: skip
    _run_one(studies, "promote", TrialRunner(cfg, progress=False), max_retries=0)
    [leg] = studies.promote.get_trials()
    assert leg.state == TrialState.FAIL
    reason = leg.user_attrs["fail_reason"]
    assert "holds epoch 1, but configuration" in reason and "reached epoch 3" in reason, reason
    assert leg.user_attrs.get("resumed_from_epoch") is None  # nothing was trained


def _cached_trials(runs: Path) -> dict[str, Path]:
    """``<study>-<uid>/trial-N`` -> its folder, for every trial folder in the cache of ``runs``."""
    return {
        f"{p.parent.parent.name}/{p.parent.name}": p.parent
        for p in runs.glob("checkpoint-cache/file-*/*/trial-*/*.pt")
    }


@pytest.mark.slow
def test_two_workers_with_their_own_caches_share_a_url(tmp_path: Path) -> None:
    """One process screens, another (another cache) continues the best from the URL."""
    remote = tmp_path / "remote"
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    common = ["study=quickstart", f"storage={url}", f"checkpoints_dir={remote.as_uri()}"]
    args = [*common, *REAL_RUN, "devices=cpu", "--no-progress"]
    first = run_module("search.run", *args, f"runs_dir={tmp_path / 'a'}", "stage=screen")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_module("search.run", *args, f"runs_dir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    cfg = load_config("quickstart", [*REAL_RUN, f"storage={url}"])
    studies = open_studies(cfg, url)
    screen = studies.screen.get_trials(states=(TrialState.COMPLETE,))
    continued = studies.promote.get_trials(states=(TrialState.COMPLETE,))
    assert len(screen) == 6 and continued
    assert not studies.screen.get_trials(states=(TrialState.FAIL,))
    for t in continued:  # from the rung checkpoint the other process wrote, not from scratch
        assert t.user_attrs["resumed_from_epoch"] == t.user_attrs["rung_from"] == 1
        assert t.user_attrs.get("checkpoint_discarded") is None
    # The store holds every configuration's folder, whole files only.
    for t in screen:
        assert (remote / t.user_attrs["checkpoint_dir"] / "pretrain.pt").is_file()
    assert not [p for p in remote.rglob(".*")]
    # Each cache holds what its process trained or read: the second one, only the continued
    # configurations (pulled) and the final trial's folder.
    first_cache, second_cache = _cached_trials(tmp_path / "a"), _cached_trials(tmp_path / "b")
    assert set(first_cache) == {t.user_attrs["checkpoint_dir"] for t in screen}
    final = optuna.load_study(study_name="quickstart.final", storage=url).get_trials()
    assert final[0].state == TrialState.COMPLETE
    best = long_budget_trials(studies, cfg)[0]
    assert final[0].user_attrs["source_checkpoint_dir"] == best.user_attrs["checkpoint_dir"]
    assert set(second_cache) == {t.user_attrs["checkpoint_dir"] for t in continued} | {
        final[0].user_attrs["checkpoint_dir"]
    }
    assert (remote / final[0].user_attrs["checkpoint_dir"] / "probe.pt").is_file()
    # The continued leg's checkpoint went back to the store; the first cache still has rung 1.
    leg = best.user_attrs["checkpoint_dir"]
    assert torch.load(remote / leg / "pretrain.pt", weights_only=True)["epoch"] == 3
    assert torch.load(first_cache[leg] / "pretrain.pt", weights_only=True)["epoch"] == 1
    # The report, on a third machine, rebuilds the final networks from the store.
    from reporting.store import rebuild_final_run

    third = [*REAL_RUN, f"storage={url}", f"runs_dir={tmp_path / 'c'}", common[-1]]
    run = rebuild_final_run(load_config("quickstart", third), final[0], "cpu")
    assert run.nets.classifier is not None
    assert set(_cached_trials(tmp_path / "c")) == {leg, final[0].user_attrs["checkpoint_dir"]}


def test_a_store_down_past_its_retries_requeues_the_trial_free_and_stops_the_worker(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses an upload for longer than its retry bound (an outage): the trial fails
    naming the store and is queued again without spending one of its retries (the store
    failed, not the configuration), and the worker stops in one line: every leg it took would
    fail the same way and, counted, spend every configuration's retries in seconds. The next
    worker's retry trains the rung again, uploads it and completes."""
    from search.objective import TrialRunner
    from search.stages import StageError, _run_one
    from storage.trial_retry import retries_spent

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config(
        "quickstart",
        [*REAL_RUN, f"storage={url}", f"runs_dir={tmp_path}", f"checkpoints_dir={bucket}"],
    )
    studies = open_studies(cfg, url)
    runner = TrialRunner(cfg, progress=False)
    fs = runner.store.fs
    put_file, refused = fs.put_file, []

    def put_once_refused(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # The rung's resume checkpoint, written in full here: its upload is the one refused.
        if not refused and Path(args[0]).name == "pretrain.pt":
            refused.append(args)
            raise OSError("503 Slow Down")
        return put_file(*args, **kwargs)

    monkeypatch.setattr(fs, "put_file", put_once_refused)
    monkeypatch.setattr(runner.store, "retry_seconds", 0.0)  # down past the bound at once
    with pytest.raises(StageError) as stopped:
        _run_one(studies, "screen", runner, max_retries=1)
    assert "\n" not in str(stopped.value) and str(stopped.value).startswith(
        f"checkpoints_dir: cannot upload {bucket}/"
    )
    assert str(stopped.value).endswith("this worker stopped")
    [failed] = studies.screen.get_trials(states=(TrialState.FAIL,))
    number = failed.number
    assert refused
    assert failed.user_attrs["fail_reason"].startswith("CheckpointTransferError: checkpoints_dir")
    [retry] = studies.screen.get_trials(states=(TrialState.WAITING,))
    assert retry.params == failed.params
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == number
    assert retries_spent(retry) == 0  # free: max_retries=1 would otherwise allow one more
    again = _run_one(studies, "screen", runner, max_retries=3)
    assert again == retry.number
    done = studies.screen.get_trials()[again]
    assert done.state == TrialState.COMPLETE
    # The retry trained the rung again and uploaded it: the store holds what it completed on,
    # so another worker can continue the configuration (before, the retry found the local copy
    # that never reached the store, trained nothing and completed without uploading).
    assert done.user_attrs.get("resumed_from_epoch") is None
    remote = f"{bucket}/{done.user_attrs['checkpoint_dir']}/pretrain.pt"
    with fs.open(remote, "rb") as handle:
        stored = torch.load(handle, weights_only=True, map_location="cpu")
    assert stored["epoch"] == done.user_attrs["epochs_run"] == 1


def test_search_train_says_in_one_line_when_the_shared_store_fails(tmp_path: Path) -> None:
    """``python -m search.train`` on a store it cannot read (here its ``train`` folder is a
    file): one line naming the store and how to go on, exit 1 (not the input's fault), no
    traceback."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "train").write_text("not a folder")
    done = run_module(
        "search.train",
        "study=quickstart",
        f"checkpoints_dir=file://{store}",
        f"runs_dir={tmp_path / 'runs'}",
        "train.epochs=1",
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: checkpoints_dir: cannot download file://{store}/train/"), line
    assert line.endswith(
        "run the same command again to resume from the last checkpoint once it can be reached"
    ), line


def test_a_checkpoint_this_machine_cannot_write_requeues_the_trial_free_and_stops_the_worker(
    tmp_path: Path,
) -> None:
    """A full disk, or a checkpoints folder that cannot be made (here a file stands where it
    should be), is this machine's fault, not the configuration's: the trial fails naming the
    file, is queued again without spending one of its retries, and the worker stops in one
    line, instead of failing every configuration in turn for good."""
    from search.objective import TrialRunner
    from search.stages import StageError, _run_one
    from storage.trial_retry import retries_spent

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    folder = tmp_path / "ckpt"
    overrides = [*REAL_RUN, f"storage={url}", f"runs_dir={tmp_path}", f"checkpoints_dir={folder}"]
    cfg = load_config("quickstart", overrides)
    studies = open_studies(cfg, url)
    runner = TrialRunner(cfg, progress=False)
    shutil.rmtree(folder, ignore_errors=True)
    folder.write_text("not a folder")  # the disk under it went away, say
    with pytest.raises(StageError) as stopped:
        _run_one(studies, "screen", runner, max_retries=0)
    message = str(stopped.value)
    assert message.startswith(f"cannot write checkpoint {folder}/") and "\n" not in message
    assert message.endswith("; this worker stopped")
    [failed] = studies.screen.get_trials(states=(TrialState.FAIL,))
    assert failed.user_attrs["fail_reason"].startswith("CheckpointWriteError: cannot write")
    [retry] = studies.screen.get_trials(states=(TrialState.WAITING,))  # even at max_retries=0
    assert retry.params == failed.params and retries_spent(retry) == 0
    folder.unlink()  # space freed: the next worker trains it
    assert _run_one(studies, "screen", runner, max_retries=0) == retry.number
    assert studies.screen.get_trials()[retry.number].state == TrialState.COMPLETE
