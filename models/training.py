"""The report's three training tasks, as one small loop over device-resident data.

A :class:`Run` holds one configuration: the splits (uint8 tensors on the training device), the
networks, and two phases that share a single epoch loop:

``pretrain``
    autoencoder: encoder + decoder on L1 reconstruction (the report's metric is MAE);
    guided: encoder + classifier on cross-entropy;
    contrastive: encoder + projection head on NT-Xent between two augmented views.
``probe``
    autoencoder and contrastive only: the classifier on the frozen encoder's latents.

Every epoch reports its training loss and validation metrics (``val_accuracy``, ``val_mae``,
and for the representation tasks ``knn_accuracy``: a kNN vote of validation embeddings against
train embeddings, cheap enough to rank and prune short runs without training a classifier) and
writes a checkpoint from which the phase resumes exactly. Before each evaluation the BatchNorm
statistics are computed from the weights over up to 10,000 un-augmented train images
(:meth:`Run.calibrate_batchnorm`), so that a short run is measured by its weights, not by how
far its running averages have caught up. :meth:`Run.evaluate` gives the
report's final numbers. Accuracies are fractions in [0, 1]; MAE is in the report's units (pixels
in [0, 1] for MNIST, normalized pixels for CIFAR-10).

Example::

    splits = load_splits(DataConfig(name="digits"))
    run = Run("contrastive", splits, ModelConfig(channels=16), TrainConfig(epochs=2))
    print(run.fit())
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models.augment import REPORT_STRENGTH, build_augmentation, pretrain_recipe
from models.checkpoints import (
    CheckpointError,
    CheckpointWriter,
    best_checkpoint,
    capture_rng_state,
    check_identity,
    detached_copy,
    load_checkpoint,
    phase_checkpoint,
    restore_rng_state,
)
from models.config import (
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_device,
    check_task,
    check_train,
)
from models.data import ImageSplits
from models.losses import full_precision, nt_xent
from models.networks import build_networks
from models.optim import build_optimizer, build_scheduler, load_optimizer_state

DEFAULT_TEMPERATURE = {"mnist": 0.5, "cifar": 0.15}
EVAL_BATCH = 1024
# Train images whose un-augmented latents set the probe classifier's BatchNorm statistics
# (Run.calibrate_batchnorm); a few thousand pin the statistics down.
CALIBRATION_IMAGES = 10_000
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def report_default(target: str, family: str, task: str) -> float | None:
    """What a training setting left unset (None) means: the report's value for ``family`` and
    ``task``, as :class:`Run` takes it; None for a setting without such a rule.

    >>> report_default("train.temperature", "cifar", "contrastive")
    0.15
    >>> report_default("train.aug_strength", "mnist", "guided")
    0.0
    """
    if target == "train.temperature":
        return DEFAULT_TEMPERATURE[family]
    if target == "train.aug_strength":
        return REPORT_STRENGTH[(family, pretrain_recipe(task))]
    if target == "train.probe.aug_strength":
        return REPORT_STRENGTH[(family, "probe")]
    return None


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the configuration diverged."""


@dataclass
class EpochReport:
    phase: str  # "pretrain" or "probe"
    epoch: int  # epochs finished in this phase, from 1
    epochs: int  # epochs planned for this phase
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # training time of the epoch, metrics excluded
    images_per_second: float = 0.0
    eval_seconds: float = 0.0  # validation metrics of the epoch
    # Training-thread time for this epoch's checkpoint: the snapshot, plus waiting for the
    # previous write when the disk is slower than an epoch (the write itself is background).
    checkpoint_seconds: float = 0.0


