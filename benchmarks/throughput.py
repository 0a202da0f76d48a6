"""Training throughput (images/second) of the project's loop against two references.

For each task on each dataset, at one network width and the report's batch size:

(a) ceiling: the model's forward + backward + optimizer step on one batch already on the device,
    no augmentation (contrastive: the same two-view forward as the real loop, both views the
    same pre-made tensor);
(b) the project's loop: ``models.training.Run.pretrain`` with its batch augmentation, read from
    ``EpochReport.images_per_second`` (one warm-up epoch first, ``max_batches`` per epoch);
(c) a naive course-project pipeline: the same recipe as torchvision per-image transforms in a
    ``DataLoader`` over a Dataset of PIL images (``num_workers`` 0 and 2), then the same step;
(d) for reference, the loop's input pipeline alone (uint8 batch -> augmented, normalized input;
    both views for contrastive): roughly, 1/(b) = 1/(a) + 1/(d).

Measurements are interleaved: after each epoch of (b), one pass of (a) and of each (c) runs, so
load from other processes hits all of them alike. The table shows the best round of each (the
least disturbed by other processes; ``stat=median`` shows medians instead).
On CUDA the references use bf16 autocast and channels_last exactly as ``Run`` does.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks._common import (
    Option,
    boolean,
    cifar_available,
    csv,
    csv_int,
    default_data_root,
    fmt,
    log,
    machine,
    median,
    mnist_available,
    parse_options,
    table,
)
from models.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from models.data import ImageSplits, load_splits
from models.losses import nt_xent
from models.optim import build_optimizer
from models.training import DEFAULT_TEMPERATURE, EpochReport, Run, resolve_device

TASKS = ("autoencoder", "guided", "contrastive")
DATASETS = ("mnist", "cifar10")
# The report's batch size per (dataset, task).
REPORT_BATCH = {
    ("mnist", "autoencoder"): 64,
    ("mnist", "guided"): 32,
    ("mnist", "contrastive"): 48,
    ("cifar10", "autoencoder"): 64,
    ("cifar10", "guided"): 64,
    ("cifar10", "contrastive"): 128,
}
REPORT_WIDTH = 256
CPU_WIDTH = 16


# ---- (c) the naive pipeline -----------------------------------------------------------------


def naive_transform(family: str, recipe: str, splits: ImageSplits, version: str) -> Callable:
    """The report's recipe as a typical course project writes it: per-image torchvision ops."""
    if version == "v2":
        from torchvision.transforms import v2 as T

        to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    else:
        import torchvision.transforms as T

        to_tensor = [T.ToTensor()]
    size = 28 if family == "mnist" else 32
    ops: list[Any] = []
    if family == "mnist" and recipe == "contrastive":
        ops = [
            T.RandomResizedCrop(size, scale=(0.6, 1.0)),
            T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
        ]
    elif family == "cifar" and recipe == "encoder":
        ops = [
            T.RandomResizedCrop(size, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(0.5),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.2),
        ]
    elif family == "cifar" and recipe == "contrastive":
        ops = [
            T.RandomResizedCrop(size, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.5),
            T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
        ]
    post: list[Any] = []
    if splits.normalized:
        post = [T.Normalize(splits.mean.tolist(), splits.std.tolist())]
    return T.Compose([*ops, *to_tensor, *post])


