"""GPU check: one prepared script for a lent GPU (issue 13), run small on a CPU so CI runs it too.

On synthetic CIFAR-shaped uint8 images (seeded, nothing read or downloaded), with the project's own
code (``models.training.Run``, ``models.augment``, ``models.losses``, ``search.objective``), it
prints:

1. images/second of the model alone (forward + backward + optimizer step on pre-augmented batches
   already on the device: ``benchmarks.throughput.Bench``) and of the loop (``Run.pretrain``'s real
   epochs, ``EpochReport.images_per_second``) for the autoencoder, guided and contrastive tasks,
   and their ratio; interleaved, the best of ``rounds`` rounds after a warm-up epoch;
2. the augmentation alone: the CIFAR contrastive recipe, both views, uint8 -> model input;
3. synchronisations per training step from ``torch.profiler`` over two real contrastive epochs of
   k and 2k batches (k = ``steps``, at most 10; the difference is per step, the rest per epoch):
   CUDA synchronize calls and device-to-host copies; a CPU has no device syncs (0);
4. 1 vs 3 concurrent workers: contrastive ``Run.pretrain`` epochs in 3 processes of this script
   on the same device, first in one of them alone, then in all 3 at once (aggregate images/s);
5. NT-Xent at temperature 0.05: ``nt_xent`` under bf16 autocast and the same formula with bf16
   logits (what autocast computed before ``nt_xent`` kept its logits in fp32) against fp32;
6. resume equality: 2 contrastive epochs straight against 1 epoch, a new ``Run`` resumed from
   its checkpoint, 1 more epoch; with the default settings and with ``train.deterministic=true``
   (on CUDA in a fresh process of this script, so that cuBLAS is configured before first use);
7. memory after a failing trial: a ``search.objective.TrialRunner`` screen trial of
   ``studies/cifar_contrastive.yaml`` (narrowed to these sizes) on a real Optuna study (temporary
   SQLite) that raises inside its second training step's forward; whether its ``Run`` was freed
   when ``study.optimize`` returned and after ``search.objective.release_trial_memory`` (what a
   worker runs between trials), by weak references, and on CUDA ``torch.cuda.memory_allocated``
   before the trial and at both points.

Defaults: on CUDA the report's width (256) and batch sizes (64, 64, 128), 100 steps, 3 rounds
(sized for well under 10 minutes; not yet run on a GPU); on a CPU width 8, batch 32, 3 steps,
2 rounds, 1 thread: about 20 s on 2 cores. Timings are printed, never asserted.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing as mp
import os
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks._common import Option, fmt, log, machine, parse_options, table
from benchmarks.throughput import Bench
from models.checkpoints import load_checkpoint, phase_checkpoint, save_checkpoint
from models.config import ModelConfig, TrainConfig
from models.data import FAMILY_SHAPES, ImageSplits
from models.losses import nt_xent
from models.networks import ProjectionHead
from models.training import Run, resolve_device

TASKS = ("autoencoder", "guided", "contrastive")
REPORT_WIDTH = 256
REPORT_BATCH = {"autoencoder": 64, "guided": 64, "contrastive": 128}  # CIFAR-10's, the report's
CPU_WIDTH = 8
CPU_BATCH = 32
CONCURRENT = 3
TEMPERATURE = 0.05
SYNC_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
)
PROFILED_STEPS = 10  # at most: the profiler's event tree grows with every op of every step


# ---- data and settings ------------------------------------------------------------------------


def synthetic_splits(n_train: int, n_val: int, seed: int = 0) -> ImageSplits:
    """CIFAR-shaped splits of seeded random uint8 images and labels (10 classes), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    shape = FAMILY_SHAPES["cifar"]

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, 10, (n,), generator=g, dtype=torch.int64)

    train_x, val_x, test_x = images(n_train), images(n_val), images(n_val)
    sample = train_x[:1024].to(torch.float32).div_(255.0)
    return ImageSplits(
        family="cifar",
        train_x=train_x,
        train_y=labels(n_train),
        val_x=val_x,
        val_y=labels(n_val),
        test_x=test_x,
        test_y=labels(n_val),
        mean=sample.mean(dim=(0, 2, 3)),
        std=sample.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6),
        classes=[str(c) for c in range(10)],
        normalized=True,
    )


