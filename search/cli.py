"""Shared command-line plumbing: ``study=NAME key=value ...`` arguments and one-line errors.

Every ``python -m search.*`` command takes Hydra-style overrides. Expected failures (a bad
study, override, setting, data location or storage URL: any :class:`~models.errors.UsageError`
or :class:`~search.StorageError`) print ``error: <key>: <what is allowed>`` on stderr and exit
with code 2; nothing below the CLI prints or exits.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn

from omegaconf import DictConfig

from models.errors import UsageError
from search import StorageError
from search.config import ConfigError, load_config
from search.database import StorageUnavailableError, mask_secrets

EXIT_USAGE = 2

__all__ = [
    "EXIT_USAGE",
    "UsageError",
    "config_from_args",
    "fail",
    "guarded",
    "parser",
    "split_study",
]


def fail(message: str) -> NoReturn:
    """Print ``message`` as the one-line error (any password in it masked), exit code 2."""
    print(f"error: {mask_secrets(message)}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


class _Parser(argparse.ArgumentParser):
    """``key=value`` arguments may come before, between or after the options, as users write
    them (``search.report study=q --out x runs_dir=y``); plain argparse refuses those after."""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        return self.parse_intermixed_args(args, namespace)


def parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """Every command's parser: ``key=value`` overrides, anywhere among its options."""
    p = _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="study=NAME (a file under studies/ or a .yaml path), then any config field by "
        "dotted path, e.g. train.epochs=3 model.channels=32",
    )
    return p


def split_study(overrides: Sequence[str], default: str | None = None) -> tuple[str, list[str]]:
    """Take ``study=...`` out of the override list."""
    study = default
    rest: list[str] = []
    for item in overrides:
        if item.startswith("study="):
            study = item.split("=", 1)[1]
        else:
            rest.append(item)
    if not study:
        fail("study: missing; pass study=NAME (see studies/) or study=path/to/file.yaml")
    return study, rest


def config_from_args(overrides: Sequence[str], default_study: str | None = None) -> DictConfig:
    study, rest = split_study(overrides, default_study)
    try:
        return load_config(study, rest)
    except ConfigError as error:
        fail(str(error))


def _stdout_closed() -> bool:
    """Whether this process's standard output is a pipe its reader has closed (the write end
    of such a pipe polls as an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor, or no poll here
        return False


def guarded(main: Callable[[], int | None]) -> Callable[[], int | None]:
    """Turn expected input errors raised anywhere below into one line and exit code 2."""

    def wrapper() -> int | None:
        # Optuna flags the heartbeat, retry and artifact APIs as experimental on every call;
        # a command shows its user results, not those notices.
        # (Matched by text: importing optuna here would slow every command's start.)
        warnings.filterwarnings("ignore", message=r".* is experimental \(supported from")
        warnings.filterwarnings("ignore", message=r"Argument ``\w+`` is an experimental feature")
        try:
            code = main()
            sys.stdout.flush()  # here, where a closed pipe is caught, not at the exit
            return code
        except (UsageError, StorageError) as error:
            fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
        except StorageUnavailableError as error:  # not the input: the database went away
            print(
                f"error: {mask_secrets(str(error))}; run the same command again once it is back",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            # Ctrl-C before a command set up its own handling (while it loads its settings,
            # its data or its imports): nothing to resume yet, so no traceback either.
            print("interrupted; run the same command again to go on", file=sys.stderr)
            pool = sys.modules.get("search.pool")  # SIGTERM turned into this, once installed
            raise SystemExit(pool.interrupted_exit_code() if pool else 130) from None
        except BrokenPipeError:
            if not _stdout_closed():
                raise  # a socket or another pipe: a real error, with its traceback
            # Output piped into a reader that stopped (``| head``): not an error of the command.
            # Python's own recipe: point stdout at devnull so the exit does not flush into the
            # closed pipe again, and exit as a process killed by SIGPIPE would (128 + 13).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None

    return wrapper
