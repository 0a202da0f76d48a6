"""Give up one configuration of a rung study: ``python -m search.give_up study=NAME configuration=N``.

For a checkpoint that is lost for good (the disk or machine that held it is gone): every worker
that takes a leg continuing it from that checkpoint stops with the path it cannot read, and
the study cannot end. Giving the configuration up lets it go on: its queued legs fail when a
worker takes them (training nothing, never retried), it is not continued again, and a place at
the long budget it held goes to the next configuration in rank. What it recorded stays in the
study and the report. ``reason=TEXT`` is stored with it (default: its checkpoint is lost).
Pass the same ``runs_dir=`` / ``storage=`` the study runs with.
"""

from __future__ import annotations

import optuna

from models.errors import UsageError
from reporting.store import locate, open_existing_storage, stored_config
from search import give_up, load_studies, redact, storage_url
from search.cli import guarded, parser, split_study

DEFAULT_REASON = "its checkpoint is lost"


@guarded
def main() -> int:
    p = parser(
        "python -m search.give_up",
        __doc__.split("\n\n")[0],
        "example:\n  python -m search.give_up study=mnist_guided configuration=17 "
        "reason='host b disk lost'",
    )
    args = p.parse_args()
    number, reason, rest = None, DEFAULT_REASON, []
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key == "configuration":
            if not value.isdecimal() or not value.isascii():
                raise UsageError(
                    f"configuration: the number a worker's error names (#N), got {value!r}"
                )
            number = int(value)
        elif key == "reason":
            if not value.strip() or not value.isprintable():
                raise UsageError("reason: one line of printable text")
            reason = value.strip()
        else:
            rest.append(item)
    if number is None:
        raise UsageError("configuration: required, configuration=N (the #N a worker's error names)")
    study, overrides = split_study(rest)
    name, base = locate(study, overrides)
    if name is None:
        raise UsageError("study: one study's name, not all")
    url = storage_url(base)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = stored_config(open_existing_storage(url), name, overrides, url)
    print(give_up(load_studies(cfg, url), cfg, number, reason))
    print(f"  storage: {redact(url)}; workers running or started now go on without it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
