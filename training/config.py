"""YAML → typed, validated, frozen dataclasses.

An experiment file has three sections, each mapped 1:1 onto a dataclass:

    model: {name: gru, hidden_dim: 128, ...}   # the registered model's config class
    task:  {name: needle, n_needles: 2, ...}   # the registered task's config class
    train: {steps: 1500, batch_size: 64, ...}  # TrainConfig

Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the file, the key, the value
given and what is allowed. `model.vocab_size` may be omitted: it is then taken from the task.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from reference.validation import ConfigError

__all__ = ["ExperimentConfig", "TrainConfig", "from_mapping", "load_experiment", "load_yaml", "to_dict"]

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping document is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(p)!r} (check the path; configs live in configs/)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow ints for floats and numeric strings like '3e-4'."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: must be a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: must be null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_mapping(tp, value, where=key)
    raise ConfigError(f"{key}: unsupported annotation {tp!r} (a bug in the config class)")


def from_mapping(cls: type[T], data: Any, *, where: str = "") -> T:
    """Build the frozen dataclass `cls` from a mapping, rejecting unknown keys and wrong types.

    Range checks live in each class's `__post_init__` and raise ConfigError; `where` prefixes every message.
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: must be a mapping of keys to values, got {data!r}")
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{prefix}{key}: unknown key{hint}; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict of builtins (tuples become lists), for YAML/JSON/checkpoints."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v
    out = plain(obj)
    assert isinstance(out, dict)
    return out


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError `key: must be <allowed>, got <value>` unless `ok` (for `__post_init__` checks)."""
    if not ok:
        raise ConfigError(f"{key}: must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. The LR schedule depends on `steps` only, so a run stopped early with
    `--max-steps` and resumed later follows the same schedule as an uninterrupted one."""

    steps: int = 1000
    batch_size: int = 32
    grad_accum_steps: int = 1
    tbptt_length: int = 0  # > 0: truncated BPTT over segments of this many tokens (recurrent-state models)
    dtype: Literal["float32", "float64"] = "float32"  # parameter dtype (float64 for exactness checks)
    autocast: Literal["none", "bf16"] = "none"  # bf16 autocast for the forward pass (GPU mixed precision)
    # torch.compile the training forward with this mode (reduce-overhead: replayed as CUDA graphs); none: eager
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    loss: Literal["cross_entropy", "stablemax"] = "cross_entropy"  # StableMax: Prieto et al. 2025
    perp_grad: bool = False  # ⊥Grad: project gradients orthogonal to the weights before clipping
    perp_grad_min_dim: int = 2
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    eval_batch_size: int = 0  # 0: same as batch_size
    checkpoint_every: int = 200
    seed: int = 0
    max_bad_steps: int = 10
    probes: tuple[str, ...] = ()  # names in training.probes.PROBES, run at every evaluation

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "an integer >= 1")
        require(self.tbptt_length >= 0, "tbptt_length", self.tbptt_length, "an integer >= 0 (0 disables TBPTT)")
        require(self.lr > 0, "lr", self.lr, "a number > 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        require(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)")
        require(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        require(self.eval_batches >= 1, "eval_batches", self.eval_batches, "an integer >= 1")
        require(self.eval_batch_size >= 0, "eval_batch_size", self.eval_batch_size, "an integer >= 0")
        require(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "an integer >= 1")
        require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        require(self.max_bad_steps >= 1, "max_bad_steps", self.max_bad_steps, "an integer >= 1")
        require(self.perp_grad_min_dim >= 1, "perp_grad_min_dim", self.perp_grad_min_dim, "an integer >= 1")
        from training.probes import PROBES

        unknown = [p for p in self.probes if p not in PROBES]
        require(not unknown, "probes", self.probes, f"names from: {', '.join(sorted(PROBES)) or '(none registered)'}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole run: model, task and training sections, plus where it came from (for messages)."""

    model: Any
    task: Any
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = "<dict>"
    episodic: Any = None  # training.episodic.EpisodicConfig when the experiment trains episodically

    def as_dict(self) -> dict[str, Any]:
        from training.registry import model_name_of, task_name_of

        out = {
            "model": {"name": model_name_of(self.model), **to_dict(self.model)},
            "task": {"name": task_name_of(self.task), **to_dict(self.task)},
            "train": to_dict(self.train),
        }
        if self.episodic is not None:
            out["episodic"] = to_dict(self.episodic)
        return out


SECTIONS = ("model", "task", "train", "episodic")


def apply_overrides(data: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the raw experiment mapping with `section.key=value` overrides applied (values parsed as YAML)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-3")
        if section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section {section!r}; allowed sections: {', '.join(SECTIONS)}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: section {section!r} is not a mapping")
        target[name] = value
    return out


def load_experiment(config: str | Path | Mapping[str, Any], *, seed: int | None = None,
                    source: str | None = None) -> ExperimentConfig:
    """Load and validate an experiment from a YAML path or a mapping; `seed` overrides `train.seed`;
    `source` names a mapping's origin in error messages."""
    from training.registry import get_model_spec, get_task_spec

    if isinstance(config, (str, Path)):
        data: Mapping[str, Any] = load_yaml(config)
        source = source or str(config)
    elif isinstance(config, Mapping):
        data, source = config, source or "<dict>"
    else:
        raise ConfigError(f"config must be a YAML path or a mapping, got {type(config).__name__}")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}; allowed sections: {', '.join(SECTIONS)}")
    for section in ("model", "task"):
        if section not in data:
            raise ConfigError(f"{source}: missing section {section!r} (it needs at least `name:`)")
    try:
        task_data = dict(data["task"]) if isinstance(data["task"], Mapping) else data["task"]
        task_spec = get_task_spec(_pop_name(task_data, "task"))
        task_cfg = from_mapping(task_spec.config_cls, task_data, where="task")
        model_data = dict(data["model"]) if isinstance(data["model"], Mapping) else data["model"]
        model_spec = get_model_spec(_pop_name(model_data, "model"))
        vocab = task_spec.vocab_size(task_cfg)
        if "vocab_size" not in model_data:
            model_data["vocab_size"] = vocab
        elif isinstance(model_data["vocab_size"], int) and model_data["vocab_size"] < vocab:
            raise ConfigError(f"model.vocab_size: must be >= the task's vocabulary ({vocab}), "
                              f"got {model_data['vocab_size']}; omit it to take the task's")
        model_cfg = from_mapping(model_spec.config_cls, model_data, where="model")
        train_data = dict(data.get("train") or {})
        if seed is not None:
            train_data["seed"] = seed
        train_cfg = from_mapping(TrainConfig, train_data, where="train")
        episodic = None
        if data.get("episodic") is not None:
            from training.episodic import EpisodicConfig

            episodic = from_mapping(EpisodicConfig, data["episodic"], where="episodic")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return ExperimentConfig(model=model_cfg, task=task_cfg, train=train_cfg, source=source, episodic=episodic)


def _pop_name(section: Any, what: str) -> str:
    if not isinstance(section, dict):
        raise ConfigError(f"{what}: must be a mapping with a `name:` key, got {section!r}")
    name = section.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{what}.name: missing; every {what} section names a registered {what}")
    return name
