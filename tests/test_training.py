"""The training loop: every task runs and reports, checkpoints resume exactly, failures are clear."""

from __future__ import annotations

import pytest
import torch

from models.checkpoints import CheckpointError
from models.config import DataConfig, ModelConfig, OptimConfig, ProbeConfig, TrainConfig
from models.data import load_splits
from models.errors import SettingError
from models.optim import build_optimizer, build_scheduler
from models.training import NonFiniteLossError, Run, resolve_device


@pytest.fixture(scope="module")
def digits():
    return load_splits(DataConfig(name="digits", train_subset=320, val_subset=96, test_subset=96))


def small_train(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=32, max_batches=4, progress=False, device="cpu", knn_k=5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("task", ["autoencoder", "guided", "contrastive"])
@pytest.mark.slow
def test_each_task_reports_metrics_every_epoch_and_final_numbers(digits, task):
    seen = []
    train = small_train(probe=ProbeConfig(epochs=1, batch_size=32))
    run = Run(task, digits, ModelConfig(channels=4, latent_dim=16), train)
    results = run.fit(on_epoch=seen.append)
    pretrain = [r for r in seen if r.phase == "pretrain"]
    assert [r.epoch for r in pretrain] == [1, 2]
    expected = {
        "autoencoder": {"knn_accuracy", "val_mae"},
        "guided": {"val_accuracy"},
        "contrastive": {"knn_accuracy"},
    }[task]
    assert set(pretrain[0].metrics) == expected
    assert all(r.train_loss > 0 and r.images_per_second > 0 for r in seen)
    if task != "guided":
        assert [r.phase for r in seen].count("probe") == 1
    for split in ("train", "val", "test"):
        assert 0.0 <= results[f"{split}_accuracy"] <= 1.0
    assert ("test_mae" in results) == (task == "autoencoder")


def _weights(run: Run) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.clone()
        for name, module in run.nets.modules().items()
        for k, v in module.state_dict().items()
    }


class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    "task,optim",
    [
        ("contrastive", OptimConfig(name="sgd", lr=0.05, schedule="cosine")),
        ("guided", OptimConfig(name="lars", lr=0.5, schedule="cosine", warmup_epochs=1)),
        ("autoencoder", OptimConfig(name="adam", lr=1e-3)),
    ],
)
@pytest.mark.slow
def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(digits, tmp_path, task, optim):
    model = ModelConfig(channels=4, latent_dim=16, classifier_dropout=0.3, encoder_dropout=0.1)
    train = small_train(epochs=3, optim=optim)

    torch.manual_seed(0)
    straight = Run(task, digits, model, train, checkpoint_dir=tmp_path / "straight")
    straight.pretrain()

    def stop_after_first(report):
        if report.epoch == 1:
            raise Interrupt

    torch.manual_seed(0)
    first = Run(task, digits, model, train, checkpoint_dir=tmp_path / "resumed")
    with pytest.raises(Interrupt):
        first.pretrain(on_epoch=stop_after_first)
    torch.manual_seed(123)  # a fresh process has another RNG state: the checkpoint restores it
    second = Run(task, digits, model, train, checkpoint_dir=tmp_path / "resumed")
    history = second.pretrain()

    assert [h.epoch for h in history] == [1, 2, 3]
    a, b = _weights(straight), _weights(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "task,optim",
    [
        ("contrastive", OptimConfig(name="lars", lr=0.5, schedule="cosine", warmup_epochs=1)),
        ("guided", OptimConfig(name="sgd", lr=0.05, schedule="cosine")),
    ],
)
def test_stopped_at_rungs_and_continued_equals_one_uninterrupted_run(digits, tmp_path, task, optim):
    """ASHA's continuation: stop at rung 1, then 2, continue to the long budget (4) in fresh
    Runs (other workers); the weights equal one straight 4-epoch run with the same seed,
    because the schedule is defined over the long budget from the first epoch."""
    model = ModelConfig(channels=4, latent_dim=16)
    train = small_train(epochs=4, optim=optim, seed=7)
    straight = Run(task, digits, model, train, checkpoint_dir=tmp_path / "straight")
    straight_history = straight.pretrain()

    seen = []
    for rung, noise_seed in ((1, 11), (2, 22), (None, 33)):
        torch.manual_seed(noise_seed)  # another process: the checkpoint restores the RNG
        run = Run(task, digits, model, train, checkpoint_dir=tmp_path / "rungs")
        history = run.pretrain(on_epoch=seen.append, stop_at=rung)
        assert history[-1].epoch == (rung or 4)
    assert [r.epoch for r in seen] == [1, 2, 3, 4]  # each epoch trained once
    assert all(r.epochs == 4 for r in seen)  # the schedule's horizon is the long budget
    a, b = _weights(straight), _weights(run)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h.metrics for h in history] == [h.metrics for h in straight_history]