@dataclasses.dataclass
class Sizes:
    """What every section trains: device, width, batch per task, steps per epoch, and so on."""

    device: str
    width: int
    batch: dict[str, int]
    steps: int
    rounds: int
    threads: int
    n_val: int
    bank: int  # train.knn_max_train: the kNN memory bank of each epoch's metric

    def train(self, task: str, **changes: Any) -> TrainConfig:
        base = TrainConfig(
            epochs=1,
            batch_size=self.batch[task],
            max_batches=self.steps,
            progress=False,
            device=self.device,
            knn_max_train=self.bank,
            seed=0,
        )
        return dataclasses.replace(base, **changes)

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(channels=self.width)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1, 2: model alone, loop, augmentation alone ----------------------------------------------


def model_alone(bench: Bench, task: str, batch: int, steps: int) -> float:
    """Images/s of ``steps`` training steps on pre-augmented batches already on the device."""
    ref, s = bench.ref, bench.splits
    raw, y = s.train_x[:batch], s.train_y[:batch]
    with torch.no_grad(), bench.autocast():  # as the loop makes its inputs (under autocast)
        x1 = ref.prepare_images(raw, ref.pretrain_aug)
        x2 = ref.prepare_images(raw, ref.pretrain_aug) if task == "contrastive" else None
    sync(bench.device)
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=bench.device)
    for _ in range(steps):
        loss_sum += bench.step(x1, y, x2)
    float(loss_sum)  # one sync, as the loop's epoch ends with
    return batch * steps / (time.perf_counter() - started)


def throughput(sizes: Sizes, splits: ImageSplits) -> tuple[list[list[Any]], dict[str, Any]]:
    """Section 1 and 2: one table row per task; the contrastive figures for the later sections."""
    rows, kept = [], {}
    for task in TASKS:
        batch = sizes.batch[task]
        log(f"  throughput: {task}, width {sizes.width}, batch {batch}")
        torch.manual_seed(0)
        bench = Bench(task, splits, sizes.model, sizes.train(task))
        model_alone(bench, task, batch, min(sizes.steps, 2))  # warm-up
        if task == "contrastive":
            bench.augment_only(batch, min(sizes.steps, 2))
        found: dict[str, list[float]] = {"model": [], "loop": [], "aug": []}

        def on_epoch(report, bench=bench, task=task, batch=batch, found=found) -> None:
            if report.epoch == 1:
                return  # the loop's warm-up epoch
            found["loop"].append(report.images_per_second)
            found["model"].append(model_alone(bench, task, batch, sizes.steps))
            if task == "contrastive":
                found["aug"].append(bench.augment_only(batch, sizes.steps))

        torch.manual_seed(0)
        run = Run(task, splits, sizes.model, sizes.train(task, epochs=1 + sizes.rounds))
        run.pretrain(on_epoch=on_epoch)
        best_model, best_loop = max(found["model"]), max(found["loop"])
        rows.append(
            [
                task,
                sizes.width,
                batch,
                fmt(best_model),
                fmt(best_loop),
                fmt(best_loop / best_model, 2),
            ]
        )
        if task == "contrastive":
            kept = {"model": best_model, "loop": best_loop, "aug": max(found["aug"])}
        del bench, run
        gc.collect()
    return rows, kept


# ---- 3: synchronisations per step --------------------------------------------------------------


def sync_counts(prof: profile) -> dict[str, int]:
    """CUDA synchronize calls and device-to-host copies (``Memcpy DtoH (...)``, the GPU side of
    an ``.item()``, ``float(tensor)`` or ``.cpu()``) among the profiled events."""
    counts = {"syncs": 0, "dtoh": 0}
    for event in prof.events():
        if event.name in SYNC_CALLS:
            counts["syncs"] += 1
        elif "DtoH" in event.name:
            counts["dtoh"] += 1
    return counts


