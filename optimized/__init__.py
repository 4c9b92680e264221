"""memarch optimized implementations: the reference API, fast. Each module mirrors `reference/<name>.py`."""
