"""Worker processes: one loop per process, many processes per study, coordinated by storage.

:func:`worker_loop` is what every worker runs, whether started by ``search.run workers=N`` on
this machine or by ``search.worker`` from another shell or machine. :func:`run_workers` starts
N such processes (spawned as fresh interpreters, never forked), each pinned to one device with
``CUDA_VISIBLE_DEVICES`` round-robin (mapped through the launcher's own mask), and shows one
aggregated progress bar read from storage.
No process is special: killing any of them, including the launcher, leaves the study
consistent, and any worker started later carries on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from models.checkpoints import CheckpointError, CheckpointWriteError
from models.config import check_device
from models.data import ImageSplits, load_splits
from models.errors import UsageError
from models.training import NonFiniteLossError, physical_gpu
from search.config import ConfigError, resolved_paths, to_dataclasses
from search.database import WORKER_STORAGE_ENV
from search.naming import (
    RUNG_FROM_ATTR,
    SKIPPED,
    failed_as_given_up,
    format_metric,
    learning_curve,
    stage_metric,
    trained_nothing,
)
from search.objective import TrialHook, TrialRunner
from search.stages import (
    ConfigurationGivenUp,
    open_studies,
    progress,
    run_stages,
)
from storage.checkpoint_store import CheckpointTransferError
from storage.claims import process_alive, this_machine
from storage.retry import RETRY_SECONDS


def device_plan(devices: str, workers: int, device_count: int | None = None) -> list[str]:
    """Device of each worker: ``cpu``, or a CUDA index among the GPUs this process sees.

    ``device_count`` (for ``devices=auto``) defaults to ``torch.cuda.device_count()``; pass it
    to plan without asking CUDA. :func:`cuda_masks` turns the indices into the
    ``CUDA_VISIBLE_DEVICES`` of each worker process (where the GPU is cuda:0).
    """
    text = str(devices).strip()
    if text == "auto":
        count = torch.cuda.device_count() if device_count is None else device_count
        indices = [str(i) for i in range(count)] if count else []
    elif text == "cpu":
        indices = []
    else:
        indices = [p.strip() for p in text.split(",")]
    if not indices:
        return ["cpu"] * workers
    return [indices[i % len(indices)] for i in range(workers)]


def worker_devices(cfg: DictConfig, device_count: int | None = None) -> list[str]:
    """:func:`device_plan` of study ``cfg``'s workers. Under ``devices=auto`` an explicit
    ``train.device`` wins for every worker, as it does for one worker run in this process
    (:func:`in_process_device`): ``cpu`` keeps them all off the GPUs, ``cuda:N`` puts them all
    on GPU N. Before, launched workers took the GPUs whatever ``train.device`` said."""
    workers = int(cfg.workers)
    if str(cfg.devices).strip() == "auto":
        train_device = str(cfg.train.device)
        if train_device == "cpu":
            return ["cpu"] * workers
        if train_device.startswith("cuda:"):
            return [train_device.split(":", 1)[1]] * workers
    return device_plan(cfg.devices, workers, device_count)


def cuda_masks(plan: Sequence[str], parent_mask: str | None) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each worker of ``plan`` (``""`` for a CPU worker).

    A plan's indices count the GPUs this process sees, and a child's ``CUDA_VISIBLE_DEVICES``
    replaces the parent's: so under a parent mask (``parent_mask``, the launcher's value,
    ``None`` when unset) index i becomes the mask's i-th entry, taken as written (an index, or
    a ``GPU-...``/``MIG-...`` UUID). Under ``4,5`` (as Slurm sets it) index 1 is ``5``.
    Raises :class:`ConfigError` for an index the mask does not have.
    """
    entries = None if parent_mask is None else [e.strip() for e in parent_mask.split(",")]
    if entries is not None and entries == [""]:
        entries = []
    masks = []
    for dev in plan:
        if dev == "cpu":
            masks.append("")
        elif entries is None:
            masks.append(dev)
        elif int(dev) < len(entries) and entries[int(dev)]:
            masks.append(physical_gpu(int(dev), parent_mask))
        else:
            raise ConfigError(
                f"devices: GPU {dev} is not visible here: CUDA_VISIBLE_DEVICES={parent_mask!r} "
                f"shows {len(entries)} GPU(s), numbered from 0"
            )
    return masks


