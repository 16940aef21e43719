"""Path containment: a checkpoint is read only from inside its own source directory.

A checkpoint's files name other files: a safetensors index names its shards, a T5X msgpack
names a zarr array per tensor, an HF directory holds tokenizer and generation files, and any
of them may be a symlink. Each such reference must resolve (``os.path.realpath``) inside the
source directory, checked before the file is opened; otherwise a crafted index or spec could
make ``upcycle`` read (and write into its output) any file the user can read.

One allowance: a Hugging Face hub cache snapshot, ``…/models--org--name/snapshots/<rev>/``,
holds symlinks into ``../../blobs/``; its files may resolve anywhere inside that same cache
entry (``models--org--name/``), not into another model's entry.
"""

from __future__ import annotations

import os

from sparse_upcycle.checkpoints.errors import CheckpointError

# What a hub cache entry's directory name starts with (huggingface_hub's REPO_ID_SEPARATOR
# layout: "{type}s--{org}--{name}").
_HUB_ENTRY_PREFIXES = ("models--", "datasets--", "spaces--")


def source_root(path: str) -> str:
    """The directory every file of the checkpoint at ``path`` must resolve inside: the
    resolved directory itself (or, for a file, its directory), or the hub cache entry
    ``models--org--name/`` when that directory lies in one of the entry's snapshots."""
    real = os.path.realpath(path)
    directory = real if os.path.isdir(real) else os.path.dirname(real)
    parts = directory.split(os.sep)
    # …/models--org--name/snapshots/<rev>[/sub…]: the innermost such triple wins.
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(_HUB_ENTRY_PREFIXES):
            return os.sep.join(parts[:i]) or os.sep
    return directory


def is_contained(path: str, root: str) -> bool:
    """Whether ``path`` resolves to ``root`` or somewhere under it."""
    real, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, root]) == root


def contained(path: str, root: str, entry: str) -> str:
    """The resolved ``path`` when it lies inside ``root`` (see ``source_root``); else a
    CheckpointError naming ``entry`` (what in the checkpoint refers to ``path``) and where
    it points. Call it before opening ``path``."""
    real, root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, root]) != root:
        raise CheckpointError(
            f"{entry} points to {real}, outside the checkpoint directory {root}; every file a "
            "checkpoint refers to must lie inside it (copy the file there instead)"
        )
    return real


def check_entries(directory: str, root: str, *, recursive: bool = False) -> None:
    """``contained`` for every file in ``directory`` (its subdirectories too when
    ``recursive``, including symlinked ones, which a copy would follow): for a directory
    whose files are read or copied as a whole (an HF model's side files, ``hf_source/``).
    Dangling symlinks are left alone (nothing reads them)."""
    for here, dirs, files in os.walk(directory):
        for name in files + (dirs if recursive else []):
            path = os.path.join(here, name)
            if os.path.exists(path):
                contained(path, root, path)
        if not recursive:
            break
