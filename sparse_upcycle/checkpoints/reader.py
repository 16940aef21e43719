"""The one face of every checkpoint reader (T5X, Orbax, big_vision .npz, HF, our own layout).

A reader sets everything it knows about its checkpoint in its own constructor; callers read
these attributes and never add their own:

* ``path``: where the checkpoint is; ``format``: ``t5x`` | ``orbax`` | ``npz`` | ``hf`` |
  ``upcycled`` (an ``upcycle``/``export --format orbax`` output, ``checkpoints/layout.py``);
* ``step``: the training step the checkpoint holds, or None;
* ``is_upcycled``: True only for our own layout (tensors taken as they are, no surgery);
* ``config``: the model config the architecture starts from when the experiment says
  ``model.name="checkpoint"``: an HF model's (from ``config.json``), the dense model an
  ``upcycle`` output came from (``recipe.json``'s ``dense_model``), or what the caller knows
  for a format that does not describe its model (``open_checkpoint(..., config=...)``);
* ``model_config``: the config of the model these very tensors are, when the checkpoint says
  so itself (HF ``config.json``, ``recipe.json``'s ``model``), else None;
* ``family``: the registered model family (``models.get``) when known, else None;
* ``info``: our ``recipe.json`` dict, or None;
* ``dense_step``: the step count of the dense run behind the checkpoint (its own ``step`` for a
  dense checkpoint; for ours, the source's step recorded in ``recipe.json``).

Methods: ``keys()`` (sorted ``a/b/c`` parameter paths), ``shape(k)``, ``dtype(k)`` (without
reading the tensor where the format allows), ``read(k)`` (one tensor as a numpy array),
``optimizer_state_keys()`` (``<param path>/<slot>``; empty when the checkpoint holds none) and
``read_optimizer_state(k)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparse_upcycle.checkpoints.errors import CheckpointError


class CheckpointReader:
    """Base of every reader: the attributes above, and the optimizer-state methods of a
    checkpoint that holds none. Subclasses implement ``keys``, ``read``, ``shape``, ``dtype``."""

    def __init__(
        self,
        path: str,
        format: str,
        *,
        step: int | None = None,
        dense_step: int | None = None,
        is_upcycled: bool = False,
        config: Any = None,
        model_config: Any = None,
        family: str | None = None,
        info: dict | None = None,
    ):
        self.path = path
        self.format = format
        self.step = step
        self.dense_step = dense_step
        self.is_upcycled = is_upcycled
        self.config = config
        self.model_config = model_config
        self.family = family
        self.info = info

    def keys(self) -> list[str]:
        raise NotImplementedError

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def optimizer_state_keys(self) -> list[str]:
        """Keys of the per-parameter optimizer slots (``<param path>/<slot>``); none here."""
        return []

    def read_optimizer_state(self, key: str) -> np.ndarray:
        raise CheckpointError(f"{self.path}: no optimizer state {key!r}")

    def training_state(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{path: (shape, dtype)}`` of a training run's whole optimizer state (a ``train``
        checkpoint's optax state); none here."""
        return {}

    def read_training_state(self, keys: list[str]) -> dict[str, np.ndarray]:
        raise CheckpointError(f"{self.path}: holds no training optimizer state")


class InMemoryReader(CheckpointReader):
    """A reader over a flat ``{path: array}`` dict held in memory (``self._flat``), for
    formats read whole (HF safetensors, renamed into our paths at load)."""

    _flat: dict[str, np.ndarray]

    def keys(self) -> list[str]:
        return sorted(self._flat)

    def __contains__(self, key: str) -> bool:
        return key in self._flat

    def read(self, key: str) -> np.ndarray:
        try:
            return self._flat[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.read(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return self.read(key).dtype