def check_devices(cfg: DictConfig) -> None:
    """The devices ``cfg`` asks for exist here (a :class:`ConfigError` naming ``devices`` or
    ``train.device`` otherwise): checked before the study is created, not by the first trial."""
    plan = worker_devices(cfg)
    if int(cfg.workers) == 1:
        device = in_process_device(cfg.devices, cfg.train.device, plan[0])
        key = "train.device" if device == str(cfg.train.device) else "devices"
        try:
            check_device(device, key)
        except UsageError as error:
            raise ConfigError(str(error)) from None
        return
    if any(dev != "cpu" for dev in plan):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"devices: {cfg.devices!r} asks for GPUs but no CUDA device is visible; "
                "use cpu or auto"
            )
    cuda_masks(plan, os.environ.get("CUDA_VISIBLE_DEVICES"))


def worker_env(mask: str, workers: int, cpu_count: int | None = None) -> dict[str, str]:
    """The environment a launched worker adds: its ``CUDA_VISIBLE_DEVICES`` (``mask``, from
    :func:`cuda_masks`) and its share of the cores, ``OMP_NUM_THREADS``. GPU workers get a
    share too: their CPU side (Python, the augmentation's parameters) needs few threads, and
    unlimited, ``workers`` processes oversubscribe the machine.

    >>> worker_env("5", workers=4, cpu_count=16)
    {'CUDA_VISIBLE_DEVICES': '5', 'OMP_NUM_THREADS': '4'}
    """
    cores = (os.cpu_count() or 1) if cpu_count is None else cpu_count
    return {"CUDA_VISIBLE_DEVICES": mask, "OMP_NUM_THREADS": str(max(1, cores // workers))}


def in_process_device(devices: str, train_device: str, first: str) -> str:
    """Device of the one worker run in this process, ``first`` being its :func:`device_plan`.

    With ``devices=auto`` an explicit ``train.device`` (``cpu``, ``cuda:1``, ...) wins;
    otherwise the plan's device (``cpu`` or ``cuda:<index>``).
    """
    auto = str(devices).strip() == "auto"
    if auto and (str(train_device) != "auto" or first == "cpu"):
        return str(train_device)
    return "cpu" if first == "cpu" else f"cuda:{first}"


def _announce(label: str, study: optuna.Study, number: int, metric: str) -> None:
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    value = "-" if trial.value is None else format_metric(metric, trial.value)
    attrs = trial.user_attrs
    extra = attrs.get("prune_reason") or attrs.get("fail_reason") or ""
    if trained_nothing(attrs):  # not a failure: it trained nothing, on purpose
        tqdm.write(f"[{label}] {study.study_name} #{number} {SKIPPED} ({extra})")
        return
    resumed = (
        f", resumed from epoch {attrs['resumed_from_epoch']}"
        if attrs.get("resumed_from_epoch") is not None
        else ""
    )
    probe = len(learning_curve(attrs, "probe"))
    if failed_as_given_up(attrs):  # failed at once, on purpose
        epochs, resumed = "trained nothing", ""
    elif "epochs_run" in attrs and attrs.get(RUNG_FROM_ATTR) is not None:  # a continued leg
        epochs = f"epochs {attrs[RUNG_FROM_ATTR]} -> {attrs['epochs_run']}"
        resumed = ""  # from its rung's checkpoint: said by the arrow
    elif "epochs_run" in attrs:
        epochs = f"{attrs['epochs_run']} epoch{'' if attrs['epochs_run'] == 1 else 's'}"
    elif probe:  # the final stage trains only the classifier on the frozen encoder
        epochs = f"classifier {probe} epochs"
    else:
        epochs = "- epochs"
    seconds = attrs.get("wall_time_s")  # set when training ends; a failed trial has its times
    if seconds is None and trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    tqdm.write(
        f"[{label}] {study.study_name} #{number} {trial.state.name} {metric} {value} "
        f"({epochs}, {seconds or 0:.1f}s{resumed}) {extra}".rstrip()
    )


def worker_loop(
    cfg: DictConfig,
    url: str,
    *,
    device: str,
    label: str = "worker",
    progress: bool = True,
    seed_offset: int | None = None,
    hooks: Sequence[TrialHook] = (),
    splits: ImageSplits | None = None,
) -> None:
    """Join the study at ``url`` and run trials of every stage until all stages are done.

    Each process gets its own sampler seed unless ``seed_offset`` is given (samplers seeded
    alike would propose the very same parameters in every process). ``hooks`` run at the end of each
    trial (the command line passes the artifact uploader). ``splits``: the study's data when the
    caller has loaded it already (``search.run`` with one worker); otherwise it is loaded here.
    """
    # The data first, as start-up, not inside the first trial, and before the study is
    # written: data this machine does not have writes nothing.
    if splits is None:
        splits = load_data(cfg, label)
    runner = TrialRunner(cfg, device=device, progress=progress, splits=splits)
    # The images are checked before this run writes anything to a study that exists.
    studies = open_studies(cfg, url, seed_offset=seed_offset, splits=splits)
    runner.find_trial = studies.find_trial
    runner.source_curve = studies.pretrain_curve
    runner.hooks.extend(hooks)

    def on_trial(stage: str, number: int) -> None:
        _announce(label, studies.of(stage), number, stage_metric(cfg, stage))

    try:
        run_stages(studies, runner, cfg, on_trial=on_trial)
    finally:
        for hook in hooks:  # hooks that finish their work off the trial (figures) wait here
            flush = getattr(hook, "flush", None)
            if flush is not None:
                flush(60.0)


def load_data(cfg: DictConfig, label: str | None = None) -> ImageSplits:
    """The study's data splits, loaded (and checked) once per process, with a line saying what
    was loaded and how long it took (decoding a folder of images the first time takes a while)."""
    started = time.perf_counter()
    splits = load_splits(to_dataclasses(cfg)[0])
    sizes = (
        f"{len(splits.train_y)} train, {len(splits.val_y)} validation, {len(splits.test_y)} test"
    )
    prefix = f"[{label}] " if label else ""
    source = f"; from {splits.source}" if splits.source else ""
    print(
        f"{prefix}data {cfg.data.name}: {sizes} images "
        f"(loaded in {time.perf_counter() - started:.1f}s){source}",
        flush=True,
    )
    whole = _batches_over(cfg, len(splits.train_y))
    if whole:
        print(
            f"{prefix}note: batch size {', '.join(map(str, whole))} exceeds the "
            f"{len(splits.train_y)} training images: one batch of all of them per epoch, the "
            f"same training as batch size {len(splits.train_y)}",
            flush=True,
        )
    return splits


def _batches_over(cfg: DictConfig, images: int) -> list[int]:
    """The batch sizes the study can train with (its own, and those its space can draw) that
    are larger than its ``images`` training images."""
    drawn = [spec for spec in cfg.search.space.values() if spec.target == "train.batch_size"]
    # The study's own size trains only where no parameter always sets it.
    sizes = set() if any(not spec.when for spec in drawn) else {int(cfg.train.batch_size)}
    for spec in drawn:
        values = spec.choices if spec.choices else [spec.high]
        sizes.update(int(v) for v in values if v is not None)
    return sorted(size for size in sizes if size > images)


STOP_GRACE_S = 30.0  # after the first stop signal, later ones within this are ignored
# How long a launcher waits for its stopped workers before it kills them: a worker's re-enqueue
# may ride out a storage outage for the whole retry bound (a worker killed mid-outage leaves its
# trial to the heartbeat, which retries it as a counted retry, not a free one).
STOP_WAIT_S = RETRY_SECONDS + STOP_GRACE_S


_stopped_by: list[int] = []  # the signal that stopped this process, once one did
_stopping_since: list[float] = []  # when it did (time.monotonic())


# Failures whose stored reason says all there is to say (the worker prints it in its line for
# the trial): a traceback would only bury it. Any other exception keeps Optuna's traceback.
_EXPECTED_FAILURES = (
    KeyboardInterrupt,
    CheckpointError,  # unreadable, foreign or unreachable checkpoints
    CheckpointTransferError,
    CheckpointWriteError,  # a full disk, say
    NonFiniteLossError,  # a diverged run
    torch.cuda.OutOfMemoryError,
    ConfigurationGivenUp,  # a leg of a configuration the user gave up (python -m search.give_up)
    optuna.exceptions.UpdateFinishedTrialError,  # failed as stale by another worker meanwhile
)


class _QuietInterrupts(logging.Filter):
    """Drops Optuna's warning, with its traceback, for a trial stopped by Ctrl-C or SIGTERM
    (stopping is on purpose, its reason is stored, and the process says so in one line) or
    failed for a reason the worker's own line states (:data:`_EXPECTED_FAILURES`)."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()  # "Trial N failed with": the follow-up line too

    def filter(self, record: logging.LogRecord) -> bool:
        prefix = " ".join(record.getMessage().split()[:4])  # "Trial N failed with"
        if record.exc_info and isinstance(record.exc_info[1], _EXPECTED_FAILURES):
            self.interrupted.add(prefix)
            return False
        if prefix in self.interrupted:
            self.interrupted.discard(prefix)
            return False
        return True


_OPTUNA_TRIAL_LOGGER = "optuna.study._optimize"  # where Optuna logs a failed trial


def install_sigterm_as_interrupt() -> None:
    """SIGTERM and SIGINT behave like Ctrl-C: the running trial is re-enqueued to resume later.

    Only the first signal interrupts. Later ones within ``STOP_GRACE_S`` are ignored while the
    process stops: Ctrl-C reaches a launcher and its workers at once, and the launcher then sends
    its workers SIGTERM, which must not cut short the re-enqueueing of their trials (a signal
    after it interrupts a stuck clean-up; a launcher kills a worker that has not stopped within
    ``STOP_WAIT_S``).
    SIGINT is set too, because a process started from a background job inherits it ignored.
    """

    def handler(signum, frame):  # noqa: ARG001
        if _stopped_by and time.monotonic() - _stopping_since[0] < STOP_GRACE_S:
            return  # already stopping; after the grace a signal interrupts the clean-up too
        _stopped_by.append(signum)
        _stopping_since[:] = [time.monotonic()]
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    logger = logging.getLogger(_OPTUNA_TRIAL_LOGGER)
    if not any(isinstance(f, _QuietInterrupts) for f in logger.filters):
        logger.addFilter(_QuietInterrupts())


def interrupted_exit_code() -> int:
    """The shell's code for the signal that stopped this process: 143 for SIGTERM, else 130
    (Ctrl-C), so a batch system can tell the two apart."""
    return 128 + (_stopped_by[0] if _stopped_by else signal.SIGINT)


def _progress_thread(cfg: DictConfig, url: str, stop: threading.Event) -> threading.Thread:
    def watch() -> None:
        studies = open_studies(cfg, url, seed_offset=0)  # reads only
        total = int(cfg.stages.screen.trials)  # at most: the rungs may end the search sooner
        bar = tqdm(total=total, desc=f"{cfg.name} configurations", unit="config")
        while not stop.is_set():
            now = progress(studies, cfg)
            bar.n = min(now.configurations, bar.total)
            bar.set_postfix_str(str(now), refresh=False)
            bar.refresh()
            stop.wait(2.0)
        bar.close()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# Worker config files are named <study>.launcher<pid>@<host>-<random>.yaml, <host> a hash of
# this machine's name and PID namespace (storage.claims.this_machine): a runs_dir shared by
# several machines or containers holds launchers whose pids mean nothing here.
_LAUNCHER_MARK = ".launcher"


def _this_host() -> str:
    return hashlib.sha256(this_machine().encode()).hexdigest()[:8]


def remove_orphaned_worker_configs(folder: Path) -> list[Path]:
    """Delete the worker config files in ``folder`` whose launcher process is gone; return them.

    A launcher deletes its file when its workers end; one killed with SIGKILL cannot, and its
    workers no longer need the file (each reads it once, at start). A file whose launcher is
    alive, runs on another machine, or whose name does not carry a launcher's pid, is kept.
    """
    removed = []
    for path in folder.glob(f"*{_LAUNCHER_MARK}*-*.yaml"):
        launcher = path.name.rsplit(_LAUNCHER_MARK, 1)[1].split("-", 1)[0]
        pid_text, _, host = launcher.partition("@")
        if host and host != _this_host():  # its pid means nothing here
            continue
        if not pid_text.isdigit() or process_alive(int(pid_text)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def run_workers(
    cfg: DictConfig,
    url: str,
    *,
    progress: bool = True,
    hooks: Sequence[TrialHook] = (),
    splits: ImageSplits | None = None,
) -> None:
    """Run the study with ``cfg.workers`` processes (in this process when it is 1).

    ``hooks`` and ``splits`` (the data, when the caller has loaded it already) apply to the
    in-process worker; spawned ``search.worker`` processes load their own and add their hooks.
    """
    plan = worker_devices(cfg)
    if int(cfg.workers) == 1:
        device = in_process_device(cfg.devices, cfg.train.device, plan[0])
        worker_loop(
            cfg,
            url,
            device=device,
            label="worker 0",
            progress=progress,
            hooks=hooks,
            splits=splits,
        )
        return
    masks = cuda_masks(plan, os.environ.get("CUDA_VISIBLE_DEVICES"))
    # Workers read the exact resolved config this process validated, from one file (0600,
    # without the storage URL: that travels in the environment, never on a command line).
    folder = resolved_paths(cfg)["runs"] / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphaned_worker_configs(folder)
    fd, cfg_path = tempfile.mkstemp(
        dir=folder,
        prefix=f"{cfg.name}{_LAUNCHER_MARK}{os.getpid()}@{_this_host()}-",
        suffix=".yaml",
    )
    shared = OmegaConf.to_container(cfg, resolve=True)
    shared["storage"] = ""
    with os.fdopen(fd, "w") as handle:
        handle.write(OmegaConf.to_yaml(shared))
    workers: list[_Worker] = []
    stop = threading.Event()
    watcher = _progress_thread(cfg, url, stop) if progress else None
    try:
        for i, (dev, mask) in enumerate(zip(plan, masks, strict=True)):
            env = dict(os.environ, **worker_env(mask, len(plan)))
            env[WORKER_STORAGE_ENV] = url
            device = "cpu" if dev == "cpu" else "cuda"
            label = f"w{i}:{'cpu' if dev == 'cpu' else 'gpu' + dev}"
            cmd = [
                sys.executable,
                "-m",
                "search.worker",
                f"study={cfg_path}",
                f"device={device}",
                f"label={label}",
                "--no-progress",
            ]
            workers.append(_Worker(label, cmd, env))
        codes = [w.wait() for w in workers]
    except KeyboardInterrupt:
        # SIGTERM, not SIGINT: workers started from a background job ignore SIGINT. Each
        # worker re-enqueues its running trial and exits.
        for w in workers:
            w.stop()
        deadline = time.monotonic() + STOP_WAIT_S
        for w in workers:
            w.wait(max(deadline - time.monotonic(), 0.1))
        raise
    finally:
        stop.set()
        if watcher:
            watcher.join(timeout=5)
        Path(cfg_path).unlink(missing_ok=True)
    failed = [w for w, c in zip(workers, codes, strict=True) if c != 0]
    if failed and len(failed) == len(workers):
        raise WorkersFailed(
            "every worker failed: "
            + "; ".join(
                f"{w.label} exit {w.code}: {w.last_error or 'no error output'}" for w in failed
            )
        )
    if failed:
        tqdm.write(
            f"workers {[w.label for w in failed]} exited with codes {[w.code for w in failed]}; "
            "their trials were re-enqueued or failed with a reason (see the summary)"
        )


class WorkersFailed(RuntimeError):
    """Every worker process exited with an error; the message has each one's last error line."""


class _Worker:
    """One ``search.worker`` process; its stderr is passed through and its last line kept."""

    def __init__(self, label: str, cmd: list[str], env: dict[str, str]) -> None:
        self.label = label
        self.last_error = ""
        self.code: int | None = None
        self.process = subprocess.Popen(
            cmd, env=env, cwd=os.getcwd(), stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self._relay = threading.Thread(target=self._pass_stderr, daemon=True)
        self._relay.start()

    def _pass_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            sys.stderr.write(line)
            if line.strip():
                self.last_error = line.strip()[:500]

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            self.code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()  # did not stop in time: its trial is retried by heartbeat
            self.code = self.process.wait()
        self._relay.join(timeout=5)
        return self.code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
