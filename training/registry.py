"""The one place that knows which models and tasks exist.

Entries are import paths, loaded lazily, so that building a GRU never imports Triton or another model.
To add a model: write `reference/<name>.py` (config dataclass + module taking the config) and
`optimized/<name>.py` (a subclass), then add one line to `MODELS`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from torch import nn

from reference.validation import ConfigError

Impl = Literal["reference", "optimized"]
IMPLS: tuple[str, ...] = ("reference", "optimized")


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: str  # "module:Class" of the frozen config dataclass
    reference: str  # "module:Class" of the reference nn.Module (constructor takes the config)
    optimized: str  # "module:Class" of the optimized subclass

    @property
    def config_cls(self) -> type[Any]:
        cls: type[Any] = _load(self.config)
        return cls

    def module_cls(self, impl: str) -> type[nn.Module]:
        if impl not in IMPLS:
            raise ConfigError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        cls: type[nn.Module] = _load(self.reference if impl == "reference" else self.optimized)
        return cls


class Task(Protocol):
    """A seeded, in-process data source. `batch` is a pure function of (split, index, seed)."""

    vocab_size: int

    def batch(self, split: str, index: int, batch_size: int, seed: int) -> tuple[Any, Any]: ...


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: str
    task: str

    @property
    def config_cls(self) -> type[Any]:
        cls: type[Any] = _load(self.config)
        return cls

    def build(self, cfg: Any) -> Task:
        task: Task = _load(self.task)(cfg)
        return task

    def vocab_size(self, cfg: Any) -> int:
        return self.build(cfg).vocab_size


MODELS: dict[str, ModelSpec] = {
    "atlas_omega": ModelSpec("atlas_omega", "reference.atlas_omega:AtlasOmegaConfig",
                             "reference.atlas_omega:AtlasOmega", "optimized.atlas_omega:AtlasOmega"),
    "gru": ModelSpec("gru", "reference.gru:GRUConfig", "reference.gru:GRUModel", "optimized.gru:GRUModel"),
    "atlas_mag": ModelSpec("atlas_mag", "reference.atlas_mag:AtlasMAGConfig", "reference.atlas_mag:AtlasMAG",
                           "optimized.atlas_mag:AtlasMAG"),
    "hamt": ModelSpec("hamt", "reference.hamt:HAMTConfig", "reference.hamt:HAMT", "optimized.hamt:HAMT"),
    "unified": ModelSpec("unified", "reference.unified:UnifiedConfig", "reference.unified:UnifiedMambaHopfieldDEQ",
                         "optimized.unified:UnifiedMambaHopfieldDEQ"),
    "emma_liquid": ModelSpec("emma_liquid", "reference.emma:EMMAConfig", "reference.emma:EMMA", "optimized.emma:EMMA"),
}

TASKS: dict[str, TaskSpec] = {
    "modular": TaskSpec("modular", "training.tasks.modular:ModularConfig", "training.tasks.modular:ModularTask"),
    "masked_words": TaskSpec("masked_words", "training.tasks.masked_words:MaskedWordsConfig",
                             "training.tasks.masked_words:MaskedWordsTask"),
    "multitask": TaskSpec("multitask", "training.tasks.multitask:MultiTaskConfig",
                          "training.tasks.multitask:MultiTask"),
    "needle": TaskSpec("needle", "training.tasks.needle:NeedleConfig", "training.tasks.needle:NeedleTask"),
    "text": TaskSpec("text", "training.tasks.text:TextConfig", "training.tasks.text:TextTask"),
    "smollm": TaskSpec("smollm", "training.tasks.smollm:SmolLMConfig", "training.tasks.smollm:SmolLMTask"),
}


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def get_task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def _path_of(cfg: Any) -> str:
    return f"{type(cfg).__module__}:{type(cfg).__qualname__}"


def model_name_of(cfg: Any) -> str:
    """The registered name of a model config (matched by import path, so no other model is imported)."""
    for spec in MODELS.values():
        if _path_of(cfg) == spec.config:
            return spec.name
    raise ConfigError(f"{type(cfg).__name__} is not the config class of any registered model")


def task_name_of(cfg: Any) -> str:
    for spec in TASKS.values():
        if _path_of(cfg) == spec.config:
            return spec.name
    raise ConfigError(f"{type(cfg).__name__} is not the config class of any registered task")


def build_model(config: Any, impl: str = "reference") -> nn.Module:
    """Build any registered model, for either implementation.

    `config` may be an experiment YAML path or mapping (its `model:` section is used, `vocab_size` from its
    task), a model mapping with `name:`, or a model config dataclass instance.
    """
    from training.config import ExperimentConfig, from_mapping, load_experiment, load_yaml

    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if isinstance(config, ExperimentConfig):
        return build_model(config.model, impl)
    if isinstance(config, (str, Path)):
        return build_model(load_yaml(config) | {"__source__": str(config)}, impl)
    if isinstance(config, Mapping):
        data = dict(config)
        source = str(data.pop("__source__", "<dict>"))
        if "model" in data:
            return build_model(load_experiment(data if source == "<dict>" else source), impl)
        name = data.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{source}: a model config needs `name:` (one of {', '.join(sorted(MODELS))}) "
                              f"or an experiment with a `model:` section")
        spec = get_model_spec(name)
        try:
            cfg = from_mapping(spec.config_cls, data, where="model")
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return spec.module_cls(impl)(cfg)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return get_model_spec(model_name_of(config)).module_cls(impl)(config)
    raise ConfigError(f"build_model: config must be a path, a mapping or a model config, got {type(config).__name__}")
