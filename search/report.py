"""Write a study's report: ``python -m search.report study=NAME [key=value ...]`` (or ``study=all``).

Writes ``<runs_dir>/report/NAME.md``, ``NAME-trials.csv`` (every trial of the three stages) and
PNG figures beside them: the report's results table for the configuration the search found next
to the published numbers, the best parameters of each stage, what the rungs (or pruning) saved, optimization
history, intermediate values and parameter importances, and the report's three figure kinds
(test reconstructions, latent interpolation, t-SNE of the test set in raw image space and in the
latent space of every task run on the same dataset in this storage). Where a study has too
little data for a figure, the report says so instead. ``study=all`` also writes
``all-studies.md``: the report's results table from every finished study in the storage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from models.config import check_device
from models.errors import UsageError
from reporting.report import REPORT_TSNE_POINTS, write_combined, write_report
from reporting.store import has_stored_config, locate, open_existing_storage, study_names
from search import redact, resolved_paths, storage_url
from search.cli import guarded, parser, split_study
from search.database import folder_problem

MIN_TSNE_POINTS = 5


@guarded
def main() -> int:
    p = parser(
        "python -m search.report",
        __doc__.split("\n\n")[0],
        "examples:\n  python -m search.report study=quickstart\n"
        "  python -m search.report study=all runs_dir=/data/runs\n"
        "  python -m search.report study=mnist_autoencoder data.root=../shared/data",
    )
    p.add_argument("--out", default=None, help="folder to write to (default <runs_dir>/report)")
    p.add_argument(
        "--tsne-points",
        type=int,
        default=REPORT_TSNE_POINTS,
        help=f"test images per t-SNE panel at most (default {REPORT_TSNE_POINTS})",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    args: argparse.Namespace = p.parse_args()
    check_device(args.device, "--device")
    if args.tsne_points < MIN_TSNE_POINTS:
        raise UsageError(
            f"--tsne-points: must be at least {MIN_TSNE_POINTS} (a t-SNE of fewer points is "
            f"noise), got {args.tsne_points}"
        )
    if args.out and (problem := folder_problem(args.out)) is not None:
        raise UsageError(f"--out: cannot make the folder {args.out}: {problem}")
    import matplotlib

    matplotlib.use("Agg")  # Optuna's plots go through pyplot: never open a window
    study, rest = split_study(args.overrides)
    name, base = locate(study, rest)
    url = storage_url(base)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_existing_storage(url)
    names = [name] if name else study_names(storage)
    if name is None:  # study=all: one half-made study does not stop the reports of the rest
        for unfinished in [n for n in names if not has_stored_config(storage, n)]:
            print(
                f"warning: study: skipping {unfinished!r}: it has no stored config (a run was "
                "stopped as it created the study; run it again to finish it)",
                file=sys.stderr,
            )
            names.remove(unfinished)
        if not names and study_names(storage):
            raise UsageError("study: every study in storage is half-made (warned above)")
    if not names:
        raise UsageError(f"study: no study in {redact(url)}; run python -m search.run first")
    try:
        _write(name, names, storage, url, rest, base, args)
    except OSError as error:  # the folder could not be made or written (a full disk, /proc)
        where = error.filename or args.out or "the report folder"
        print(f"error: report: cannot write {where}: {error.strerror or error}", file=sys.stderr)
        return 1
    return 0


def _write(
    name: str | None,
    names: list[str],
    storage: optuna.storages.BaseStorage,
    url: str,
    rest: list[str],
    base: Any,
    args: argparse.Namespace,
) -> None:
    """Each study's report, and for ``study=all`` the table of every finished study."""
    folders = []
    for each in names:
        started = time.perf_counter()
        doc = write_report(each, storage, url, rest, args.out, args.tsne_points, args.device)
        folders.append(doc.out_dir)
        print(f"{each}: wrote {len(doc.files)} files in {time.perf_counter() - started:.1f}s")
        for path in doc.files:
            print(f"  {path}")
    if name is None:  # study=all: one table of every finished study, beside the reports
        out = (
            Path(args.out)
            if args.out
            else folders[0]
            if len(set(folders)) == 1
            else resolved_paths(base)["runs"] / "report"
        )
        combined = write_combined(storage, url, rest, out)
        if combined is not None:
            print(f"all studies: wrote {combined}")


if __name__ == "__main__":
    sys.exit(main())
