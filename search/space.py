"""From a study's ``search.space`` to Optuna suggestions and back to a concrete config.

Parameters are sampled in dependency order, so a conditional one (``when``) is only suggested
once the parameter it depends on has a value; inactive parameters are never suggested, which
keeps Optuna's view of the space honest (TPE with ``group=True`` models each branch apart).
"""

from __future__ import annotations

import graphlib
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from models.config import data_family
from models.errors import UsageError
from models.training import report_default


def _wanted(value: Any) -> list[Any]:
    return list(value) if OmegaConf.is_list(value) or isinstance(value, list) else [value]


def check_dependencies(space: DictConfig) -> None:
    """Every ``when`` names another parameter of the space, and no chain of them is circular.

    Raises :class:`~models.errors.UsageError` naming ``search.space.<name>.when``.
    """
    names = list(space.keys())
    for name in names:
        for dep in space[name].when:
            if dep == name:
                raise UsageError(f"search.space.{name}.when: a parameter cannot depend on itself")
            if dep not in space:
                others = ", ".join(n for n in names if n != name)
                raise UsageError(
                    f"search.space.{name}.when: {dep!r} is not a parameter of search.space; "
                    f"allowed: {others}"
                )
    graph = {name: list(space[name].when) for name in names}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        # args[1] lists the cycle with each node needed by the next; read it backwards so that
        # each name depends on the next, and start at the one that comes first in the file.
        cycle = list(reversed(error.args[1]))[:-1]
        start = min(range(len(cycle)), key=lambda i: names.index(cycle[i]))
        cycle = cycle[start:] + cycle[:start]
        chain = " -> ".join([*cycle, cycle[0]])
        raise UsageError(
            f"search.space.{cycle[0]}.when: circular dependency {chain} "
            "(each parameter's 'when' names the next)"
        ) from None


def ordered(space: DictConfig) -> list[str]:
    """Parameter names with every ``when`` dependency before its dependents.

    The order parameters are sampled in, so it never changes for a given space: file order,
    except that a parameter waits for the passes over the file that place its dependencies.
    Raises :class:`~models.errors.UsageError` for a circular or unknown dependency.
    """
    check_dependencies(space)
    done: list[str] = []
    pending = list(space.keys())
    while pending:  # each pass places at least one name: the dependencies form no cycle
        for name in list(pending):
            if all(dep in done for dep in space[name].when):
                done.append(name)
                pending.remove(name)
    return done


def is_active(spec: DictConfig, params: dict[str, Any]) -> bool:
    return all(dep in params and params[dep] in _wanted(v) for dep, v in spec.when.items())


def distribution(spec: DictConfig) -> optuna.distributions.BaseDistribution:
    if spec.choices is not None:
        return optuna.distributions.CategoricalDistribution(list(spec.choices))
    if spec.type == "int":
        return optuna.distributions.IntDistribution(
            int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1)
        )
    return optuna.distributions.FloatDistribution(
        float(spec.low), float(spec.high), log=spec.log, step=spec.step
    )


def contains(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    """Whether ``dist`` can produce ``value``: one of its choices, or inside its range and on
    its step. Only public Optuna API (``to_internal_repr``, the bounds and choices)."""
    try:
        internal = dist.to_internal_repr(value)  # a choice's index; raises when not a choice
    except (TypeError, ValueError):
        return False
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return True
    if not dist.low <= internal <= dist.high:  # an IntDistribution or a FloatDistribution
        return False
    if isinstance(dist, optuna.distributions.IntDistribution):
        return (internal - dist.low) % dist.step == 0
    if dist.step is None:
        return True
    k = (internal - dist.low) / dist.step
    return abs(k - round(k)) < 1.0e-8  # Optuna's own tolerance for a float step


def suggest(trial: optuna.Trial, space: DictConfig) -> dict[str, Any]:
    """Ask ``trial`` for every active parameter; returns name -> value."""
    params: dict[str, Any] = {}
    for name in ordered(space):
        spec = space[name]
        if not is_active(spec, params):
            continue
        dist = distribution(spec)
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            params[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        else:
            params[name] = trial.suggest_float(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
    return params


def apply(cfg: DictConfig, params: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with each parameter's value written to its target."""
    out = cfg.copy()
    for name, value in params.items():
        OmegaConf.update(out, cfg.search.space[name].target, value, merge=False)
    return out


def baseline_params(cfg: DictConfig) -> dict[str, Any]:
    """The study's own settings (the report's) expressed as parameters of its space.

    A setting left unset means the report's value (:func:`models.training.report_default`: the
    NT-Xent temperature and augmentation strengths of the data's family and the task); where
    that family is known only from the images (an ``auto`` image folder), it is left out. A
    parameter whose value lies outside its range is left out too (the sampler fills it);
    conditional parameters follow the values of their parents.
    """
    params: dict[str, Any] = {}
    space = cfg.search.space
    family = data_family(cfg.data)
    for name in ordered(space):
        spec = space[name]
        if not is_active(spec, params):
            continue
        value = OmegaConf.select(cfg, spec.target)
        if value is None and family is not None:
            value = report_default(spec.target, family, str(cfg.task))
        if contains(distribution(spec), value):
            params[name] = value
    return params