class _Interrupt(Exception):
    pass


def test_checkpoint_every_k_epochs_and_at_the_rung_then_resume_is_exact(digits, tmp_path):
    """train.checkpoint_every=4: an interruption after epoch 5 resumes from epoch 4 (the last
    one written), and the resumed run still ends with the uninterrupted run's weights. A rung
    stop (stop_at=3) always leaves its checkpoint, whatever the cadence."""
    from models.checkpoints import load_checkpoint, phase_checkpoint

    model = ModelConfig(channels=4, latent_dim=16)
    train = small_train(epochs=6, seed=3, checkpoint_every=4)
    reference = Run("contrastive", digits, model, train)
    reference.pretrain()

    def stop_after_5(report):
        if report.epoch == 5:
            raise _Interrupt

    folder = tmp_path / "k4"
    with pytest.raises(_Interrupt):
        Run("contrastive", digits, model, train, checkpoint_dir=folder).pretrain(stop_after_5)
    assert load_checkpoint(phase_checkpoint(folder, "pretrain"))["epoch"] == 4
    seen = []
    resumed = Run("contrastive", digits, model, train, checkpoint_dir=folder)
    resumed.pretrain(on_epoch=seen.append)
    assert [r.epoch for r in seen] == [5, 6]
    a, b = _weights(reference), _weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key

    rung = tmp_path / "rung"
    Run("contrastive", digits, model, train, checkpoint_dir=rung).pretrain(stop_at=3)
    assert load_checkpoint(phase_checkpoint(rung, "pretrain"))["epoch"] == 3


def _two_epoch_run(digits, folder, on_checkpoint) -> Run:
    return Run(
        "guided",
        digits,
        ModelConfig(channels=4),
        small_train(epochs=2),
        checkpoint_dir=folder,
        on_checkpoint=on_checkpoint,
    )


def test_checkpoints_are_written_off_the_training_thread_and_reported(digits, tmp_path):
    import threading

    written = []
    run = _two_epoch_run(
        digits, tmp_path, lambda path: written.append((path.name, threading.current_thread().name))
    )
    run.keep_best_by("val_accuracy", maximize=True)
    run.pretrain()
    assert [name for name, _ in written if name == "pretrain.pt"] == ["pretrain.pt"] * 2
    assert "pretrain-best.pt" in {name for name, _ in written}
    assert {thread for _, thread in written} == {"checkpoint-writer"}


def test_a_failed_checkpoint_write_fails_the_phase(digits, tmp_path):
    def broken_store(path):
        raise OSError(f"cannot copy {path.name}")

    with pytest.raises(OSError, match="cannot copy pretrain.pt"):
        _two_epoch_run(digits, tmp_path, broken_store).pretrain()


def test_finished_phase_is_not_retrained(digits, tmp_path):
    train = small_train(epochs=1)
    Run("guided", digits, ModelConfig(channels=4), train, checkpoint_dir=tmp_path).pretrain()
    again = []
    Run("guided", digits, ModelConfig(channels=4), train, checkpoint_dir=tmp_path).pretrain(
        on_epoch=again.append
    )
    assert again == []


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_run_whose_loss_is_not_finite_raises_nonfinite_loss(digits, poison):
    """A diverged run, made certain: a classifier weight already holds what a divergence
    ends in. The largest rate validation allows (lr 100, momentum 0.99) is no such test: on
    this CPU it reaches NaN in epoch 2 with one thread, but with two its losses stay finite
    (1e16, 1e19, 9e13), so the old test passed or failed with the thread count."""
    run = Run("guided", digits, ModelConfig(channels=4), small_train(epochs=2, max_batches=2))
    with torch.no_grad():
        next(run.nets.classifier.parameters()).view(-1)[0] = poison
    with pytest.raises(NonFiniteLossError, match="nan|inf") as raised:
        run.pretrain()
    assert "epoch 1" in str(raised.value)


