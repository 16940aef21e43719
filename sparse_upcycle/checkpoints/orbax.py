"""Orbax checkpoints: ours (a ``params`` item written by ``upcycle``/``train``) and generic
PyTree ones. The tree is flattened to ``a/b/c`` keys; a top-level ``params`` key (ours, and
many training states) is descended into."""

from __future__ import annotations

import os

import numpy as np
import orbax.checkpoint as ocp

from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.tree import InMemoryCheckpoint, flatten, unflatten


def is_orbax(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))
        or os.path.exists(os.path.join(path, "_METADATA"))
    )


class OrbaxCheckpoint(InMemoryCheckpoint):
    """Reads the whole tree on first access (orbax restores trees, not single tensors)."""

    def __init__(self, path: str):
        if not is_orbax(path):
            raise CheckpointError(f"{path}: not an Orbax checkpoint directory (no _METADATA)")
        self.path = os.path.abspath(path)
        try:
            tree = ocp.StandardCheckpointer().restore(self.path)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot restore the Orbax checkpoint ({e})") from None
        if isinstance(tree, dict) and set(tree) >= {"params"}:
            step = tree.get("step")
            tree = tree["params"]
        else:
            step = None
        self.step = None if step is None else int(np.asarray(step))
        self._flat = {k: np.asarray(v) for k, v in flatten(tree).items()}


def write_orbax(path: str, params: dict[str, np.ndarray], *, step: int | None = None) -> None:
    """Write flat params as ``{"params": tree[, "step": n]}`` (the layout ``upcycle`` writes)."""
    state = {"params": unflatten(params)}
    if step is not None:
        state["step"] = np.asarray(step, np.int64)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), state)
    checkpointer.wait_until_finished()