def syncs_per_step(sizes: Sizes, splits: ImageSplits, device: torch.device) -> str:
    """Section 3: profile contrastive epochs of k and 2k steps; the difference / k is per step."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    k = min(sizes.steps, PROFILED_STEPS)
    found = {}
    for steps in (k, 2 * k):
        log(f"  syncs: profiling a contrastive epoch of {steps} steps")
        torch.manual_seed(0)
        run = Run("contrastive", splits, sizes.model, sizes.train("contrastive", max_batches=steps))
        run.pretrain()  # warm-up (allocator, cuDNN's algorithm choice)
        with profile(activities=activities) as prof:
            run.pretrain()
        found[steps] = sync_counts(prof)
        del run, prof
    per_step = {key: (found[2 * k][key] - found[k][key]) / k for key in found[k]}
    per_epoch = {key: found[k][key] - k * per_step[key] for key in found[k]}
    note = " (CPU: no device syncs)" if device.type != "cuda" else ""
    return (
        f"syncs per training step (contrastive, torch.profiler, epochs of {k} and {2 * k} steps): "
        f"device syncs {fmt(per_step['syncs'], 2)}, DtoH copies {fmt(per_step['dtoh'], 2)}; "
        f"per epoch besides the steps (loss read, kNN metric): device syncs "
        f"{fmt(per_epoch['syncs'])}, DtoH copies {fmt(per_epoch['dtoh'])}{note}"
    )


# ---- 4: concurrent workers ---------------------------------------------------------------------


def _worker(rank: int, spec: dict[str, Any], barrier: Any, results: Any) -> None:
    """One process of the concurrency check (spawned): warm up, then one epoch alone (rank 0
    only), then one epoch with every process at once; puts (rank, images/s alone, (images/s,
    images) together, error)."""
    try:
        torch.set_num_threads(spec["threads"])
        sizes = Sizes(**spec["sizes"])
        splits = synthetic_splits(spec["n_train"], sizes.n_val)
        train = sizes.train("contrastive", seed=rank)
        run = Run("contrastive", splits, sizes.model, train)
        run.pretrain()  # warm-up
        barrier.wait(timeout=spec["timeout"])
        alone = run.pretrain()[-1].images_per_second if rank == 0 else None
        barrier.wait(timeout=spec["timeout"])
        report = run.pretrain()[-1]
        together = (report.images_per_second, report.images_per_second * report.seconds)
        results.put((rank, alone, together, None))
    except BaseException as error:  # tell the parent; free the others from the barrier
        barrier.abort()
        results.put((rank, None, None, f"{type(error).__name__}: {error}"))


def concurrent_workers(sizes: Sizes, n_train: int, device: torch.device) -> dict[str, Any]:
    """Section 4: images/s of 1 process alone and of CONCURRENT processes at once."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    per_process = 1 if device.type != "cuda" else max(1, (os.cpu_count() or 1) // CONCURRENT)
    timeout = 600
    spec = {
        "sizes": dataclasses.asdict(sizes),
        "n_train": n_train,
        "threads": per_process,
        "timeout": timeout,
    }
    barrier, results = ctx.Barrier(CONCURRENT), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(rank, spec, barrier, results), daemon=True)
        for rank in range(CONCURRENT)
    ]
    log(f"  concurrency: {CONCURRENT} processes, {per_process} thread(s) each")
    for p in procs:
        p.start()
    got = [results.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [e for *_, e in got if e]
    if errors:
        raise RuntimeError(f"a concurrency worker failed: {errors[0]}")
    alone = next(a for _, a, _, _ in got if a is not None)
    together = [t for _, _, t, _ in sorted(got, key=lambda r: r[0])]
    # In all: every process's images over the longest epoch (they start together at the
    # barrier), so a process that finished early does not count as running at its own rate.
    images = sum(n for _, n in together)
    longest = max(n / rate for rate, n in together)
    return {
        "alone": alone,
        "each": [rate for rate, _ in together],
        "total": images / longest,
        "threads": per_process,
    }


# ---- 5: NT-Xent in bf16 and fp32 ---------------------------------------------------------------


def bf16_logits_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent's formula under bf16 autocast without ``nt_xent``'s fp32 region: bf16 logits."""
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, dtype=torch.bfloat16):
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        logits = z @ z.T / t
        mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(mask, float("-inf"))
        targets = torch.arange(2 * n, device=z.device).roll(n)
        return F.cross_entropy(logits, targets)


def loss_and_grad(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z1: torch.Tensor, z2: torch.Tensor
) -> tuple[float, torch.Tensor]:
    a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    loss = fn(a, b)
    loss.backward()
    return float(loss.detach()), torch.cat([a.grad, b.grad]).float()


def bf16_error(device: torch.device, n: int, dim: int = 128) -> str:
    """Section 5: relative errors of the loss and its gradient against fp32."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, dim, generator=g)
    # Positives at cosine ~0.24, negatives ~0 +- 0.09: a loss near 1, as early in training.
    z2 = z1 + 4.0 * torch.randn(n, dim, generator=g)
    z1, z2 = z1.to(device), z2.to(device)

    def under_autocast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return nt_xent(a, b, TEMPERATURE)

    ref, ref_grad = loss_and_grad(lambda a, b: nt_xent(a, b, TEMPERATURE), z1, z2)
    out = []
    for fn in (under_autocast, lambda a, b: bf16_logits_nt_xent(a, b, TEMPERATURE)):
        loss, grad = loss_and_grad(fn, z1, z2)
        rel = abs(loss - ref) / abs(ref)
        rel_grad = float((grad - ref_grad).norm() / ref_grad.norm())
        out.append(f"{rel:.2e} (gradient {rel_grad:.2e})")
    return (
        f"NT-Xent at temperature {TEMPERATURE}, {n} pairs, relative error to fp32 (loss {ref:.4f}): "
        f"nt_xent under bf16 autocast {out[0]}; bf16 logits {out[1]}"
    )


# ---- 6: resume equality ------------------------------------------------------------------------


def resume_equality(sizes: Sizes, splits: ImageSplits, **changes: Any) -> tuple[float, bool]:
    """Max abs difference of the pretrained weights, and whether they are bitwise equal."""
    train = sizes.train("contrastive", epochs=2, **changes)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        straight = Run("contrastive", splits, sizes.model, train, checkpoint_dir=Path(tmp, "a"))
        straight.pretrain()
        first = Run("contrastive", splits, sizes.model, train, checkpoint_dir=Path(tmp, "b"))
        first.pretrain(stop_at=1)
        del first
        resumed = Run("contrastive", splits, sizes.model, train, checkpoint_dir=Path(tmp, "b"))
        resumed.pretrain()
        worst, same = 0.0, True
        for name, module in straight.pretrain_modules().items():
            other = resumed.pretrain_modules()[name].state_dict()
            for key, value in module.state_dict().items():
                same = same and torch.equal(value, other[key])
                if value.is_floating_point():
                    worst = max(worst, float((value - other[key]).abs().max()))
    return worst, same


def epoch_costs(sizes: Sizes, splits: ImageSplits) -> str:
    """What the service adds to a contrastive epoch: the kNN metric over ``sizes.bank`` train
    embeddings, and the checkpoint, on the training thread with the background writer against
    the synchronous write (``save_checkpoint``: torch.save + fsync) of the same file."""
    train = sizes.train("contrastive", epochs=3)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        run = Run("contrastive", splits, sizes.model, train, checkpoint_dir=Path(tmp))
        reports = run.pretrain()
        path = phase_checkpoint(tmp, "pretrain")
        state = load_checkpoint(path)
        megabytes = path.stat().st_size / 1e6
        started = time.perf_counter()
        save_checkpoint(Path(tmp, "again.pt"), state)
        synchronous = time.perf_counter() - started
    median = sorted(reports[1:], key=lambda r: r.seconds)[len(reports[1:]) // 2]
    return (
        f"per-epoch costs (contrastive, epoch {median.epoch} of {len(reports)}): training "
        f"{median.seconds:.3f}s; kNN metric over a {sizes.bank:,}-image bank "
        f"{median.eval_seconds:.3f}s; checkpoint {megabytes:.1f} MB: "
        f"{median.checkpoint_seconds * 1000:.1f} ms on the training thread (background "
        f"writer) vs {synchronous * 1000:.1f} ms written synchronously"
    )


def _resume_worker(spec: dict[str, Any], results: Any) -> None:
    """:func:`resume_equality` in a fresh process (spawned): on CUDA, ``train.deterministic``
    must configure cuBLAS before its first use in the process."""
    try:
        torch.set_num_threads(spec["threads"])
        sizes = Sizes(**spec["sizes"])
        splits = synthetic_splits(spec["n_train"], sizes.n_val)
        results.put((resume_equality(sizes, splits, **spec["changes"]), None))
    except BaseException as error:
        results.put((None, f"{type(error).__name__}: {error}"))


def resume_in_fresh_process(sizes: Sizes, n_train: int, **changes: Any) -> tuple[float, bool]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    spec = {
        "sizes": dataclasses.asdict(sizes),
        "n_train": n_train,
        "threads": torch.get_num_threads(),
        "changes": changes,
    }
    proc = ctx.Process(target=_resume_worker, args=(spec, results), daemon=True)
    proc.start()
    found, error = results.get(timeout=600)
    proc.join(timeout=60)
    if error:
        raise RuntimeError(f"the resume check's process failed: {error}")
    return found


# ---- 7: memory after a failing trial ------------------------------------------------------------


def failing_trial(sizes: Sizes, splits: ImageSplits, device: torch.device) -> str:
    """Section 7: a TrialRunner trial that raises in its second training step's forward, run by
    a real Optuna study; then whether its Run is still alive and what device memory is held."""
    import optuna

    from search import TrialRunner, load_config
    from search.objective import release_trial_memory

    class SyntheticRunner(TrialRunner):
        @property
        def splits(self) -> ImageSplits:  # the synthetic images instead of the study's data
            return splits

    refs: list[weakref.ref] = []
    calls = 0

    def explode(module: torch.nn.Module, args: Any, output: Any) -> None:
        nonlocal calls
        if isinstance(module, ProjectionHead) and module.training and torch.is_grad_enabled():
            calls += 1
            if calls == 2:  # step 1 done (gradients, optimizer state), step 2's activations live
                refs.extend(weakref.ref(o) for o in gc.get_objects() if isinstance(o, Run))
                raise RuntimeError("gpu_check: simulated failure inside the training step")

    # The trial's failure is expected: no traceback from Optuna's log, no experimental notes.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        batch = sizes.batch["contrastive"]
        cfg = load_config(
            "cifar_contrastive",
            [
                f"runs_dir={tmp}",
                "stage=screen",
                f"search.space.channels.choices=[{sizes.width}]",
                f"search.space.batch_size.choices=[{batch}]",
                f"train.max_batches={sizes.steps}",
                f"train.knn_max_train={sizes.bank}",
                f"train.device={device}",
            ],
        )
        runner = SyntheticRunner(cfg, device=str(device), progress=False)
        study = optuna.create_study(
            storage=f"sqlite:///{Path(tmp, 'gpu_check.db')}",
            study_name="gpu_check.screen",
            direction="maximize",
        )
        gc.collect()
        cuda = device.type == "cuda"
        before = torch.cuda.memory_allocated(device) if cuda else 0
        hook = torch.nn.modules.module.register_module_forward_hook(explode)
        try:
            study.optimize(runner.objective("screen"), n_trials=1, catch=(Exception,))
        finally:
            hook.remove()
        trial = study.trials[-1]
        # Right after the trial returned: no collection of ours yet.
        alive = sum(r() is not None for r in refs)
        after = torch.cuda.memory_allocated(device) if cuda else 0
        release_trial_memory(raised=True)  # what the worker runs after a trial that raised
        alive_gc = sum(r() is not None for r in refs)
        after_gc = torch.cuda.memory_allocated(device) if cuda else 0
        reason = str(trial.user_attrs.get("fail_reason") or "")[:70]
        del study, runner

    def yes(n_alive: int) -> str:
        return "yes" if refs and n_alive == 0 else "no"

    line = (
        f"memory after a failing trial (TrialRunner, Optuna study on SQLite; trial "
        f"{trial.state.name}: {reason}): Run freed when study.optimize returned: {yes(alive)} "
        f"({alive} of {len(refs)} alive), after the worker's release_trial_memory: "
        f"{yes(alive_gc)} ({alive_gc} alive)"
    )
    if cuda:
        mib = 2**20
        line += (
            f"; torch.cuda.memory_allocated before {before / mib:,.1f} MiB, after the trial "
            f"{after / mib:,.1f} MiB, after the release {after_gc / mib:,.1f} MiB"
        )
    else:
        line += " (CPU: no device memory)"
    return line


# ---- main --------------------------------------------------------------------------------------


def main() -> int:
    opts = parse_options(
        "python -m benchmarks.gpu_check",
        __doc__.split("\n\n")[0],
        {
            "device": Option(
                "auto", str, "auto (cuda if available, else cpu) | cpu | cuda | cuda:N"
            ),
            "width": Option(
                0, int, f"model.channels; 0 = {REPORT_WIDTH} on CUDA, {CPU_WIDTH} on CPU"
            ),
            "batch": Option(0, int, f"batch size; 0 = the report's on CUDA, {CPU_BATCH} on CPU"),
            "steps": Option(0, int, "training steps per measured epoch; 0 = 100 on CUDA, 3 on CPU"),
            "rounds": Option(0, int, "measured rounds of section 1; 0 = 3 on CUDA, 2 on CPU"),
            "threads": Option(0, int, "torch CPU threads; 0 = torch's default on CUDA, 1 on CPU"),
        },
        epilog="examples:\n  python -m benchmarks.gpu_check                  # on a GPU machine\n"
        "  python -m benchmarks.gpu_check device=cpu width=4 batch=16 steps=2 rounds=1",
    )
    started = time.perf_counter()
    device = resolve_device(opts["device"], "device")
    cuda = device.type == "cuda"
    if opts["threads"] or not cuda:
        torch.set_num_threads(opts["threads"] or 1)
    width = opts["width"] or (REPORT_WIDTH if cuda else CPU_WIDTH)
    if opts["batch"]:
        batch = dict.fromkeys(TASKS, opts["batch"])
    else:
        batch = dict(REPORT_BATCH) if cuda else dict.fromkeys(TASKS, CPU_BATCH)
    steps = opts["steps"] or (100 if cuda else 3)
    sizes = Sizes(
        device=str(device),
        width=width,
        batch=batch,
        steps=steps,
        rounds=opts["rounds"] or (3 if cuda else 2),
        threads=torch.get_num_threads(),
        n_val=512 if cuda else 64,
        bank=1024 if cuda else 64,
    )
    # Enough for an epoch of ``steps`` batches and for section 3's epoch of 2k.
    n_train = max(batch.values()) * max(steps, 2 * min(steps, PROFILED_STEPS))
    splits = synthetic_splits(n_train, sizes.n_val)
    print(
        f"gpu_check: device {device}, width {width}, batch "
        f"{'/'.join(str(batch[t]) for t in TASKS)} ({', '.join(TASKS)}), {steps} steps per "
        f"epoch, best of {sizes.rounds} rounds; synthetic CIFAR-shaped uint8 data "
        f"({n_train:,} train images)"
    )
    amp = "bf16 autocast, channels_last" if cuda else "fp32, NCHW"
    print(f"machine: {machine(device)}; {amp} (as Run chooses)")

    log(f"[{time.perf_counter() - started:5.1f}s] 1-2 throughput")
    rows, contrastive = throughput(sizes, splits)
    print("\nthroughput, images/second (model alone: pre-augmented batches on the device)")
    print(table(["task", "width", "batch", "model alone", "loop", "loop/model"], rows))
    print(
        f"augmentation alone (cifar contrastive recipe, two views, uint8 -> model input): "
        f"{fmt(contrastive['aug'])} images/s"
    )

    log(f"[{time.perf_counter() - started:5.1f}s] 3 syncs")
    print(syncs_per_step(sizes, splits, device))

    log(f"[{time.perf_counter() - started:5.1f}s] 4 concurrent workers")
    workers = concurrent_workers(sizes, n_train, device)
    total = workers["total"]
    each = ", ".join(fmt(v) for v in workers["each"])
    print(
        f"concurrent workers (contrastive, same device, {workers['threads']} thread(s) each): "
        f"1 process {fmt(workers['alone'])} images/s; {CONCURRENT} processes {fmt(total)} "
        f"images/s in all (each: {each}); ratio {CONCURRENT}/1 {fmt(total / workers['alone'], 2)}"
    )
    model = contrastive["model"]
    one, three = contrastive["loop"] / model, total / model
    verdict = "met" if max(one, three) >= 0.8 else "not met"
    print(
        f"goal, contrastive loop >= 0.8 x model alone ({fmt(model)} images/s): 1 worker "
        f"{fmt(one, 2)}, {CONCURRENT} workers in all {fmt(three, 2)}: {verdict}"
    )

    log(f"[{time.perf_counter() - started:5.1f}s] 5 bf16 vs fp32")
    print(bf16_error(device, batch["contrastive"]))

    log(f"[{time.perf_counter() - started:5.1f}s] 6 resume equality")
    variants = [("default settings", {})]
    if "deterministic" in {f.name for f in dataclasses.fields(TrainConfig)}:
        variants.append(("train.deterministic=true", {"deterministic": True}))
    for label, changes in variants:
        if cuda and changes:  # a fresh process: cuBLAS is configured before its first use
            worst, same = resume_in_fresh_process(sizes, n_train, **changes)
        else:
            worst, same = resume_equality(sizes, splits, **changes)
        print(
            f"resume equality, {label} (2 epochs straight vs 1 + resume from checkpoint + 1): "
            f"max abs weight difference {worst:.3g}, bitwise equal: {'yes' if same else 'no'}"
        )

    log(f"[{time.perf_counter() - started:5.1f}s] 7 per-epoch costs")
    print(epoch_costs(sizes, splits))

    log(f"[{time.perf_counter() - started:5.1f}s] 8 failing trial")
    print(failing_trial(sizes, splits, device))
    elapsed = time.perf_counter() - started
    print(f"total time {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
