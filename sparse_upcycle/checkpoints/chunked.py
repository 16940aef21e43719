"""A tensor written part by part (``Chunked``), for writers that stream (safetensors)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


class Chunked:
    """A tensor given as consecutive parts along its first axis (e.g. an MoE layer's experts,
    one at a time), so that it is written without being assembled: ``parts`` yields arrays of
    ``dtype`` whose rows, in order, make up ``shape``. ``np.asarray`` assembles it."""

    def __init__(self, shape: tuple[int, ...], dtype, parts: Callable[[], Iterator[np.ndarray]]):
        self.shape, self.dtype, self._parts = tuple(shape), np.dtype(dtype), parts

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def parts(self) -> Iterator[np.ndarray]:
        return self._parts()

    def astype(self, dtype, copy: bool = True) -> Chunked:
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        return Chunked(self.shape, dtype, lambda: (p.astype(dtype) for p in self._parts()))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate([np.asarray(p) for p in self._parts()], axis=0)
        whole = whole.reshape(self.shape)
        return whole if dtype is None else whole.astype(dtype)
