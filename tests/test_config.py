"""Config system: YAML → typed dataclasses, validated, with errors naming the file, key and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from reference.gru import GRUConfig
from reference.validation import ConfigError
from training import build_model, load_experiment
from training.config import TrainConfig, from_mapping

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
GOOD = {"model": {"name": "gru", "hidden_dim": 16}, "task": {"name": "needle", "n_needles": 2, "seq_len": 16}}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path: Path) -> None:
    exp = load_experiment(path)
    for impl in ("reference", "optimized"):
        with torch.device("meta"):  # shapes only: the 100M+ recipes would take seconds to initialise
            model = build_model(path, impl)
        assert sum(p.numel() for p in model.parameters()) > 0
    assert exp.source == str(path)


def test_vocab_size_is_taken_from_the_task() -> None:
    exp = load_experiment(GOOD)
    assert isinstance(exp.model, GRUConfig)
    assert exp.model.vocab_size == 16 + 16 + 16 + 1


def test_unknown_key_names_the_file_the_key_and_the_allowed_keys(tmp_path: Path) -> None:
    bad = {**GOOD, "model": {"name": "gru", "hiden_dim": 16}}
    path = write(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"exp\.yaml.*model\.hiden_dim: unknown key \(did you mean 'hidden_dim'\?\)"
                                          r".*allowed keys: .*hidden_dim"):
        load_experiment(path)


def test_negative_length_is_rejected_with_the_allowed_range(tmp_path: Path) -> None:
    path = write(tmp_path, {**GOOD, "task": {"name": "needle", "seq_len": -5}})
    with pytest.raises(ConfigError, match=r"task: seq_len: must be an integer >= 1, got -5"):
        load_experiment(path)


def test_wrong_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size: must be an integer, got 'big'"):
        load_experiment({**GOOD, "train": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"train\.schedule: must be one of 'constant', 'cosine', 'linear'"):
        load_experiment({**GOOD, "train": {"schedule": "exp"}})


def test_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config file not found"):
        build_model(tmp_path / "nope.yaml", "optimized")


def test_unknown_model_task_section_and_impl() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'transformer'; registered models: .*gru"):
        load_experiment({**GOOD, "model": {"name": "transformer"}})
    with pytest.raises(ConfigError, match=r"unknown section 'optim'"):
        load_experiment({**GOOD, "optim": {}})
    with pytest.raises(ConfigError, match=r"impl must be one of reference, optimized, got 'fast'"):
        build_model(GOOD, "fast")


def test_needle_constraints_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"seq_len: must be at least 2·n_needles \+ 2 = 18"):
        load_experiment({**GOOD, "task": {"name": "needle", "n_needles": 8, "seq_len": 16}})


def test_train_config_ranges() -> None:
    with pytest.raises(ConfigError, match=r"lr: must be a number > 0, got -0.1"):
        from_mapping(TrainConfig, {"lr": -0.1})
    assert from_mapping(TrainConfig, {"lr": "3e-4"}).lr == pytest.approx(3e-4)


def test_model_vocab_smaller_than_task_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"model\.vocab_size: must be >= the task's vocabulary \(49\)"):
        load_experiment({**GOOD, "model": {"name": "gru", "vocab_size": 10}})


def test_build_model_from_model_mapping_and_dataclass() -> None:
    m1 = build_model({"name": "gru", "vocab_size": 11, "hidden_dim": 8}, "reference")
    m2 = build_model(GRUConfig(vocab_size=11, hidden_dim=8), "optimized")
    assert list(m1.state_dict()) == list(m2.state_dict())
    with pytest.raises(ConfigError, match=r"vocab_size"):
        build_model({"name": "gru", "hidden_dim": 8}, "reference")
