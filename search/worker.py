"""Join a running study as one more worker: ``python -m search.worker study=NAME storage=URL``.

Start as many as you like, on this machine or others (they need the same study settings, the
same storage URL and a checkpoint folder they can all read; see README "Storage and scaling out").
``device=cpu|cuda|cuda:N`` picks this worker's device (default: CUDA when visible). Ctrl-C or
SIGTERM stops the worker cleanly; its running trial is re-enqueued and resumes from its last
checkpoint in whichever worker takes it.
"""

from __future__ import annotations

import os
import sys

import optuna

from models.training import describe_device, resolve_device
from reporting.artifacts import make_trial_artifact_hook
from reporting.store import open_existing_storage, require_study
from search import (
    StageError,
    StorageUnavailableError,
    check_checkpoints_reachable,
    check_devices,
    install_sigterm_as_interrupt,
    interrupted_exit_code,
    redact,
    resolved_paths,
    storage_url,
    worker_loop,
)
from search.cli import config_from_args, fail, guarded, parser
from search.database import WORKER_STORAGE_ENV


@guarded
def main() -> int:
    p = parser("python -m search.worker", __doc__.split("\n\n")[0], __doc__.split("\n\n", 1)[1])
    p.add_argument("--no-progress", action="store_true", help="hide per-batch progress bars")
    p.add_argument(
        "--create",
        action="store_true",
        help="make the study when the storage does not hold it yet (several workers started at "
        "once on an empty database); without it a worker only joins a study that exists, so a "
        "typo in name= or storage= is an error, not a new study nobody watches",
    )
    args = p.parse_args()
    label, rest = "worker", []
    for item in args.overrides:
        if item.startswith("device="):  # validated like train.device, on this machine
            rest.append(f"train.device={item.split('=', 1)[1]}")
        elif item.startswith("label="):
            label = item.split("=", 1)[1]
            if not label or not label.isprintable():  # it starts every line this worker prints
                fail(f"label: a printable name for this worker's lines, got {label!r}")
        else:
            rest.append(item)
    cfg = config_from_args(rest)
    # A launcher (search.run workers=N) passes the URL in the environment, not in the file.
    url = os.environ.get(WORKER_STORAGE_ENV) or storage_url(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Its devices and whether the study is there to join are checked before anything is
    # written (worker_loop loads the data before it opens the study): bad input writes nothing.
    check_devices(cfg)
    check_checkpoints_reachable(cfg)
    if not args.create:
        require_study(
            open_existing_storage(url),
            str(cfg.name),
            url,
            "; start it with python -m search.run (or pass --create to make it here)",
        )
    install_sigterm_as_interrupt()
    device = describe_device(resolve_device(cfg.train.device))
    print(f"[{label}] joining {cfg.name} at {redact(url)} on {device}", flush=True)
    try:
        worker_loop(
            cfg,
            url,
            device=cfg.train.device,
            label=label,
            progress=not args.no_progress,
            hooks=[make_trial_artifact_hook(resolved_paths(cfg)["artifacts"])],
        )
    except KeyboardInterrupt:
        print(
            f"[{label}] interrupted: its running trial was re-enqueued and will resume", flush=True
        )
        return interrupted_exit_code()
    except StorageUnavailableError as error:
        print(f"[{label}] error: {error}; start the worker again once it is back", file=sys.stderr)
        return 1
    except StageError as error:
        print(f"[{label}] error: {error}", file=sys.stderr)
        return 1
    print(f"[{label}] done: no trial left in any stage", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
