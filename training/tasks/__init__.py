"""Synthetic tasks, generated in-process from a seed (no files, no network)."""
