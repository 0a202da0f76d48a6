"""Train one configuration end to end: ``python -m search.train study=NAME [key=value ...]``.

By default the study's own settings (the report's configuration) are trained; any field can be
overridden. Checkpoints go to ``<checkpoints_dir>/train/<name>-<config hash>/`` after every
epoch (a URL: through the local cache), so running the same command again resumes where it
stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from models.checkpoints import CheckpointError, CheckpointWriteError, written_identity
from models.data import load_splits
from models.errors import UsageError
from models.training import EpochReport, Run
from search.cli import config_from_args, guarded, parser
from search.config import check_checkpoints_reachable, checkpoint_store, to_dataclasses
from search.database import CheckpointTransferError, mask_secrets
from search.naming import (
    PRETRAIN_FILE,
    checkpoint_identity,
    format_metric,
    standalone_run_relative,
)
from search.pool import install_sigterm_as_interrupt, interrupted_exit_code


def format_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key} {format_metric(key, value)}")
    return "  ".join(parts)


def print_epoch(report: EpochReport) -> None:
    tqdm.write(
        f"[{report.phase} {report.epoch}/{report.epochs}] loss {report.train_loss:.4f}  "
        f"{format_metrics(report.metrics)}  ({report.seconds:.1f}s, {report.images_per_second:.0f} img/s)"
    )


@guarded
def main() -> int:
    p = parser(
        "python -m search.train",
        "Train one configuration of a study (by default the report's) and print its numbers.",
        "example: python -m search.train study=mnist_guided data.root=../shared/data "
        "model.channels=32 train.epochs=3",
    )
    p.add_argument("--fresh", action="store_true", help="ignore and replace earlier checkpoints")
    args = p.parse_args()
    cfg = config_from_args(args.overrides)
    data_cfg, model_cfg, train_cfg = to_dataclasses(cfg)
    check_checkpoints_reachable(cfg)
    store = checkpoint_store(cfg)  # a folder, or a URL mirrored in a local cache
    relative = standalone_run_relative(cfg)
    install_sigterm_as_interrupt()
    try:
        if args.fresh:
            store.clear(relative)
        else:
            store.pull(relative)  # a download from a URL may take a while: interruptible
        ckpt_dir = store.local(relative)
        splits = load_splits(data_cfg)
        run = Run(
            cfg.task,
            splits,
            model_cfg,
            train_cfg,
            checkpoint_dir=ckpt_dir,
            identity=checkpoint_identity(
                cfg,
                splits.digest,
                written_identity(ckpt_dir / PRETRAIN_FILE),
                splits.num_classes,
            ),
            on_checkpoint=store.push if store.remote else None,
        )
        print(
            f"study {cfg.name}: task {cfg.task} on {cfg.data.name} "
            f"({len(splits.train_y)} train / {len(splits.val_y)} val / {len(splits.test_y)} test), "
            f"device {run.device}, checkpoints {store.where(relative)}",
            flush=True,
        )
        if run.task != "guided" and not (ckpt_dir / PRETRAIN_FILE).exists():
            # The untrained encoder's score is the bar that pretraining has to clear.
            print(
                f"[pretrain 0/{cfg.train.epochs}] untrained encoder: knn_accuracy "
                f"{run.knn_accuracy() * 100:.2f}%",
                flush=True,
            )
        results = run.fit(on_epoch=print_epoch)
    except CheckpointError as error:  # unreadable, or written for other settings
        raise UsageError(
            f"{error}; run again with --fresh to train from epoch 0 in its place"
        ) from None
    except CheckpointTransferError as error:  # the shared store failed: not the input
        print(
            f"error: {mask_secrets(str(error).splitlines()[0])}; run the same command again to "
            "resume from the last checkpoint once it can be reached",
            file=sys.stderr,
        )
        return 1
    except CheckpointWriteError as error:  # a full disk, say: not the input
        print(
            f"error: {str(error).splitlines()[0]}; free space or fix the folder, then run the "
            "same command again to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:  # a checkpoint being written is finished first (Run.fit)
        print(
            f"\ninterrupted: run the same command again to resume from the last checkpoint in "
            f"{store.where(relative)}",
            file=sys.stderr,
        )
        return interrupted_exit_code()
    print("final:")
    for key, value in results.items():
        print(f"  {key:16s} {format_metric(key, value)}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
