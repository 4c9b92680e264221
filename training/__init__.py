"""Shared non-model code: tasks, config schema, registry, training loop, schedules, metrics, checkpoints."""