EpochCallback = Callable[[EpochReport], None]


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Set the process's algorithm choice for a run (set on every Run: it is process-wide).

    ``deterministic``: deterministic algorithms (PyTorch warns for an op that has none, such as
    CUDA's bilinear-upsampling backward; choose ``model.upsample`` nearest or convtranspose for a
    bitwise run), cuDNN deterministic, cuBLAS with a fixed workspace. Otherwise on CUDA cuDNN
    benchmarks and picks its fastest kernels, so a resumed CUDA run agrees with an uninterrupted
    one to rounding, not bit for bit (on the CPU it is bitwise either way).
    """
    if deterministic and device.type == "cuda":
        # Must be set before cuBLAS makes its first handle; harmless when set again.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def physical_gpu(index: int, mask: str | None = None) -> str:
    """The GPU that ``cuda:<index>`` of a process is, as ``CUDA_VISIBLE_DEVICES`` names it.

    ``mask`` is that process's ``CUDA_VISIBLE_DEVICES`` (default: this process's); under
    ``4,5`` index 1 is ``"5"``, with no mask it is ``"1"``. An entry may be a UUID
    (``GPU-...``, ``MIG-...``), returned as written.
    """
    mask = os.environ.get("CUDA_VISIBLE_DEVICES") if mask is None else mask
    entries = [e.strip() for e in mask.split(",")] if mask else []
    return entries[index] if index < len(entries) and entries[index] else str(index)


def describe_device(device: torch.device) -> str:
    """What a trial records as its device: ``cpu``, or ``cuda:0 = GPU 5 (NVIDIA H200)``."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    return f"cuda:{index} = GPU {physical_gpu(index)} ({name})"


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` must
    exist here (:func:`models.config.check_device`, which raises a SettingError naming ``key``)."""
    if check_device(name, key) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_modules(
    path: str | os.PathLike[str], state: dict[str, Any], modules: dict[str, nn.Module]
) -> None:
    """Load each of ``modules`` from checkpoint ``state``; a checkpoint of networks of other
    shapes (one written before the classifier had one output per class of an image folder,
    say) is a :class:`CheckpointError` naming its file, not a bare size mismatch."""
    for name, module in modules.items():
        try:
            module.load_state_dict(state["modules"][name])
        except (KeyError, RuntimeError) as error:
            problem = str(error).strip().splitlines()
            raise CheckpointError(
                path, f"its {name} does not fit this network ({problem[-1] if problem else error})"
            ) from error


class Run:
    """One training configuration on one device; see the module docstring."""

    def __init__(
        self,
        task: str,
        splits: ImageSplits,
        model: ModelConfig,
        train: TrainConfig,
        checkpoint_dir: str | Path | None = None,
        identity: str | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
    ) -> None:
        check_task(task)
        check_train(train)
        self.task = task
        self.cfg = train
        self.device = resolve_device(train.device)
        set_determinism(train.deterministic, self.device)
        self.splits = splits.to(self.device)
        self.family = splits.family
        torch.manual_seed(train.seed)  # initial weights and every random draw follow the seed
        self.nets = build_networks(splits.family, task, model, splits.num_classes)
        on_cuda = self.device.type == "cuda"
        self.channels_last = train.channels_last == "on" or (
            train.channels_last == "auto" and on_cuda
        )
        self.amp = on_cuda and train.amp in ("auto", "bf16")
        for module in self.nets.modules().values():
            module.to(self.device)
            if self.channels_last:
                module.to(memory_format=torch.channels_last)
        self.temperature = train.temperature or report_default(
            "train.temperature", self.family, task
        )
        self.pretrain_aug = build_augmentation(
            self.family, pretrain_recipe(task), train.aug_strength
        )
        # The classifier keeps the report's fixed recipe whatever strength the trial chose for
        # pre-training, unless the study sets the probe's own (train.probe.aug_strength).
        self.probe_aug = build_augmentation(
            self.family, "probe", train.probe.aug_strength, key="train.probe.aug_strength"
        )
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        # Called on the writer thread with each checkpoint file once it is in place.
        self.on_checkpoint = on_checkpoint
        # Written into every checkpoint; a checkpoint with another identity is never resumed.
        self.identity = identity
        # (metric, maximize): also keep the pretrain epoch that scored best on it, as the
        # report picked encoders by validation (see keep_best_by).
        self.best_by: tuple[str, bool] | None = None
        self._pending_best: dict[str, Any] | None = None  # written with the next checkpoint
        # A fixed subset of train images serves as the kNN memory bank.
        bank_size = min(train.knn_max_train, len(self.splits.train_y))
        order = torch.randperm(len(self.splits.train_y), generator=torch.Generator().manual_seed(0))
        self.knn_bank = order[:bank_size].to(self.device)
        self.calibration_images = order[:CALIBRATION_IMAGES].to(self.device)

    # ---- shared pieces ------------------------------------------------------------------

    @property
    def needs_probe(self) -> bool:
        return self.task in ("autoencoder", "contrastive")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare_images(
        self, x_uint8: torch.Tensor, augment: nn.Module | None = None
    ) -> torch.Tensor:
        """uint8 batch -> float network input: [0,1], augmented, normalized, right layout."""
        x = self.splits.to_float(x_uint8)
        if augment is not None:
            x = augment(x)
        x = self.splits.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        order = torch.randperm(n).to(self.device)
        batches = list(order.split(batch_size))
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches.pop()  # BatchNorm cannot train on a single image
        if self.cfg.max_batches:
            batches = batches[: self.cfg.max_batches]
        return batches

    def _chunks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        yield from x.split(EVAL_BATCH)

    @torch.inference_mode()
    def embed(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Latents of un-augmented images, float32, encoder in eval mode."""
        encoder = self.nets.encoder
        with self.eval_mode(encoder), self._autocast():
            out = [encoder(self.prepare_images(chunk)).float() for chunk in self._chunks(x_uint8)]
        return torch.cat(out) if out else torch.empty(0, self.nets.latent_dim, device=self.device)

    @torch.inference_mode()
    def knn_accuracy(self, features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        """Fraction of validation images whose k nearest train embeddings (cosine) vote right.

        ``features`` maps uint8 images to vectors; the encoder's latents by default.
        """
        features = features or self.embed
        bank = F.normalize(features(self.splits.train_x[self.knn_bank]), dim=1)
        bank_labels = self.splits.train_y[self.knn_bank]
        queries = F.normalize(features(self.splits.val_x), dim=1)
        k = min(self.cfg.knn_k, len(bank))
        correct = 0
        with full_precision(self.device.type):  # float32 similarities even inside autocast
            for start in range(0, len(queries), EVAL_BATCH):
                sims, idx = (queries[start : start + EVAL_BATCH] @ bank.T).topk(k, dim=1)
                votes = torch.zeros(len(sims), self.splits.num_classes, device=self.device)
                votes.scatter_add_(1, bank_labels[idx], (sims / 0.1).exp())
                hits = votes.argmax(1) == self.splits.val_y[start : start + EVAL_BATCH]
                correct += hits.sum()
        return float(correct) / max(len(queries), 1)

    @torch.inference_mode()
    def pixels(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """The images as the network sees them (normalized), flattened: the raw-pixel baseline."""
        flat = [self.prepare_images(c).float().flatten(1) for c in self._chunks(x_uint8)]
        return torch.cat(flat) if flat else torch.empty(0, 0, device=self.device)

    def baselines(self) -> dict[str, float]:
        """What a result must beat, on this run's split: kNN accuracy of the raw pixels and of
        the encoder as it is now (call it before training: the untrained encoder), its BatchNorm
        statistics computed as before every evaluation."""
        self.calibrate_batchnorm([self.nets.encoder], self.calibration_batches())
        return {
            "raw_pixels_knn_accuracy": self.knn_accuracy(self.pixels),
            "untrained_encoder_knn_accuracy": self.knn_accuracy(),
        }

    @torch.inference_mode()
    def accuracy(self, x_uint8: torch.Tensor, y: torch.Tensor) -> float:
        """Classifier accuracy on un-augmented images (encoder + classifier in eval mode)."""
        correct = 0
        with self.eval_mode(self.nets.encoder, self.nets.classifier), self._autocast():
            for xs, ys in zip(self._chunks(x_uint8), y.split(EVAL_BATCH), strict=True):
                logits = self.nets.classifier(self.nets.encoder(self.prepare_images(xs)))
                correct += (logits.argmax(1) == ys).sum()
        return float(correct) / max(len(y), 1)

    @torch.inference_mode()
    def reconstruction_mae(self, x_uint8: torch.Tensor) -> float:
        """Mean absolute error per pixel, in the units the network sees (report's units)."""
        total = torch.zeros((), device=self.device)
        with self.eval_mode(self.nets.encoder, self.nets.decoder), self._autocast():
            for xs in self._chunks(x_uint8):
                target = self.prepare_images(xs)
                recon = self.nets.decoder(self.nets.encoder(target)).float()
                total += (recon - target.float()).abs().sum()
        return float(total) / max(x_uint8.numel(), 1)

    @torch.no_grad()
    def calibrate_batchnorm(
        self, modules: Sequence[nn.Module], batches: Iterable[torch.Tensor]
    ) -> None:
        """Set the BatchNorm running statistics of ``modules`` (applied in turn: encoder, then
        its head) to the statistics of ``batches`` flowing through them.

        Training keeps running averages (momentum 0.1, from mean 0 and variance 1) that lag the
        weights by about ten steps. With few steps an epoch (a small dataset, a large batch, an
        early rung) the eval-mode network then measures the step count more than the weights:
        on 1,000 MNIST images at batch 512 every configuration scored chance after one epoch,
        and a probe that trained to a loss of 0.03 scored chance on the images it fitted.
        Statistics recomputed from the weights before each evaluation ("precise BatchNorm", Wu
        & Johnson 2021) change no weight and no training step (in train mode BatchNorm uses the
        batch's statistics), and a resumed run gets the same ones from the same weights. Only
        BatchNorm layers run in train mode: dropout stays off and draws no random number, which
        would change the rest of the run (``torch.optim.swa_utils.update_bn`` puts the whole
        network in train mode, so it does both).
        """
        chain = nn.Sequential(*modules)
        norms = [m for m in chain.modules() if isinstance(m, BATCH_NORMS)]
        if not norms:
            return
        modes = [(m, m.training) for m in chain.modules()]
        momenta = [m.momentum for m in norms]
        try:
            chain.eval()
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the batches
                norm.train()
            with self._autocast():
                for batch in batches:
                    if len(batch) > 1:  # one input has no variance
                        chain(batch)
        finally:
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
            for m, training in modes:
                m.training = training

    def calibration_batches(self) -> Iterator[torch.Tensor]:
        """The calibration images as the network sees them at evaluation (un-augmented), in
        batches of equal size (a cumulative average weighs every batch alike)."""
        images = self.splits.train_x[self.calibration_images]
        count = max(1, math.ceil(len(images) / EVAL_BATCH))
        for chunk in images.tensor_split(count):
            yield self.prepare_images(chunk)

    @staticmethod
    @contextlib.contextmanager
    def eval_mode(*modules: nn.Module) -> Iterator[None]:
        """Put ``modules`` in eval mode for the block, then give each its former mode back."""
        modes = [(m, m.training) for m in modules]
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.train(training)

    # ---- the epoch loop shared by both phases ---------------------------------------------

    def _run_phase(
        self,
        phase: str,
        modules: dict[str, nn.Module],
        optim: OptimConfig,
        epochs: int,
        batch_size: int,
        n_images: int,
        step: Callable[[torch.Tensor], torch.Tensor],
        metrics: Callable[[], dict[str, float]],
        on_epoch: EpochCallback | None,
        stop_at: int | None = None,
    ) -> list[EpochReport]:
        params = [p for m in modules.values() for p in m.parameters()]
        stop = epochs if stop_at is None else max(1, min(int(stop_at), epochs))
        key = "train.optim" if phase == "pretrain" else "train.probe.optim"
        optimizer = build_optimizer(params, optim, key)
        scheduler = build_scheduler(optimizer, optim, epochs, key)
        path = phase_checkpoint(self.checkpoint_dir, phase) if self.checkpoint_dir else None
        history: list[EpochReport] = []
        state = load_checkpoint(path) if path else None
        best = None  # {"value", "epoch"} of the best epoch so far, when keeping the best
        if state is not None:
            check_identity(path, state, self.identity)
            best = state.get("best")
            load_modules(path, state, modules)
            load_optimizer_state(optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            restore_rng_state(state["rng"], self.device)
            history = [EpochReport(**h) for h in state["history"]]
        writer = CheckpointWriter(self.on_checkpoint)
        try:
            for epoch in range(len(history), stop):
                for module in modules.values():
                    module.train()
                batches = self._batches(n_images, batch_size)
                started = time.perf_counter()
                loss_sum = torch.zeros((), device=self.device)
                bar = tqdm(
                    batches,
                    desc=f"{phase} {epoch + 1}/{epochs}",
                    leave=False,
                    disable=not self.cfg.progress,
                    unit="batch",
                )
                for idx in bar:
                    with self._autocast():
                        loss = step(idx)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.detach().float()
                scheduler.step()
                train_loss = float(loss_sum) / max(len(batches), 1)  # one device sync per epoch
                seconds = time.perf_counter() - started
                if not math.isfinite(train_loss):
                    raise NonFiniteLossError(
                        f"{phase}: training loss became {train_loss} in epoch {epoch + 1}"
                    )
                images = sum(len(b) for b in batches)
                eval_started = time.perf_counter()
                values = metrics()
                report = EpochReport(
                    phase=phase,
                    epoch=epoch + 1,
                    epochs=epochs,
                    train_loss=train_loss,
                    metrics=values,
                    seconds=seconds,
                    images_per_second=images / seconds if seconds > 0 else 0.0,
                    eval_seconds=time.perf_counter() - eval_started,
                )
                history.append(report)
                if path:
                    saving_started = time.perf_counter()
                    best = self._checkpoint(
                        writer, path, report, stop, modules, optimizer, scheduler, best, history
                    )
                    report.checkpoint_seconds = time.perf_counter() - saving_started
                if on_epoch:
                    on_epoch(report)
        except BaseException:
            # The training error is the one to report; a write in flight still finishes.
            with contextlib.suppress(BaseException):
                writer.flush()
            raise
        writer.flush()
        return history

    def _checkpoint(
        self,
        writer: CheckpointWriter,
        path: Path,
        report: EpochReport,
        stop: int,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        best: dict[str, float] | None,
        history: list[EpochReport],
    ) -> dict[str, float] | None:
        """Hand this epoch's checkpoints to the writer; return the best epoch so far.

        The resume checkpoint is written every ``train.checkpoint_every`` epochs and always at
        ``stop`` (a rung or the phase's end), where it is on disk before the epoch is reported.
        """
        epoch, phase = report.epoch, report.phase
        if phase == "pretrain" and self.best_by and _improves(report, best, *self.best_by):
            best = {"value": report.metrics[self.best_by[0]], "epoch": epoch}
            # Held until the next resume checkpoint: a best file is never newer than the epoch
            # a resume starts from, so a crash cannot leave a best epoch that no run trained.
            self._pending_best = {
                "phase": phase,
                "identity": self.identity,
                "epoch": epoch,
                "modules": detached_copy({n: m.state_dict() for n, m in modules.items()}),
                "best": best,
            }
        if epoch % self.cfg.checkpoint_every == 0 or epoch == stop:
            if self._pending_best is not None:
                writer.submit(best_checkpoint(self.checkpoint_dir), self._pending_best)
                self._pending_best = None
            writer.submit(
                path,
                {
                    "phase": phase,
                    "identity": self.identity,
                    "epoch": epoch,
                    "modules": detached_copy({n: m.state_dict() for n, m in modules.items()}),
                    "optimizer": detached_copy(optimizer.state_dict()),
                    "scheduler": detached_copy(scheduler.state_dict()),
                    "rng": capture_rng_state(self.device),
                    "best": best,
                    "history": [asdict(h) for h in history],
                },
            )
        if epoch == stop:
            writer.flush()
        return best

    # ---- phases ---------------------------------------------------------------------------

    def keep_best_by(self, metric: str, maximize: bool) -> None:
        """Also keep the pretrain epoch best on validation ``metric`` (``pretrain-best.pt``)."""
        self.best_by = (metric, maximize)

    def pretrain_modules(self) -> dict[str, nn.Module]:
        second = {"autoencoder": "decoder", "guided": "classifier", "contrastive": "projection"}
        name = second[self.task]
        return {"encoder": self.nets.encoder, name: getattr(self.nets, name)}

    def pretrain(
        self, on_epoch: EpochCallback | None = None, stop_at: int | None = None
    ) -> list[EpochReport]:
        """Train the encoder with the task's objective for ``train.epochs`` epochs.

        ``stop_at`` stops after that epoch (a rung) with the learning-rate schedule still
        defined over ``train.epochs``: a later call with a larger ``stop_at`` (or none)
        continues from the checkpoint exactly as if the run had never stopped.
        """
        nets, splits = self.nets, self.splits
        augment = self.pretrain_aug

        def autoencoder_step(idx: torch.Tensor) -> torch.Tensor:
            x = self.prepare_images(splits.train_x[idx], augment)
            recon = nets.decoder(nets.encoder(x))
            with full_precision(x.device.type):
                return F.l1_loss(recon.float(), x.float())

        def guided_step(idx: torch.Tensor) -> torch.Tensor:
            logits = nets.classifier(
                nets.encoder(self.prepare_images(splits.train_x[idx], augment))
            )
            with full_precision(logits.device.type):
                return F.cross_entropy(logits.float(), splits.train_y[idx])

        def contrastive_step(idx: torch.Tensor) -> torch.Tensor:
            raw = splits.train_x[idx]
            views = torch.cat(
                [self.prepare_images(raw, augment), self.prepare_images(raw, augment)]
            )
            z = nets.projection(nets.encoder(views)).float()
            z1, z2 = z.chunk(2)
            return nt_xent(z1, z2, self.temperature)

        def metrics() -> dict[str, float]:
            self.calibrate_batchnorm(
                list(self.pretrain_modules().values()), self.calibration_batches()
            )
            if self.task == "guided":
                return {"val_accuracy": self.accuracy(splits.val_x, splits.val_y)}
            values = {"knn_accuracy": self.knn_accuracy()}
            if self.task == "autoencoder":
                values["val_mae"] = self.reconstruction_mae(splits.val_x)
            return values

        steps = {
            "autoencoder": autoencoder_step,
            "guided": guided_step,
            "contrastive": contrastive_step,
        }
        return self._run_phase(
            "pretrain",
            self.pretrain_modules(),
            self.cfg.optim,
            self.cfg.epochs,
            self.cfg.batch_size,
            len(splits.train_y),
            steps[self.task],
            metrics,
            on_epoch,
            stop_at,
        )

    def train_probe(self, on_epoch: EpochCallback | None = None) -> list[EpochReport]:
        """Train the classifier on the frozen encoder (autoencoder and contrastive tasks)."""
        if not self.needs_probe:
            raise ValueError(f"task {self.task!r} trains its classifier during pretraining")
        nets, splits, probe = self.nets, self.splits, self.cfg.probe
        nets.encoder.eval()
        for p in nets.encoder.parameters():
            p.requires_grad_(False)
        augment = self.probe_aug
        # Without augmentation the latents never change: compute them once.
        cached = None if not isinstance(augment, nn.Identity) else self.embed(splits.train_x)
        # The images the classifier is evaluated on are not augmented: nor are these.
        calibration = (
            cached[self.calibration_images]
            if cached is not None
            else self.embed(splits.train_x[self.calibration_images])
        )

        def step(idx: torch.Tensor) -> torch.Tensor:
            if cached is not None:
                latents = cached[idx]
            else:
                with torch.no_grad():
                    latents = nets.encoder(self.prepare_images(splits.train_x[idx], augment))
            logits = nets.classifier(latents)
            with full_precision(logits.device.type):
                return F.cross_entropy(logits.float(), splits.train_y[idx])

        def metrics() -> dict[str, float]:
            self.calibrate_batchnorm([nets.classifier], [calibration])
            return {"val_accuracy": self.accuracy(splits.val_x, splits.val_y)}

        history = self._run_phase(
            "probe",
            {"classifier": nets.classifier},
            probe.optim,
            probe.epochs,
            probe.batch_size,
            len(splits.train_y),
            step,
            metrics,
            on_epoch,
        )
        # Again for a finished probe read back from a checkpoint written before calibration.
        self.calibrate_batchnorm([nets.classifier], [calibration])
        return history

    def load_pretrained(self, path: str | Path) -> None:
        """Load the pretrain phase's modules from another run's checkpoint (promote -> final)."""
        state = load_checkpoint(path)
        if state is None:
            raise FileNotFoundError(f"no pretrain checkpoint at {path}")
        load_modules(path, state, self.pretrain_modules())

    def evaluate(self) -> dict[str, float]:
        """The report's table: train/val/test accuracy, and reconstruction MAE for autoencoders."""
        s = self.splits
        results = {
            "train_accuracy": self.accuracy(s.train_x, s.train_y),
            "val_accuracy": self.accuracy(s.val_x, s.val_y),
            "test_accuracy": self.accuracy(s.test_x, s.test_y),
        }
        if self.task == "autoencoder":
            for split in ("train", "val", "test"):
                results[f"{split}_mae"] = self.reconstruction_mae(getattr(s, f"{split}_x"))
        return results

    def fit(self, on_epoch: EpochCallback | None = None) -> dict[str, float]:
        """Pretrain, train the probe where the task has one, and return :meth:`evaluate`."""
        self.pretrain(on_epoch)
        if self.needs_probe:
            self.train_probe(on_epoch)
        return self.evaluate()


def _improves(
    report: EpochReport, best: dict[str, float] | None, metric: str, maximize: bool
) -> bool:
    """Whether this epoch beats the best so far on ``metric`` (ties keep the earlier epoch)."""
    value = report.metrics[metric]
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best["value"] if maximize else value < best["value"]