@pytest.mark.slow
def test_contrastive_training_lifts_knn_accuracy_above_untrained(digits):
    model = ModelConfig(channels=8, latent_dim=32, projection_dim=32)
    torch.manual_seed(0)
    run = Run("contrastive", digits, model, small_train(epochs=4, max_batches=0, batch_size=64))
    before = run.knn_accuracy()
    history = run.pretrain()
    after = history[-1].metrics["knn_accuracy"]
    assert after > before + 0.02, (before, after)


@pytest.mark.slow
def test_reconstruction_mae_falls(digits):
    torch.manual_seed(0)
    run = Run("autoencoder", digits, ModelConfig(channels=4, latent_dim=16), small_train(epochs=3))
    # Measured as every epoch is: BatchNorm statistics from the weights. (With the initial
    # running statistics the untrained network happens to score 0.343, the calibrated 0.424.)
    run.calibrate_batchnorm([run.nets.encoder, run.nets.decoder], run.calibration_batches())
    start = run.reconstruction_mae(digits.val_x)
    maes = [h.metrics["val_mae"] for h in run.pretrain()]
    assert maes[-1] < start
    assert 0 < maes[-1] < 1  # pixels in [0, 1]: the report's units for MNIST


def test_scheduler_warmup_then_cosine():
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(name="sgd", lr=1.0, schedule="cosine", warmup_epochs=2)
    opt = build_optimizer([param], cfg)
    sched = build_scheduler(opt, cfg, epochs=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5]


