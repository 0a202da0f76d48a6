"""Plumbing shared by the benchmarks: ``key=value`` arguments, tables, the machine, the data root.

Benchmarks print tables and assert nothing about timings; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# ---- arguments -----------------------------------------------------------------------------


class Option:
    """One ``key=value`` argument: its default, how to parse it, and its help line."""

    def __init__(self, default: Any, parse: Callable[[str], Any], help: str) -> None:
        self.default = default
        self.parse = parse
        self.help = help


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def csv_int(text: str) -> list[int]:
    return [int(part) for part in csv(text)]


def boolean(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_options(
    prog: str, description: str, options: dict[str, Option], epilog: str = ""
) -> dict[str, Any]:
    """argparse with ``key=value`` positionals (the style of ``python -m search.run``)."""
    width = max(len(f"{name}={opt.default}") for name, opt in options.items()) + 2
    lines = [f"  {f'{name}={opt.default}':<{width}}{opt.help}" for name, opt in options.items()]
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="options (key=value, default shown):\n" + "\n".join(lines) + "\n\n" + epilog + "\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="see the options below")
    args = p.parse_args()
    # String defaults go through the same parser as given values (e.g. "0,2" -> [0, 2]).
    values = {
        name: opt.parse(opt.default) if isinstance(opt.default, str) else opt.default
        for name, opt in options.items()
    }
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        key = key.lstrip("-")
        if not sep or key not in options:
            p.error(f"{item}: unknown option; allowed: {', '.join(options)} (as key=value)")
        try:
            values[key] = options[key].parse(raw)
        except ValueError as error:
            p.error(f"{key}: {error}")
    return values


# ---- output --------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (readable in a terminal, pastable into the README)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def bounded_ratio(a: float, b: float, a_low: float, b_low: float, digits: int = 2) -> str:
    """``a / b`` of two medians of epochs to a target, where a median that is a miss is
    infinite: then a bound (``<a/b_low``, ``>a_low/b``; ``*_low`` the median with misses
    counted at their method's total epochs), never the 0 or inf that dividing by infinity
    gives; ``-`` where both are misses.

    >>> bounded_ratio(30.0, math.inf, 30.0, 100.0, 3), bounded_ratio(20.0, 40.0, 20.0, 40.0)
    ('<0.300', '0.50')
    """
    if math.isinf(a) and math.isinf(b):
        return "-"
    if math.isinf(b):
        return f"<{a / b_low:.{digits}f}"
    if math.isinf(a):
        return f">{a_low / b:.{digits}f}"
    return f"{a / b:.{digits}f}"


def log(message: str) -> None:
    """Progress lines go to stderr so stdout keeps only the tables."""
    print(message, file=sys.stderr, flush=True)


# ---- machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for row in out.splitlines():
            if row.lower().startswith("model name"):
                return row.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device | None = None) -> str:
    text = (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    if device is not None and device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


# ---- data ----------------------------------------------------------------------------------


def default_data_root() -> str:
    """``../shared/data`` beside the checkout when present, else the library's default."""
    if SHARED_DATA.is_dir():
        return str(SHARED_DATA)
    return os.environ.get("SSL_SEARCH_DATA", "data")


def mnist_available(root: str) -> bool:
    return (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def cifar_available(root: str) -> bool:
    base = Path(root)
    return (base / "cifar-10-batches-py").is_dir() or (base / "cifar10-jpeg" / "train").is_dir()
