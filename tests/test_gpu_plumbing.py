"""GPU plumbing, checked on the CPU: RNG checkpoints that move between GPU counts, worker
device masks under a parent CUDA_VISIBLE_DEVICES, the in-process device choice, and NT-Xent in
float32 under autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import checkpoints
from models.checkpoints import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from models.losses import nt_xent
from search.config import ConfigError
from search.pool import cuda_masks, device_plan, in_process_device

# ---- RNG state: the training device's only ------------------------------------------------


def fake_cuda_state(seed: int) -> torch.Tensor:
    """Shaped like torch.cuda.get_rng_state(): a small uint8 tensor (seed + offset)."""
    return torch.tensor([seed] * 8 + [0] * 8, dtype=torch.uint8)


def test_cpu_run_ignores_cuda_states_and_continues_the_cpu_stream(tmp_path):
    torch.manual_seed(123)
    state = capture_rng_state("cpu")
    assert set(state) == {"cpu"}
    expected = torch.rand(5)
    # A checkpoint written by a process that saw two GPUs (the old per-GPU list) and one
    # written on a GPU run (one state): both restore here, where no GPU is used.
    for cuda in ([fake_cuda_state(1), fake_cuda_state(2)], fake_cuda_state(1)):
        path = tmp_path / "pretrain.pt"
        save_checkpoint(path, {"epoch": 1, "rng": {"cpu": state["cpu"], "cuda": cuda}})
        loaded = load_checkpoint(path)
        torch.manual_seed(999)  # move the stream away; restoring must bring it back
        restore_rng_state(loaded["rng"], torch.device("cpu"))
        assert torch.equal(torch.rand(5), expected)
    restore_rng_state(state)  # no device: a CPU run
    assert torch.equal(torch.rand(5), expected)


def test_cuda_run_saves_and_restores_its_own_device_only(monkeypatch):
    saved = fake_cuda_state(7)
    got: list[tuple[torch.Tensor, torch.device]] = []
    monkeypatch.setattr(
        checkpoints.torch.cuda, "get_rng_state", lambda device: saved if device.index == 0 else 0
    )
    monkeypatch.setattr(
        checkpoints.torch.cuda, "set_rng_state", lambda state, device: got.append((state, device))
    )
    state = capture_rng_state(torch.device("cuda:0"))
    assert state["cuda"] is saved  # one state, not one per visible GPU

    # In a one-GPU worker: a legacy two-GPU list gives the entry of its device, no IndexError.
    legacy = {"cpu": torch.get_rng_state(), "cuda": [fake_cuda_state(1), fake_cuda_state(2)]}
    restore_rng_state(legacy, "cuda:0")
    restore_rng_state(legacy, "cuda:1")
    restore_rng_state(legacy, "cuda:5")  # the writer saw fewer GPUs: the first state
    restore_rng_state(state, "cuda:3")  # a one-state checkpoint moves to another GPU
    restore_rng_state({"cpu": torch.get_rng_state()}, "cuda:0")  # written on a CPU run
    assert [(int(s[0]), str(d)) for s, d in got] == [
        (1, "cuda:0"),
        (2, "cuda:1"),
        (1, "cuda:5"),
        (7, "cuda:3"),
    ]


# ---- worker devices under the launcher's CUDA_VISIBLE_DEVICES ----------------------------


def test_auto_plan_maps_through_the_parent_mask():
    plan = device_plan("auto", 2, device_count=2)
    assert plan == ["0", "1"]
    assert cuda_masks(plan, "4,5") == ["4", "5"]
    assert cuda_masks(device_plan("auto", 3, device_count=2), "4, 5") == ["4", "5", "4"]


def test_explicit_index_maps_through_the_parent_mask():
    assert cuda_masks(device_plan("1", 1), "4,5") == ["5"]
    assert cuda_masks(device_plan("0,1", 2), "GPU-aaaa,GPU-bbbb") == ["GPU-aaaa", "GPU-bbbb"]
    assert cuda_masks(device_plan("1", 2), "MIG-x,MIG-y") == ["MIG-y", "MIG-y"]


def test_no_parent_mask_gives_plain_indices_and_cpu_workers_no_gpu():
    assert cuda_masks(device_plan("0,3", 3), None) == ["0", "3", "0"]
    assert cuda_masks(device_plan("auto", 2, device_count=0), "4,5") == ["", ""]
    assert cuda_masks(device_plan("cpu", 2), None) == ["", ""]


@pytest.mark.parametrize("parent", ["4,5", "", "GPU-aaaa"])
def test_index_outside_the_parent_mask_is_a_config_error(parent):
    with pytest.raises(ConfigError, match="devices"):
        cuda_masks(device_plan("2", 1), parent)


# ---- the in-process worker's device -----------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "train_device", "count", "expected"),
    [
        ("auto", "cpu", 2, "cpu"),  # train.device wins with devices=auto, GPU or not
        ("auto", "cuda:1", 2, "cuda:1"),
        ("auto", "auto", 2, "cuda:0"),
        ("auto", "auto", 0, "auto"),  # no GPU: train.device=auto resolves to the CPU
        ("auto", "cpu", 0, "cpu"),
        ("1", "cpu", 2, "cuda:1"),  # explicit devices win over train.device
        ("cpu", "cuda:0", 2, "cpu"),
    ],
)
def test_in_process_device(devices, train_device, count, expected):
    first = device_plan(devices, 1, device_count=count)[0]
    assert in_process_device(devices, train_device, first) == expected


# ---- NT-Xent in float32 under autocast -------------------------------------------------------


def bf16_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """The loss as it was: written plainly, so autocast runs its matmul in bf16."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / t).float()
    n = z1.shape[0]
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(2 * n).roll(n))


