"""Detect a checkpoint's format and open it behind the one reader face (``reader.py``)."""

from __future__ import annotations

import os
from typing import Any

from sparse_upcycle.checkpoints import FORMATS
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.hf import HFCheckpoint, is_hf
from sparse_upcycle.checkpoints.layout import RECIPE_FILE, UpcycledCheckpoint, is_upcycle_output
from sparse_upcycle.checkpoints.npz import NpzCheckpoint
from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint, is_orbax
from sparse_upcycle.checkpoints.reader import CheckpointReader
from sparse_upcycle.checkpoints.t5x import CHECKPOINT_FILE, T5XCheckpoint

__all__ = ["FORMATS", "detect_format", "open_checkpoint"]
_READERS: dict[str, Any] = {
    "t5x": T5XCheckpoint,
    "orbax": OrbaxCheckpoint,
    "npz": NpzCheckpoint,
    "hf": HFCheckpoint,
}


def detect_format(path: str) -> str:
    """One of ``FORMATS[1:]`` for ``path``; our own layout (a directory holding
    ``recipe.json``) is ``orbax`` (its tensors are an Orbax checkpoint)."""
    if os.path.isfile(path) and path.endswith(".npz"):
        return "npz"
    if os.path.basename(path) == CHECKPOINT_FILE or os.path.isfile(
        os.path.join(path, CHECKPOINT_FILE)
    ):
        return "t5x"
    if is_orbax(path) or os.path.isfile(os.path.join(path, RECIPE_FILE)):
        return "orbax"
    if is_hf(path):
        return "hf"
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(
        f"{path}: cannot tell the checkpoint format; pass --format ({' | '.join(FORMATS[1:])})"
    )


def open_checkpoint(path: str, fmt: str = "auto", *, config: Any = None) -> CheckpointReader:
    """The reader of the checkpoint at ``path`` in format ``fmt`` (``auto``: detected). A
    directory in our layout (``upcycle``/``export`` output) is opened as such whatever
    ``fmt`` says (``format == "upcycled"``, ``is_upcycled``). ``config`` is the model config
    of a checkpoint that does not describe its model (T5X, Orbax, .npz)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; one of {FORMATS}")
    if is_upcycle_output(path):
        return UpcycledCheckpoint(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    return _READERS[fmt](path) if config is None else _READERS[fmt](path, config=config)


def open_dense(path: str, fmt: str) -> CheckpointReader:
    """The dense checkpoint ``upcycle`` and ``verify`` start from (not one of our outputs)."""
    source = open_checkpoint(path, fmt)
    if source.is_upcycled:
        raise CheckpointError(
            f"{path}: an upcycle/export output, not a dense checkpoint; pass the dense "
            "checkpoint it came from"
        )
    return source


def load_upcycled(path: str) -> tuple[dict, dict]:
    """(recipe.json dict, flat params) of a directory written by ``upcycle``."""
    ckpt = UpcycledCheckpoint(path)
    return ckpt.info or {}, {k: ckpt.read(k) for k in ckpt.keys()}
