"""From a study's ``search.space`` to Optuna suggestions and back to a concrete config.

Parameters are sampled in dependency order, so a conditional one (``when``) is only suggested
once the parameter it depends on has a value; inactive parameters are never suggested, which
keeps Optuna's view of the space honest (TPE with ``group=True`` models each branch apart).
"""

from __future__ import annotations

from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf


def _wanted(value: Any) -> list[Any]:
    return list(value) if OmegaConf.is_list(value) or isinstance(value, list) else [value]


def ordered(space: DictConfig) -> list[str]:
    """Parameter names with every ``when`` dependency before its dependents."""
    done: list[str] = []
    pending = list(space.keys())
    while pending:
        progressed = False
        for name in list(pending):
            if all(dep in done for dep in space[name].when):
                done.append(name)
                pending.remove(name)
                progressed = True
        if not progressed:
            raise ValueError(f"search.space: circular 'when' between {', '.join(pending)}")
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

    A parameter whose current value lies outside its range is left out (the sampler fills it);
    conditional parameters follow the values of their parents.
    """
    params: dict[str, Any] = {}
    space = cfg.search.space
    for name in ordered(space):
        spec = space[name]
        if not is_active(spec, params):
            continue
        value = OmegaConf.select(cfg, spec.target)
        if value is None and spec.target == "train.temperature":
            continue
        dist = distribution(spec)
        try:
            if dist._contains(dist.to_internal_repr(value)):
                params[name] = value
        except (TypeError, ValueError):
            pass
    return params
