"""The GPU check (benchmarks/gpu_check.py) in its small CPU version: every line, with its numbers.

It is run as a user runs it, ``python -m benchmarks.gpu_check`` in a subprocess (it starts worker
processes of its own); nothing about timings is asserted, only that each measurement is printed.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import run_module

NUM = r"[\d,]+(?:\.\d+)?"
SCI = r"\d+(?:\.\d+)?(?:e[+-]\d+)?"


def run_check(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # the CPU version, GPU or not
    return run_module("benchmarks.gpu_check", *args, timeout=timeout, CUDA_VISIBLE_DEVICES="")


def test_help_lists_the_options() -> None:
    out = run_check("--help")
    assert out.returncode == 0, out.stderr
    for option in ("device=auto", "width=0", "batch=0", "steps=0", "rounds=0", "threads=0"):
        assert option in out.stdout


@pytest.mark.slow
def test_cpu_version_prints_every_measurement() -> None:
    out = run_check("device=cpu", "width=4", "batch=16", "steps=2", "rounds=1")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    expected = {
        "header": r"^gpu_check: device cpu, width 4, batch 16/16/16 ",
        "augmentation": rf"^augmentation alone \(cifar contrastive recipe, two views.*\): {NUM} images/s$",
        "syncs": (
            r"^syncs per training step \(contrastive, torch\.profiler, epochs of 2 and 4 steps\): "
            r"device syncs 0\.00, DtoH copies 0\.00; per epoch besides the steps .*: "
            r"device syncs 0, DtoH copies 0 \(CPU: no device syncs\)$"
        ),
        "workers": (
            rf"^concurrent workers \(contrastive, same device, 1 thread\(s\) each\): 1 process "
            rf"{NUM} images/s; 3 processes {NUM} images/s in all \(each: {NUM}, {NUM}, {NUM}\); "
            rf"ratio 3/1 {NUM}$"
        ),
        "goal": rf"^goal, contrastive loop >= 0\.8 x model alone .*: 1 worker {NUM}, "
        rf"3 workers in all {NUM}: (met|not met)$",
        "bf16": (
            rf"^NT-Xent at temperature 0\.05, 16 pairs, relative error to fp32 \(loss {NUM}\): "
            rf"nt_xent under bf16 autocast {SCI} \(gradient {SCI}\); "
            rf"bf16 logits {SCI} \(gradient {SCI}\)$"
        ),
        "resume": (
            r"^resume equality, default settings \(2 epochs straight vs 1 \+ resume from "
            r"checkpoint \+ 1\): max abs weight difference 0, bitwise equal: yes$"
        ),
        "resume deterministic": (
            r"^resume equality, train\.deterministic=true \(2 epochs straight vs 1 \+ resume "
            r"from checkpoint \+ 1\): max abs weight difference 0, bitwise equal: yes$"
        ),
        "epoch costs": (
            rf"^per-epoch costs \(contrastive, epoch \d of 3\): training {NUM}s; kNN metric over "
            rf"a {NUM}-image bank {NUM}s; checkpoint {NUM} MB: {NUM} ms on the training thread "
            rf"\(background writer\) vs {NUM} ms written synchronously$"
        ),
        "memory": (
            r"^memory after a failing trial \(TrialRunner, Optuna study on SQLite; trial FAIL: "
            r"RuntimeError: gpu_check: simulated failure inside the training step\): "
            r"Run freed when study\.optimize returned: (yes|no) \(\d+ of [1-9]\d* alive\), "
            r"after the worker's release_trial_memory: yes \(0 alive\) "
            r"\(CPU: no device memory\)$"
        ),
        "total": r"^total time \d+s$",
    }
    for task in ("autoencoder", "guided", "contrastive"):
        expected[task] = rf"^\|\s+{task} \|\s+4 \|\s+16 \|\s+{NUM} \|\s+{NUM} \|\s+{NUM} \|$"
    missing = [key for key, pattern in expected.items() if not re.search(pattern, text, re.M)]
    assert not missing, f"lines missing or without their numbers: {missing}\n{text}"