def test_nt_xent_is_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    # Positive pairs close together, as after some training; bf16-representable inputs, so
    # the autocast run sees exactly the values the fp32 run sees.
    z1 = torch.randn(64, 32, generator=g)
    z2 = z1 + torch.randn(64, 32, generator=g)
    z1, z2 = z1.bfloat16().float(), z2.bfloat16().float()
    t = 0.05
    fp32 = nt_xent(z1, z2, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = nt_xent(z1, z2, t)
        old = bf16_nt_xent(z1, z2, t)
        amp_bf16_inputs = nt_xent(z1.bfloat16(), z2.bfloat16(), t)
    assert amp.dtype == torch.float32
    assert torch.allclose(amp, fp32, rtol=0, atol=1e-6)
    assert torch.allclose(amp_bf16_inputs, fp32, rtol=0, atol=1e-6)
    # Without the fix the difference is real: the test would catch it.
    assert abs(float(old) - float(fp32)) > 1e-4  # about 0.6% of the loss here


# ---- device memory: a failed or pruned trial's Run is gone before the next trial --------

_WATCH_FAILED_TRIALS = """
import gc, json, sys, weakref

import torch

from search import TrialRunner, load_config, open_studies, run_stages


class Exploding(torch.nn.Module):  # fails inside the training step, as running out of memory would
    def forward(self, x):
        raise RuntimeError("boom inside the training step")


class Watching(TrialRunner):
    refs = []
    alive_at_start = []

    def _make_run(self, tcfg, ckpt_dir, fingerprint):
        self.alive_at_start.append(any(ref() is not None for ref in self.refs))
        run = super()._make_run(tcfg, ckpt_dir, fingerprint)
        if ckpt_dir is not None:  # a trial's Run (the baselines' Run trains nothing)
            run.pretrain_aug = Exploding()
            self.refs.append(weakref.ref(run))
        return run


runs_dir = sys.argv[1]
cfg = load_config("quickstart", [
    f"runs_dir={runs_dir}", "stage=screen", "stages.screen.trials=3", "train.max_batches=1",
    "search.space.channels.choices=[4]", "train.knn_max_train=100",
])
runner = Watching(cfg, device="cpu", progress=False)
gc.disable()  # only reference counting or an explicit collection may free a Run
run_stages(open_studies(cfg, f"sqlite:///{runs_dir}/ssl-search.db"), runner, cfg)
print(json.dumps({"alive_at_start": runner.alive_at_start, "runs": len(runner.refs)}))
"""


def test_a_failed_trials_run_is_collected_before_the_next_trial_starts(tmp_path):
    """Every trial's Run raises from deep inside Run.pretrain, and Optuna keeps the exception
    (and through its traceback the training frames) past the trial. In a real worker process
    with the cycle collector off, the next trial checks with a weak reference that the previous
    Run is already gone when it builds its own. (A subprocess: pytest's log capture would keep
    Optuna's failure records, and with them the tracebacks, for its own report.)"""
    import json
    import subprocess
    import sys

    import optuna
    from conftest import REPO_ROOT

    from search import stage_study_name

    script = tmp_path / "watch.py"
    script.write_text(_WATCH_FAILED_TRIALS)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    trials = optuna.load_study(
        study_name=stage_study_name("quickstart", "screen"), storage=url
    ).get_trials()
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) >= 2 and all("boom" in t.user_attrs["fail_reason"] for t in failed)
    assert seen["runs"] >= 2
    assert seen["alive_at_start"] == [False] * len(seen["alive_at_start"])


# ---- out of memory: retried once at half the batch size, only where the study allows it ----


