"""big_vision / vit_jax ``.npz`` checkpoints: one array per flattened ``a/b/c`` key.

``np.load`` reads members lazily, so tensors are read one at a time. Keys saved by
big_vision's ``save_checkpoint`` may carry a ``params/`` prefix; ``NpzCheckpoint`` strips it
(and refuses object arrays: nothing here unpickles)."""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Any

import numpy as np

from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.reader import CheckpointReader


class NpzCheckpoint(CheckpointReader):
    """A big_vision ``.npz``; ``config`` is the model config when the caller knows it (the
    file does not say)."""

    def __init__(self, path: str, *, config: Any = None):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such .npz file")
        try:
            self._npz = np.load(path, allow_pickle=False)
            names = list(self._npz.files)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: not a readable .npz archive ({e})") from None
        prefix = "params/" if names and all(n.startswith("params/") for n in names) else ""
        self._names = {n[len(prefix) :]: n for n in names}
        self._headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        super().__init__(path, "npz", config=config)

    def _header(self, member: str) -> tuple[tuple[int, ...], np.dtype]:
        """A member's (shape, dtype) from its .npy header, checked against the bytes the
        member holds (a crafted header declaring a huge shape would otherwise make numpy
        allocate it before finding the data short)."""
        if member in self._headers:
            return self._headers[member]
        zf = self._npz.zip
        info = zf.NameToInfo.get(member + ".npy") or zf.getinfo(member)
        try:
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                offset = f.tell()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{self.path}: cannot read member {member!r}: bad .npy header ({_one_line(e)})"
            ) from None
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if dtype.itemsize else 0
        if dtype.hasobject:
            need = 0  # refused when read (no pickle)
        if need > info.file_size - offset:
            raise CheckpointError(
                f"{self.path}: member {member!r} declares shape {tuple(shape)} {dtype} "
                f"({need} bytes) but holds {info.file_size - offset}; the archive is corrupt"
            )
        self._headers[member] = (tuple(shape), dtype)
        return self._headers[member]

    def keys(self) -> list[str]:
        return sorted(self._names)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def read(self, key: str) -> np.ndarray:
        if key not in self._names:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        member = self._names[key]
        self._header(member)
        try:
            return np.asarray(self._npz[member])
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
            # a member failing its CRC, truncated, badly compressed or encrypted
            raise CheckpointError(
                f"{self.path}: cannot read member {member!r}: the archive is corrupt or "
                f"truncated ({_one_line(e)})"
            ) from None
        except ValueError as e:  # e.g. an object array (would need pickle), a bad header
            raise CheckpointError(
                f"{self.path}: cannot read member {member!r} ({_one_line(e)})"
            ) from None

    # shape and dtype read the member (not only its header): the zip CRC is checked on a full
    # read, so `inspect` reports a corrupt member as `upcycle` would.
    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.read(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return self.read(key).dtype


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
