"""``sparse-upcycle train``: one training run.

The loop is ``loop.train_and_evaluate`` (shared with ``compare``); every field and its default
is ``defaults.default_config`` (``configs/*.py`` import it from here or from there).
"""

from __future__ import annotations

from sparse_upcycle.defaults import default_config
from sparse_upcycle.loop import TrainingError, dump_json, train_and_evaluate

__all__ = ["TrainingError", "default_config", "dump_json", "run", "train_and_evaluate"]


def run(config, workdir: str) -> dict:
    """Train ``config`` in ``workdir`` (resuming what is there); returns the run's result."""
    return train_and_evaluate(config, workdir)
