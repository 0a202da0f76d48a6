"""search.space: conditional parameters, Optuna distributions, the baseline trial, ordering."""

from __future__ import annotations

import math
import random
from typing import Any

import optuna
import pytest
from conftest import QUICKSTART_SETTINGS
from omegaconf import DictConfig, OmegaConf

from models.errors import UsageError
from search.config import ConfigError, ParamSpec, available_studies, load_config, study_path
from search.space import (
    apply,
    baseline_params,
    check_dependencies,
    contains,
    distribution,
    is_active,
    ordered,
    suggest,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def quickstart() -> DictConfig:
    return load_config("quickstart")


def space_of(**specs: dict[str, Any]) -> DictConfig:
    """A ``search.space`` mapping of typed ParamSpecs (target defaults to train.epochs)."""
    return OmegaConf.create(
        {
            name: OmegaConf.merge(OmegaConf.structured(ParamSpec), {"target": "x", **spec})
            for name, spec in specs.items()
        }
    )


def previous_ordered(space: DictConfig) -> list[str]:
    """The hand-written ordering ``ordered`` replaced, kept to pin the sampling order."""
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
            raise ValueError("circular")
    return done


def sample(space: DictConfig, n: int, seed: int = 0) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(suggest(trial, space))
        study.tell(trial, 0.0)
    return out


# ---- conditional parameters ----------------------------------------------------------------


def test_when_activates_a_parameter_only_for_its_parents_values() -> None:
    space = space_of(
        opt={"choices": ["adam", "sgd", "lars"]},
        adam_lr={"low": 1e-4, "high": 1e-2, "log": True, "when": {"opt": "adam"}},
        momentum={"low": 0.8, "high": 0.99, "when": {"opt": ["sgd", "lars"]}},
    )
    assert is_active(space.opt, {})
    assert is_active(space.adam_lr, {"opt": "adam"})
    assert not is_active(space.adam_lr, {"opt": "sgd"})
    assert not is_active(space.adam_lr, {})  # the parent has no value (inactive itself)
    assert is_active(space.momentum, {"opt": "lars"}) and is_active(space.momentum, {"opt": "sgd"})
    assert not is_active(space.momentum, {"opt": "adam"})


def test_suggest_asks_only_for_active_parameters(quickstart: DictConfig) -> None:
    cfg = quickstart
    lr_of = {"adam": "adam_lr", "sgd": "sgd_lr", "lars": "lars_lr"}
    seen = set()
    for params in sample(cfg.search.space, 40):
        opt = params["optimizer"]
        seen.add(opt)
        lrs = {name for name in params if name.endswith("_lr")}
        assert lrs == {lr_of[opt]}
        assert ("lars_warmup_epochs" in params) == (opt == "lars")
        assert ("sgd_schedule" in params) == (opt == "sgd")
        assert {"channels", "batch_size", "temperature", "aug_strength"} <= set(params)
    assert seen == {"adam", "sgd", "lars"}


# ---- ranges --------------------------------------------------------------------------------


def test_distributions_follow_the_spec() -> None:
    space = space_of(
        c={"choices": [8, 16]},
        i={"type": "int", "low": 0, "high": 10, "step": 2},
        il={"type": "int", "low": 1, "high": 64, "log": True},
        f={"low": 0.0, "high": 1.0, "step": 0.25},
        fl={"low": 1e-4, "high": 1e-1, "log": True},
    )
    assert distribution(space.c) == optuna.distributions.CategoricalDistribution([8, 16])
    assert distribution(space.i) == optuna.distributions.IntDistribution(0, 10, step=2)
    assert distribution(space.il) == optuna.distributions.IntDistribution(1, 64, log=True)
    assert distribution(space.f) == optuna.distributions.FloatDistribution(0.0, 1.0, step=0.25)
    assert distribution(space.fl) == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)

    for params in sample(space, 30, seed=3):
        assert params["c"] in (8, 16)
        assert isinstance(params["i"], int) and params["i"] in range(0, 11, 2)
        assert isinstance(params["il"], int) and 1 <= params["il"] <= 64
        assert params["f"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert 1e-4 <= params["fl"] <= 1e-1


def test_contains_uses_bounds_steps_and_choices() -> None:
    cat = optuna.distributions.CategoricalDistribution(["adam", "sgd"])
    assert contains(cat, "adam") and not contains(cat, "lars") and not contains(cat, None)
    step = optuna.distributions.IntDistribution(1, 9, step=2)
    assert contains(step, 5) and not contains(step, 4) and not contains(step, 11)
    fstep = optuna.distributions.FloatDistribution(0.0, 1.0, step=0.1)
    assert contains(fstep, 0.3) and not contains(fstep, 0.35)  # 0.3 is 3 steps, within 1e-8
    log = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
    assert contains(log, 1e-3) and contains(log, 1.0) and not contains(log, 2.0)
    assert not contains(log, 0.0) and not contains(log, -1.0)
    assert not contains(log, "fast") and not contains(log, None) and not contains(log, math.nan)


# ---- baseline ------------------------------------------------------------------------------


def test_baseline_is_the_study_files_own_settings(quickstart: DictConfig) -> None:
    assert baseline_params(quickstart) == QUICKSTART_SETTINGS


def test_baseline_leaves_out_values_outside_the_space(quickstart: DictConfig) -> None:
    cfg = quickstart.copy()
    cfg.train.optim.lr = 0.5
    cfg.model.channels = 32
    params = baseline_params(cfg)
    assert "adam_lr" not in params and "channels" not in params  # the sampler fills them
    assert params["optimizer"] == "adam" and params["batch_size"] == 64


def test_baseline_conditional_parameters_follow_their_parent(quickstart: DictConfig) -> None:
    cfg = quickstart.copy()
    cfg.train.optim.name = "sgd"
    cfg.train.optim.schedule = "cosine"
    params = baseline_params(cfg)
    assert params["optimizer"] == "sgd"
    assert params["sgd_lr"] == 3.0e-3 and params["sgd_schedule"] == "cosine"
    assert not {"adam_lr", "lars_lr", "lars_warmup_epochs", "lars_schedule"} & set(params)


def test_baseline_takes_the_reports_value_of_a_setting_left_unset(quickstart: DictConfig) -> None:
    """Unset (None) means the report's value for the data's family and the task (the README):
    the report's trial must carry it, not leave it to the sampler. MNIST family: temperature
    0.5, SimCLR views at strength 1, no augmentation for the other encoders; CIFAR: 0.15."""
    cfg = quickstart.copy()
    cfg.train.temperature = None
    cfg.train.aug_strength = None
    assert baseline_params(cfg) == QUICKSTART_SETTINGS  # the same as the values written out
    cifar = load_config("cifar_contrastive", ["train.temperature=null", "train.aug_strength=null"])
    assert baseline_params(cifar)["temperature"] == 0.15
    assert baseline_params(cifar)["aug_strength"] == 1.0
    guided = load_config("mnist_guided", ["train.aug_strength=null"])
    assert baseline_params(guided)["aug_strength"] == 0.0
    # An image folder decoded as "auto": its family is known only from its images.
    folder = cfg.copy()
    folder.data.name, folder.data.family = "imagefolder", "auto"
    assert "temperature" not in baseline_params(folder)
    folder.data.family = "cifar"
    assert baseline_params(folder)["temperature"] == 0.15


def test_apply_writes_each_value_to_its_target(quickstart: DictConfig) -> None:
    cfg = quickstart
    out = apply(cfg, {"channels": 8, "optimizer": "sgd", "sgd_lr": 0.1, "lars_warmup_epochs": 2})
    assert out.model.channels == 8 and out.train.optim.name == "sgd"
    assert out.train.optim.lr == 0.1 and out.train.optim.warmup_epochs == 2
    assert cfg.model.channels == 16 and cfg.train.optim.lr == 3.0e-3  # the input is unchanged


# ---- dependencies and order ----------------------------------------------------------------


def test_circular_when_is_rejected_naming_the_cycle() -> None:
    space = space_of(
        a={"choices": [1, 2], "when": {"c": 1}},
        free={"choices": [1]},
        b={"choices": [1, 2], "when": {"a": 1}},
        c={"choices": [1, 2], "when": {"b": 1}},
    )
    with pytest.raises(
        UsageError, match=r"^search\.space\.a\.when: circular dependency a -> c -> b -> a"
    ):
        ordered(space)
    with pytest.raises(
        UsageError, match=r"^search\.space\.b\.when: circular dependency b -> a -> b"
    ):
        check_dependencies(
            space_of(b={"choices": [1], "when": {"a": 1}}, a={"choices": [1], "when": {"b": 1}})
        )


def test_unknown_or_own_parent_is_rejected() -> None:
    with pytest.raises(UsageError, match=r"^search\.space\.a\.when: 'z' is not a parameter"):
        ordered(space_of(a={"choices": [1], "when": {"z": 1}}))
    with pytest.raises(UsageError, match=r"^search\.space\.a\.when: a parameter cannot depend"):
        ordered(space_of(a={"choices": [1], "when": {"a": 1}}))


def test_order_is_file_order_with_parents_first() -> None:
    space = space_of(
        child={"choices": [1], "when": {"parent": 1}},
        parent={"choices": [1], "when": {"grandparent": 1}},
        other={"choices": [1]},
        grandparent={"choices": [1]},
        late={"choices": [1], "when": {"other": 1}},
    )
    # pass 1 places other, grandparent, late; pass 2 parent; pass 3 child
    assert ordered(space) == ["other", "grandparent", "late", "parent", "child"]


@pytest.mark.parametrize("study", available_studies())
def test_order_is_unchanged_on_every_study(study: str) -> None:
    """The sampling order (hence every seeded search) is the one the old ordering gave."""
    space = space_of(**OmegaConf.load(study_path(study)).search.space)  # as load_config types it
    order = ordered(space)
    assert order == previous_ordered(space)
    for name in order:
        assert all(order.index(dep) < order.index(name) for dep in space[name].when)


def test_order_is_unchanged_on_random_dependency_graphs() -> None:
    rng = random.Random(0)
    for _ in range(100):
        names = [f"p{i}" for i in range(rng.randint(1, 9))]
        rank = names[:]
        rng.shuffle(rank)  # parents come earlier in this hidden rank, so there is no cycle
        specs = {}
        for name in names:
            earlier = rank[: rank.index(name)]
            parents = rng.sample(earlier, k=min(len(earlier), rng.randint(0, 2)))
            specs[name] = {"when": {p: 1 for p in parents}}
        space = OmegaConf.create(specs)  # ordering reads only ``when``
        assert ordered(space) == previous_ordered(space)


def test_a_when_naming_two_parameters_needs_both() -> None:
    spec = OmegaConf.merge(
        OmegaConf.structured(ParamSpec),
        {"target": "x", "low": 0.0, "high": 1.0, "when": {"opt": "sgd", "sched": "cosine"}},
    )
    assert is_active(spec, {"opt": "sgd", "sched": "cosine"})
    assert not is_active(spec, {"opt": "sgd", "sched": "constant"})
    assert not is_active(spec, {"opt": "adam", "sched": "cosine"})
    assert not is_active(spec, {"opt": "sgd"})


@pytest.mark.parametrize(("study", "kept"), [("quickstart", "adam"), ("mnist_guided", "sgd")])
def test_narrowing_a_choice_that_other_parameters_depend_on_leaves_them_unused(study, kept):
    """The README pins a parameter with ``search.space.NAME.choices=[v]``; for ``optimizer``
    it was refused in every shipped study, since each learning rate's ``when`` names another
    optimizer. Now those parameters are never sampled; a ``when`` value that is no optimizer
    at all is still a typo."""
    cfg = load_config(study, [f"search.space.optimizer.choices=[{kept}]"])
    study_ = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = suggest(study_.ask(), cfg.search.space)
        assert params["optimizer"] == kept
        assert f"{kept}_lr" in params
        assert not {f"{o}_lr" for o in ("adam", "sgd", "lars") if o != kept} & set(params)
    with pytest.raises(ConfigError, match=r"sgd_lr\.when\.optimizer: 'sgdd' is not one of"):
        load_config(study, ["search.space.sgd_lr.when.optimizer=[sgdd]"])
