"""Layers point one way: CLI -> reporting -> search -> models; storage is used by search only.

Walks every module's imports with ``ast`` (function-level imports included) and fails on one that
points up a layer, on a storage import outside the search layer, and on private names reached
across packages or into Optuna.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "storage", "search", "reporting", "benchmarks")
# Command-line entry points: argument parsing, the error guard and printing. They sit on top.
CLI_MODULES = {
    "search.cli",
    "search.run",
    "search.worker",
    "search.train",
    "search.report",
    "search.dashboard",
    "search.give_up",
}
# Which layers each layer may import from.
ALLOWED = {
    "cli": {"cli", "reporting", "search", "models"},
    "reporting": {"reporting", "search", "models"},
    "search": {"search", "models", "storage"},
    "models": {"models"},
    "storage": {"storage"},
}


def layer_of(module: str) -> str | None:
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if top == "benchmarks" or module in CLI_MODULES:
        return "cli"
    return top


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


MODULES = project_modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_a_layer(module: str) -> None:
    own = layer_of(module)
    wrong = []
    for line, target, _ in imports_of(MODULES[module], module):
        other = layer_of(target)
        if other is not None and other not in ALLOWED[own]:
            wrong.append(f"{MODULES[module].name}:{line} imports {target} ({own} -> {other})")
    assert not wrong, "imports that point up a layer or reach storage from outside search:\n" + (
        "\n".join(wrong)
    )


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_packages_or_from_optuna(module: str) -> None:
    own_package = module.split(".")[0]
    wrong = []
    for line, target, names in imports_of(MODULES[module], module):
        top = target.split(".")[0]
        if top == "optuna" and (
            any(_is_private(part) for part in target.split("."))
            or any(_is_private(n) for n in names)
        ):
            wrong.append(f"{MODULES[module].name}:{line} imports private {target} {names}")
        if top in PACKAGES and top != own_package and any(_is_private(n) for n in names):
            wrong.append(f"{MODULES[module].name}:{line} imports private {names} from {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_attributes_of_other_objects(module: str) -> None:
    """``x._name`` only on ``self``/``cls``: a private attribute of another object (an Optuna
    trial's ``_trial_id``, a study's ``_storage``, a distribution's ``_contains``, another class's
    helper) is not an API to build on."""
    tree = ast.parse(MODULES[module].read_text())
    wrong = [
        f"{MODULES[module].name}:{node.lineno} uses .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and _is_private(node.attr)
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]
    assert not wrong, "\n".join(wrong)


def test_the_layer_rules_catch_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a models module importing search is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from search.config import load_config\nimport storage.urls\n")
    targets = [t for _, t, _ in imports_of(bad, "models.bad")]
    assert [layer_of(t) for t in targets] == ["search", "storage"]
    assert not ALLOWED["models"] & {"search", "storage"}
    assert "storage" not in ALLOWED["reporting"] and "storage" not in ALLOWED["cli"]