class _OutOfMemoryAbove(torch.nn.Module):
    """An augmentation that runs out of CUDA memory for batches larger than ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]}"
            )
        return x


def _oom_screen(tmp_path, allow: bool):
    import optuna

    from search import TrialRunner, load_config, open_studies, run_stages, stage_study_name

    class Tight(TrialRunner):
        def _make_run(self, tcfg, ckpt_dir, fingerprint):
            run = super()._make_run(tcfg, ckpt_dir, fingerprint)
            if ckpt_dir is not None:
                run.pretrain_aug = _OutOfMemoryAbove(limit=40)
                self.batch_sizes.append(run.cfg.batch_size)
            return run

    cfg = load_config(
        "quickstart",
        [
            f"runs_dir={tmp_path}",
            "stage=screen",
            "stages.screen.trials=1",
            "train.max_batches=1",
            "search.space.channels.choices=[4]",
            "search.space.batch_size.choices=[64]",
            "train.knn_max_train=100",
            f"oom_half_batch={str(allow).lower()}",
        ],
    )
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    runner = Tight(cfg, device="cpu", progress=False)
    runner.batch_sizes = []
    run_stages(open_studies(cfg, url), runner, cfg)
    study = optuna.load_study(study_name=stage_study_name(cfg.name, "screen"), storage=url)
    return study.get_trials(), runner.batch_sizes


def test_out_of_memory_trial_is_retried_once_at_half_the_batch_when_allowed(tmp_path):
    """The first leg trains again at 32 after running out of memory at 64; its continuations
    to the next rungs inherit 32 (their checkpoints were trained with it)."""
    legs, batch_sizes = _oom_screen(tmp_path, allow=True)
    first = legs[0]
    assert first.state.name == "COMPLETE"
    assert first.params["batch_size"] == 64  # the configuration sampled, and what it ran with:
    assert first.user_attrs["oom_batch_size"] == 32
    assert first.user_attrs["oom_reason"].startswith("CUDA out of memory")
    assert len(legs) >= 2, "the quickstart's screen continues a configuration past rung 1"
    assert all(t.state.name == "COMPLETE" for t in legs)
    assert all(t.user_attrs["oom_batch_size"] == 32 for t in legs)
    assert batch_sizes == [64] + [32] * len(legs)  # one retry, then every leg at 32


def test_out_of_memory_trial_fails_with_the_reason_when_not_allowed(tmp_path):
    legs, batch_sizes = _oom_screen(tmp_path, allow=False)
    trial = legs[0]
    assert trial.state.name == "FAIL"
    assert batch_sizes == [64]
    assert trial.user_attrs["fail_reason"].startswith("CUDA out of memory")
    assert "oom_batch_size" not in trial.user_attrs


def test_the_physical_gpu_is_read_through_the_process_mask(monkeypatch):
    from models.training import describe_device, physical_gpu

    assert physical_gpu(1, "4,5") == "5"
    assert physical_gpu(0, "GPU-8f2a,GPU-77c1") == "GPU-8f2a"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert physical_gpu(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    assert physical_gpu(0) == "6"  # a worker launched under the mask 6 trains on GPU 6
    assert describe_device(torch.device("cpu")) == "cpu"


def test_every_launched_worker_gets_its_mask_and_its_share_of_the_cores():
    from search.pool import worker_env

    plan = device_plan("auto", 8, device_count=2)
    masks = cuda_masks(plan, "4,5")
    envs = [worker_env(mask, len(plan), cpu_count=16) for mask in masks]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4", "5"] * 4
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"2"}  # GPU workers too
    assert worker_env("", 4, cpu_count=2)["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize(
    ("train_device", "devices", "plan"),
    [
        ("cpu", "auto", ["cpu", "cpu", "cpu"]),  # was ["0", "1", "0"]: on the GPUs
        ("cuda:1", "auto", ["1", "1", "1"]),
        ("auto", "auto", ["0", "1", "0"]),
        ("cuda", "auto", ["0", "1", "0"]),
        ("cpu", "0,1", ["0", "1", "0"]),  # devices named: they decide
    ],
)
def test_launched_workers_keep_an_explicit_train_device_as_one_worker_does(
    train_device, devices, plan
):
    from omegaconf import OmegaConf

    from search.pool import worker_devices

    cfg = OmegaConf.create({"workers": 3, "devices": devices, "train": {"device": train_device}})
    assert worker_devices(cfg, device_count=2) == plan
    if devices == "auto":  # the one in-process worker follows the same rule
        first = in_process_device(devices, train_device, device_plan(devices, 1, device_count=2)[0])
        assert first == (train_device if train_device != "auto" else "cuda:0")