def test_unknown_task_and_device_are_clear_errors(digits):
    with pytest.raises(SettingError, match="^task: unknown value 'jigsaw'"):
        Run("jigsaw", digits, ModelConfig(channels=4), small_train())
    with pytest.raises(SettingError, match=r"^train\.device: unknown device 'tpu:7'"):
        resolve_device("tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(SettingError, match=r"^train\.device: 'cuda' .*no CUDA device"):
            resolve_device("cuda")


def test_embed_is_in_eval_mode_so_a_latent_does_not_depend_on_its_batch(digits):
    torch.manual_seed(0)
    run = Run("contrastive", digits, ModelConfig(channels=4, latent_dim=8), small_train())
    encoder = run.nets.encoder
    assert encoder.training  # a freshly built encoder is in train mode
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    whole = run.embed(digits.val_x[:40])
    part = run.embed(digits.val_x[:8])
    # BatchNorm in train mode would use each batch's statistics: the same image would change.
    torch.testing.assert_close(part, whole[:8])
    assert encoder.training  # its mode is given back
    for name, value in encoder.state_dict().items():  # running statistics untouched
        assert torch.equal(value, before[name]), name


def test_configured_temperature_reaches_the_contrastive_loss(digits):
    def first_epoch_loss(temperature: float) -> float:
        run = Run(
            "contrastive",
            digits,
            ModelConfig(channels=4, latent_dim=8, projection_dim=8),
            small_train(epochs=1, max_batches=1, batch_size=16, temperature=temperature),
        )
        assert run.temperature == temperature
        return run.pretrain()[0].train_loss

    # Same seed, same batch and views: only the temperature differs.
    assert first_epoch_loss(0.1) != pytest.approx(first_epoch_loss(0.5), rel=1e-3)


class _RecordViews(torch.nn.Module):
    """Passes a batch through an augmentation and keeps what it returned."""

    def __init__(self, augment: torch.nn.Module) -> None:
        super().__init__()
        self.augment = augment
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.augment(x)
        self.outputs.append(out.detach().clone())
        return out


def test_contrastive_step_draws_two_independent_views(digits):
    run = Run(
        "contrastive",
        digits,
        ModelConfig(channels=4, latent_dim=8, projection_dim=8),
        small_train(epochs=1, max_batches=2, batch_size=16),
    )
    recorder = _RecordViews(run.pretrain_aug)
    run.pretrain_aug = recorder
    run.pretrain()
    assert len(recorder.outputs) == 4  # two views for each of the two batches
    for first, second in zip(recorder.outputs[::2], recorder.outputs[1::2], strict=True):
        assert first.shape == second.shape
        # Identical views would make every positive pair trivially similar.
        differs = (first - second).flatten(1).abs().amax(1) > 0
        assert differs.float().mean() > 0.5


def test_probe_keeps_the_encoder_frozen_in_eval_mode_under_augmentation(digits):
    torch.manual_seed(0)
    train = small_train(
        probe=ProbeConfig(epochs=1, batch_size=32, aug_strength=1.0),
    )
    run = Run("autoencoder", digits, ModelConfig(channels=4, latent_dim=8), train)
    assert run.nets.encoder.training  # as pretraining leaves it
    before = {k: v.clone() for k, v in run.nets.encoder.state_dict().items()}
    run.train_probe()
    # The augmented probe runs the encoder every step: BatchNorm in train mode would move its
    # running statistics, so the "frozen" encoder would be another network after the probe.
    for name, value in run.nets.encoder.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_accuracy_is_measured_on_unaugmented_images(digits):
    torch.manual_seed(0)
    train = small_train(probe=ProbeConfig(epochs=1, batch_size=32, aug_strength=1.0))
    run = Run("autoencoder", digits, ModelConfig(channels=4, latent_dim=8), train)
    nets = run.nets
    # An untrained network in eval mode predicts one class for every image (BatchNorm's initial
    # running statistics): set those statistics from one pass over the train split instead.
    network = torch.nn.Sequential(nets.encoder, nets.classifier)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the pass
    with torch.no_grad():
        network.train()
        network(run.prepare_images(digits.train_x))
    with torch.no_grad(), Run.eval_mode(nets.encoder, nets.classifier):
        predicted = nets.classifier(nets.encoder(run.prepare_images(digits.val_x))).argmax(1)
    assert predicted.unique().numel() > 1  # a constant prediction would hide a crop
    # Labels equal to the clean predictions: exactly 1.0, whatever the RNG, unless the
    # evaluation images are augmented (random crops change some predictions).
    for seed in (1, 2):
        torch.manual_seed(seed)
        assert run.accuracy(digits.val_x, predicted) == 1.0


def test_knn_accuracy_of_raw_pixels_matches_a_direct_nearest_neighbour_vote(digits):
    run = Run("contrastive", digits, ModelConfig(channels=4, latent_dim=8), small_train(knn_k=1))
    bank = torch.nn.functional.normalize(run.pixels(digits.train_x[run.knn_bank]), dim=1)
    queries = torch.nn.functional.normalize(run.pixels(digits.val_x), dim=1)
    nearest = (queries @ bank.T).argmax(1)
    expected = (digits.train_y[run.knn_bank][nearest] == digits.val_y).float().mean().item()
    assert run.knn_accuracy(run.pixels) == pytest.approx(expected)
    assert expected > 0.8  # digits are easy for 1-NN on pixels: a wrong vote shows
    # With k = 5 the similarity-weighted vote still finds the right class for most images.
    run.cfg = small_train(knn_k=5)
    assert run.knn_accuracy(run.pixels) > 0.8


@pytest.mark.parametrize(
    ("shape", "classes"), [((1, 28, 28), 12), ((3, 32, 32), 12), ((1, 28, 28), 3)]
)
def test_an_image_folder_of_any_number_of_classes_trains_a_classifier_of_that_many(
    tmp_path, shape, classes, digits
):
    """The classifier has one output per class of the data: an image folder of 12 classes once
    crashed on the first label past 9 ("Target 11 is out of bounds"), and one of 3 classes
    counted votes for 7 classes that do not exist. A checkpoint of a classifier of another
    size is refused by name, not resumed into a bare size mismatch."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    c, h, w = shape
    for split in ("train", "test"):
        for k in range(classes):
            folder = tmp_path / "images" / split / f"class{k:02d}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (h, w, c) if c == 3 else (h, w), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    splits = load_splits(
        DataConfig(name="imagefolder", path=str(tmp_path / "images"), cache_dir="")
    )
    assert splits.num_classes == classes and int(splits.train_y.max()) == classes - 1
    model = ModelConfig(channels=4, latent_dim=16, classifier_hidden=[8])
    run = Run("guided", splits, model, small_train(epochs=1, batch_size=16, knn_k=3))
    results = run.fit()
    last = [m for m in run.nets.classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.out_features == classes
    assert 0.0 <= results["test_accuracy"] <= 1.0
    if classes != 10 and shape[0] == 1:  # the same encoder as digits', another classifier
        train = small_train(epochs=1, batch_size=16, knn_k=3)
        Run("guided", digits, model, train, checkpoint_dir=tmp_path / "ten").pretrain()
        other = Run("guided", splits, model, train, checkpoint_dir=tmp_path / "ten")
        with pytest.raises(CheckpointError, match=r"ten.*classifier does not fit this network"):
            other.pretrain()


def _probe_run(splits, **probe) -> Run:
    train = small_train(
        epochs=3,
        batch_size=64,
        max_batches=0,
        optim=OptimConfig(name="adam", lr=3e-3),
        probe=ProbeConfig(batch_size=64, optim=OptimConfig(name="adam", lr=3e-3), **probe),
    )
    model = ModelConfig(channels=16, latent_dim=64, classifier_dropout=0.1)
    torch.manual_seed(0)
    run = Run("contrastive", splits, model, train)
    run.pretrain()
    return run


@pytest.mark.slow
def test_a_probe_of_few_steps_scores_in_eval_mode_what_it_fits():
    """128 images at batch 64: 2 steps an epoch, 30 in all. BatchNorm's running variance then
    still holds 0.9^30 of its initial 1 while the latents' variance is far below it, so before
    calibration this eval-mode classifier, trained to a loss of 0.03, scored 25 % on the very
    images it fitted and 16 % on validation (now 100 % and 90 %)."""
    splits = load_splits(DataConfig(name="digits", train_subset=128))
    run = _probe_run(splits, epochs=15)
    history = run.train_probe()
    assert history[-1].train_loss < 0.2
    assert run.accuracy(splits.train_x, splits.train_y) >= 0.95
    assert history[-1].metrics["val_accuracy"] >= 0.7
    assert run.evaluate()["val_accuracy"] == history[-1].metrics["val_accuracy"]


def test_batchnorm_calibration_changes_no_weight_draws_no_random_number_keeps_modes(digits):
    run = _probe_run(digits, epochs=2)
    classifier = run.nets.classifier
    norms = [m for m in classifier.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and any(isinstance(m, torch.nn.Dropout) for m in classifier.modules())
    latents = run.embed(digits.train_x)
    classifier.train()
    weights = {k: v.clone() for k, v in classifier.named_parameters()}
    rng = torch.get_rng_state()
    run.calibrate_batchnorm([classifier], [latents])
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in classifier.modules())  # its modes as they were
    assert all(m.momentum == 0.1 for m in norms)
    for k, v in classifier.named_parameters():
        assert torch.equal(v, weights[k]), k
    # The first BatchNorm now holds the exact statistics of what reaches it.
    linear, norm = classifier.layers[0], classifier.layers[1]  # Linear-BN1d-ReLU-Dropout...
    assert norm is norms[0]
    with torch.no_grad():
        reaching = linear(latents)
    torch.testing.assert_close(norm.running_mean, reaching.mean(0))
    torch.testing.assert_close(norm.running_var, reaching.var(0))


def test_calibration_leaves_the_probe_trajectory_as_it_was(digits):
    """The statistics are recomputed from the weights at each evaluation: the trained weights
    are bit for bit those of a probe that never calibrates (dropout's draws included)."""
    runs = [_probe_run(digits, epochs=3) for _ in range(2)]
    runs[1].calibrate_batchnorm = lambda module, inputs: None
    for run in runs:
        torch.manual_seed(5)
        run.train_probe()
    calibrated, plain = (dict(r.nets.classifier.named_parameters()) for r in runs)
    for name, value in calibrated.items():
        assert torch.equal(value, plain[name]), name


def test_calibration_leaves_the_pretraining_trajectory_as_it_was(digits):
    """Each pretraining evaluation computes the statistics afresh: weights and metrics' inputs
    aside, the run trains exactly as one whose evaluations never calibrate (dropout included)."""
    model = ModelConfig(channels=4, latent_dim=16, classifier_dropout=0.3, encoder_dropout=0.1)
    runs = []
    for calibrate in (True, False):
        torch.manual_seed(3)
        run = Run("guided", digits, model, small_train(epochs=3))
        if not calibrate:
            run.calibrate_batchnorm = lambda modules, batches: None
        run.pretrain()
        runs.append(dict(run.nets.encoder.named_parameters()))
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


@pytest.mark.slow
def test_an_early_rung_is_measured_by_its_weights_not_its_step_count():
    """Two steps of batch 160: the running averages still hold most of their initial values, so
    before calibration every such configuration scored chance in eval mode after one epoch."""
    splits = load_splits(DataConfig(name="digits", train_subset=320, val_subset=360))
    torch.manual_seed(0)
    train = small_train(epochs=1, batch_size=160, max_batches=0, optim=OptimConfig(lr=3e-3))
    run = Run("guided", splits, ModelConfig(channels=8, latent_dim=32), train)
    (first,) = run.pretrain()
    assert first.metrics["val_accuracy"] >= 0.3
