"""Shared non-model code: tasks, config schema, registry, training loop, schedules, metrics, checkpoints.

`from training import build_model` builds any registered model from a config, for either implementation.
"""

from training.config import ExperimentConfig, TrainConfig, load_experiment
from training.registry import MODELS, TASKS, build_model

__all__ = ["MODELS", "TASKS", "ExperimentConfig", "TrainConfig", "build_model", "load_experiment"]