class PILImages(Dataset):
    """A course project's Dataset: PIL images in memory, a per-image transform, two views for
    SimCLR."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable, views: int) -> None:
        arrays = x.permute(0, 2, 3, 1).numpy()
        if arrays.shape[-1] == 1:
            self.images = [Image.fromarray(a[:, :, 0]) for a in arrays]
        else:
            self.images = [Image.fromarray(a) for a in arrays]
        self.labels = y.tolist()
        self.transform = transform
        self.views = views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.images[i]
        if self.views == 2:
            return (self.transform(img), self.transform(img)), self.labels[i]
        return self.transform(img), self.labels[i]


# ---- one row of the table -------------------------------------------------------------------


@dataclass
class Row:
    dataset: str
    task: str
    width: int
    batch: int
    ceiling: list[float] = field(default_factory=list)
    loop: list[float] = field(default_factory=list)
    augment: list[float] = field(default_factory=list)
    ceiling_bf16: list[float] = field(default_factory=list)
    naive: dict[int, list[float]] = field(default_factory=dict)
    note: str = ""


class Bench:
    """The model step of (a) and (c) on one set of networks, placed as ``Run`` places them."""

    def __init__(self, task: str, splits: ImageSplits, model: ModelConfig, train: TrainConfig):
        self.task = task
        self.ref = Run(task, splits, model, train)  # networks, device, amp, channels_last
        self.device = self.ref.device
        self.splits = self.ref.splits
        modules = self.ref.pretrain_modules()
        for m in modules.values():
            m.train()
        self.nets = self.ref.nets
        self.params = [p for m in modules.values() for p in m.parameters()]
        self.optimizer = build_optimizer(self.params, OptimConfig())
        self.temperature = train.temperature or DEFAULT_TEMPERATURE[splits.family]
        self.force_bf16 = False  # (a) with bf16 autocast even where Run would not use it

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not (self.ref.amp or self.force_bf16):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.ref.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def loss(self, x: torch.Tensor, y: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
        nets = self.nets
        if self.task == "autoencoder":
            return F.l1_loss(nets.decoder(nets.encoder(x)).float(), x.float())
        if self.task == "guided":
            return F.cross_entropy(nets.classifier(nets.encoder(x)).float(), y)
        views = torch.cat([x, x if x2 is None else x2])
        z1, z2 = nets.projection(nets.encoder(views)).float().chunk(2)
        return nt_xent(z1, z2, self.temperature)

    def step(self, x: torch.Tensor, y: torch.Tensor, x2: torch.Tensor | None = None):
        with self.autocast():
            loss = self.loss(x, y, x2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().float()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ceiling(self, batch: int, batches: int, bf16: bool = False) -> float:
        """(a): images/s of ``batches`` steps on one pre-made, un-augmented device batch
        (``bf16``: under bf16 autocast, also on the CPU, which ``Run`` keeps in fp32)."""
        self.force_bf16 = bf16
        try:
            return self._ceiling(batch, batches)
        finally:
            self.force_bf16 = False

    def _ceiling(self, batch: int, batches: int) -> float:
        s = self.splits
        x = self.layout(s.normalize(s.to_float(s.train_x[:batch])))
        y = s.train_y[:batch]
        self.sync()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(batches):
            loss_sum += self.step(x, y)
        float(loss_sum)  # one sync, as the real loop does
        return batch * batches / (time.perf_counter() - started)

    def augment_only(self, batch: int, batches: int) -> float:
        """(d): images/s of the loop's input pipeline alone (uint8 batch -> augmented model input,
        both views for contrastive), to show what (b) pays on top of (a)."""
        s, augment = self.splits, self.ref.pretrain_aug
        views = 2 if self.task == "contrastive" else 1
        x = s.train_x[:batch]
        self.sync()
        started = time.perf_counter()
        with self.autocast():
            for _ in range(batches):
                for _ in range(views):
                    self.layout(s.normalize(augment(s.to_float(x))))
        self.sync()
        return batch * batches / (time.perf_counter() - started)

    def naive(self, loader: DataLoader) -> float:
        """(c): images/s of one pass over ``loader`` (per-image transforms) plus the step."""
        self.sync()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        images = 0
        pin = self.device.type == "cuda"
        for xb, yb in loader:
            yb = yb.to(self.device, non_blocking=pin)
            if isinstance(xb, list | tuple):  # two views
                x1 = self.layout(xb[0].to(self.device, non_blocking=pin))
                x2 = self.layout(xb[1].to(self.device, non_blocking=pin))
                loss_sum += self.step(x1, yb, x2)
                images += len(x1)
            else:
                x = self.layout(xb.to(self.device, non_blocking=pin))
                loss_sum += self.step(x, yb)
                images += len(x)
        float(loss_sum)
        return images / (time.perf_counter() - started)


def load_dataset(name: str, root: str, n_train: int) -> tuple[ImageSplits, str]:
    """Splits with a train subset of ``n_train`` images; digits stands in for a missing MNIST."""
    note = ""
    if name == "mnist" and not mnist_available(root):
        name, note = "digits", "digits (MNIST not found)"
    data = DataConfig(
        name=name,
        root=root,
        train_subset=n_train,
        val_subset=256,
        test_subset=64,
    )
    return load_splits(data), note


def measure_row(
    dataset: str,
    task: str,
    splits: ImageSplits,
    opts: dict[str, Any],
    width: int,
    batch: int,
) -> Row:
    batches, rounds = opts["batches"], opts["rounds"]
    row = Row(dataset, task, width, batch)
    model = ModelConfig(channels=width)
    knn = min(512, len(splits.train_y))
    train = TrainConfig(
        epochs=rounds + 1,
        batch_size=batch,
        max_batches=batches,
        progress=False,
        device=opts["device"],
        amp=opts["amp"],
        channels_last=opts["channels_last"],
        knn_max_train=knn,
        seed=0,
    )
    torch.manual_seed(0)
    bench = Bench(task, splits, model, train)
    recipe = "contrastive" if task == "contrastive" else "encoder"
    transform = naive_transform(splits.family, recipe, splits, opts["transforms"])
    n = batch * batches
    dataset_obj = PILImages(
        splits.train_x[:n].cpu(),
        splits.train_y[:n].cpu(),
        transform,
        views=2 if task == "contrastive" else 1,
    )
    loaders = {
        nw: DataLoader(
            dataset_obj,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=nw,
            persistent_workers=nw > 0,
            pin_memory=bench.device.type == "cuda",
        )
        for nw in opts["workers"]
    }
    # Warm-up: one pass of each reference (allocator, kernels, worker processes).
    bench.ceiling(batch, batches)
    bench.augment_only(batch, batches)
    if opts["bf16_ceiling"]:
        bench.ceiling(batch, batches, bf16=True)
    for loader in loaders.values():
        bench.naive(loader)
    row.naive = {nw: [] for nw in loaders}

    def on_epoch(report: EpochReport) -> None:
        if report.epoch == 1:
            return  # the loop's warm-up epoch
        row.loop.append(report.images_per_second)
        row.ceiling.append(bench.ceiling(batch, batches))
        row.augment.append(bench.augment_only(batch, batches))
        if opts["bf16_ceiling"]:
            row.ceiling_bf16.append(bench.ceiling(batch, batches, bf16=True))
        for nw, loader in loaders.items():
            row.naive[nw].append(bench.naive(loader))
        if not opts["quiet"]:
            naive = " ".join(f"c{nw} {v[-1]:.0f}" for nw, v in row.naive.items())
            log(
                f"    round {report.epoch - 1}: b {row.loop[-1]:.0f} a {row.ceiling[-1]:.0f} "
                f"d {row.augment[-1]:.0f} {naive}"
            )

    torch.manual_seed(0)
    run = Run(task, splits, model, train)
    run.pretrain(on_epoch=on_epoch)
    return row


def ratio(num: float | None, den: float | None) -> str:
    return fmt(num / den, 2) if num and den else "-"


def paired(num: list[float], den: list[float]) -> str:
    """Median and range of the per-round ratios num[i] / den[i]."""
    values = sorted(n / d for n, d in zip(num, den, strict=False) if d)
    if not values:
        return "-"
    return f"{median(values):.2f} [{values[0]:.2f}-{values[-1]:.2f}]"


def main() -> int:
    opts = parse_options(
        "python -m benchmarks.throughput",
        __doc__.split("\n\n")[0],
        {
            "device": Option("auto", str, "auto | cpu | cuda | cuda:N"),
            "channels": Option(0, int, f"width; 0 = {REPORT_WIDTH} on CUDA, {CPU_WIDTH} on CPU"),
            "batches": Option(0, int, "batches per measurement; 0 = 50 on CUDA, 4 on CPU"),
            "rounds": Option(10, int, "measured rounds, interleaved, after a warm-up round"),
            "stat": Option("best", str, "best | median: which round each cell shows"),
            "tasks": Option(",".join(TASKS), csv, "comma-separated tasks"),
            "datasets": Option(",".join(DATASETS), csv, "comma-separated: mnist, cifar10"),
            "batch": Option(0, int, "batch size; 0 = the report's per task and dataset"),
            "workers": Option("0,2", csv_int, "DataLoader num_workers of the naive pipeline"),
            "transforms": Option("v1", str, "naive pipeline: torchvision.transforms v1 or v2"),
            "amp": Option("auto", str, "auto (bf16 on CUDA) | off | bf16, as train.amp"),
            "channels_last": Option("auto", str, "auto (on CUDA) | on | off"),
            "bf16_ceiling": Option(
                False, boolean, "also time (a) under bf16 autocast (on CPU too): is it faster?"
            ),
            "threads": Option(0, int, "torch CPU threads; 0 = torch's default"),
            "data_root": Option(default_data_root(), str, "where MNIST/ and cifar10-jpeg/ are"),
            "quiet": Option(False, boolean, "no progress lines on stderr"),
        },
        epilog="examples:\n  python -m benchmarks.throughput\n"
        "  python -m benchmarks.throughput device=cuda channels=256 batches=100\n"
        "  python -m benchmarks.throughput tasks=contrastive datasets=cifar10 channels=64",
    )
    for t in opts["tasks"]:
        if t not in TASKS:
            raise SystemExit(f"error: tasks: unknown task {t!r}; allowed: {', '.join(TASKS)}")
    for d in opts["datasets"]:
        if d not in DATASETS:
            raise SystemExit(f"error: datasets: unknown {d!r}; allowed: {', '.join(DATASETS)}")
    if opts["transforms"] not in ("v1", "v2"):
        raise SystemExit("error: transforms: allowed: v1, v2")
    if opts["stat"] not in ("best", "median"):
        raise SystemExit("error: stat: allowed: best, median")
    pick = max if opts["stat"] == "best" else median
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    device = resolve_device(opts["device"])
    opts["device"] = str(device)
    on_cuda = device.type == "cuda"
    width = opts["channels"] or (REPORT_WIDTH if on_cuda else CPU_WIDTH)
    opts["batches"] = opts["batches"] or (50 if on_cuda else 4)
    quiet = opts["quiet"]
    started = time.perf_counter()

    rows: list[Row] = []
    for dataset in opts["datasets"]:
        if dataset == "cifar10" and not cifar_available(opts["data_root"]):
            log(f"skipping cifar10: not found under {opts['data_root']}")
            continue
        max_batch = max(
            opts["batch"] or REPORT_BATCH[(dataset, t)] for t in opts["tasks"]
        )  # one subset serves every task of the dataset
        n_train = max(max_batch * opts["batches"], 1024)
        splits, note = load_dataset(dataset, opts["data_root"], n_train)
        for task in opts["tasks"]:
            batch = opts["batch"] or REPORT_BATCH[(dataset, task)]
            if not quiet:
                log(
                    f"[{time.perf_counter() - started:6.1f}s] {dataset} {task}: width {width}, "
                    f"batch {batch}, {opts['batches']} batches x {opts['rounds']} rounds"
                )
            row = measure_row(dataset, task, splits, opts, width, batch)
            gc.collect()  # the row's networks and DataLoader worker processes go away
            row.note = note
            rows.append(row)

    workers = opts["workers"]
    headers = ["dataset", "task", "width", "batch", "(a) ceiling", "(b) loop"]
    headers += [f"(c) naive nw={nw}" for nw in workers]
    headers += ["(d) aug only", "(b)/(a)"] + [f"(b)/(c) nw={nw}" for nw in workers]
    if opts["bf16_ceiling"]:
        headers += ["(a) bf16 autocast", "(a) bf16/(a)"]
    out_rows, paired_rows = [], []
    for r in rows:
        a, b = pick(r.ceiling), pick(r.loop)
        cs = [pick(r.naive[nw]) for nw in workers]
        name = r.note or r.dataset
        out_rows.append(
            [
                name,
                r.task,
                r.width,
                r.batch,
                fmt(a),
                fmt(b),
                *(fmt(c) for c in cs),
                fmt(pick(r.augment)),
                ratio(b, a),
                *(ratio(b, c) for c in cs),
            ]
        )
        if opts["bf16_ceiling"]:
            a16 = pick(r.ceiling_bf16)
            out_rows[-1] += [fmt(a16), ratio(a16, a)]
        paired_rows.append(
            [
                name,
                r.task,
                paired(r.loop, r.ceiling),
                *(paired(r.loop, r.naive[nw]) for nw in workers),
            ]
        )
    elapsed = time.perf_counter() - started
    print(
        f"\nthroughput, images/second ({opts['stat']} of {opts['rounds']} interleaved rounds x "
        f"{opts['batches']} batches), device {device}"
    )
    amp = "bf16 autocast" if on_cuda and opts["amp"] in ("auto", "bf16") else "fp32"
    layout = (
        "channels_last"
        if opts["channels_last"] == "on" or (opts["channels_last"] == "auto" and on_cuda)
        else "contiguous (NCHW)"
    )
    print(
        f"machine: {machine(device)}; {amp}, {layout}; naive transforms "
        f"torchvision {opts['transforms']}"
    )
    print(table(headers, out_rows))
    print(
        "\nthe same ratios per round (each (b) epoch against the (a) and (c) passes that "
        "follow it): median [min-max]"
    )
    print(
        table(["dataset", "task", "(b)/(a)", *(f"(b)/(c) nw={nw}" for nw in workers)], paired_rows)
    )
    print("goals: (b)/(a) >= 0.9 on every row; on a GPU (b)/(c) >= 3 for contrastive cifar10")
    print(f"total time {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
