"""Orbax checkpoints: ours (a ``params`` item written by ``upcycle``/``train``) and generic
PyTree ones. The tree is flattened to ``a/b/c`` keys; a top-level ``params`` key (ours, and
many training states) is descended into.

``StreamingWriter`` writes a checkpoint about 64 MB at a time with Orbax's partial saving
(``orbax.checkpoint.experimental.v1.partial``): the tree lives under ``<path>/state`` and is
only visible once finalised, so the whole tree is never in memory at once."""

from __future__ import annotations

import os

import numpy as np
import orbax.checkpoint as ocp

from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.tree import InMemoryCheckpoint, flatten, unflatten


def _tree_dir(path: str) -> str:
    """The directory holding the PyTree: ``<path>/state`` for the v1 layout, else ``path``."""
    state = os.path.join(path, "state")
    return state if os.path.isfile(os.path.join(state, "_METADATA")) else path


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
            tree = ocp.StandardCheckpointer().restore(_tree_dir(self.path))
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


class StreamingWriter:
    """Add tensors one at a time; every ``flush_bytes`` they are written with an Orbax partial
    save, and ``close`` finalises the checkpoint (nothing is visible at ``path`` before)."""

    def __init__(self, path: str, flush_bytes: int = 64 << 20):
        self.path = os.path.abspath(path)
        self.flush_bytes = flush_bytes
        self._buffer: dict[str, np.ndarray] = {}
        self._buffered = 0
        self.bytes_written = 0

    def add(self, key: str, array: np.ndarray) -> None:
        self._buffer[key] = np.asarray(array)
        self._buffered += self._buffer[key].nbytes
        if self._buffered >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        from orbax.checkpoint.experimental.v1 import partial

        partial.save(self.path, {"params": unflatten(self._buffer)})
        self.bytes_written += self._buffered
        self._buffer, self._buffered = {}, 0

    def close(self, step: int | None = None) -> None:
        from orbax.checkpoint.experimental.v1 import partial

        self.flush()
        if step is not None:
            partial.save(self.path, {"step": np.asarray(step, np.int64)})
        partial.finalize(self.path)
