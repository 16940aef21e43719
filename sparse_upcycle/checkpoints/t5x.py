"""T5X legacy checkpoints, read (and written, for tests and round trips) without t5x.

Layout of a step directory ``checkpoint_<step>/`` (the format of the public T5 and Switch
checkpoints; t5x/checkpoints.py):

* ``checkpoint``: a msgpack file of the flax-serialised state dict
  ``{"optimizer": {"target": params, "state": {"step": …, "param_states": …}}}``. Small arrays
  are stored inline (flax's msgpack ndarray ext type); large ones are replaced by a tensorstore
  spec dict ``{"driver": "zarr", "kvstore": {"driver": "file", "path": P}, "metadata": …}``.
* ``P`` (e.g. ``target.encoder.layers_0.mlp.wi_0.kernel``): a zarr array, path relative to the
  step directory. bfloat16 arrays use tensorstore's ``bfloat16`` zarr dtype (ml_dtypes here).

``T5XCheckpoint`` parses the msgpack once and reads tensors one at a time, so a surgeon can
stream a checkpoint larger than memory. Keys are ``/``-joined paths (``encoder/layers_0/…``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorstore as ts
from flax import serialization

from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.paths import check_entries, contained, source_root
from sparse_upcycle.checkpoints.reader import CheckpointReader
from sparse_upcycle.checkpoints.tree import unflatten

CHECKPOINT_FILE = "checkpoint"


def _is_ts_spec(node) -> bool:
    return isinstance(node, Mapping) and "driver" in node and "kvstore" in node


def _flatten(tree, prefix="") -> dict:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping) and not _is_ts_spec(value):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def resolve_step_dir(path: str) -> str:
    """Accept a step directory or its ``checkpoint`` file; return the step directory."""
    path = os.path.abspath(path)
    if os.path.isfile(path) and os.path.basename(path) == CHECKPOINT_FILE:
        return os.path.dirname(path)
    if os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        return path
    raise CheckpointError(
        f"{path}: not a T5X checkpoint (expected a checkpoint_<step>/ directory holding a "
        f"'{CHECKPOINT_FILE}' msgpack file, or that file itself)"
    )


class T5XCheckpoint(CheckpointReader):
    """A T5X step directory: ``params`` keys, ``shape``/``dtype`` without reading, ``read``;
    ``path`` is the step directory, ``config`` the model config when the caller knows it."""

    def __init__(self, path: str, *, config: Any = None):
        self.step_dir = resolve_step_dir(path)
        self._root = source_root(self.step_dir)  # the msgpack and every zarr array lie inside
        self._checked: dict[str, str] = {}  # zarr path -> its checked realpath
        file = os.path.join(self.step_dir, CHECKPOINT_FILE)
        real = contained(file, self._root, file)
        try:
            with open(real, "rb") as f:
                state = serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several unrelated types on bad bytes
            raise CheckpointError(f"{file}: cannot parse the T5X msgpack state ({e})") from None
        optimizer = state.get("optimizer") if isinstance(state, Mapping) else None
        if not isinstance(optimizer, Mapping) or "target" not in optimizer:
            raise CheckpointError(f"{file}: no optimizer/target in the T5X state")
        self._params = _flatten(optimizer["target"])
        opt_state = optimizer.get("state") or {}
        param_states = opt_state.get("param_states") if isinstance(opt_state, Mapping) else None
        self._opt_state = _flatten(param_states) if isinstance(param_states, Mapping) else {}
        step = opt_state.get("step") if isinstance(opt_state, Mapping) else None
        step = None if step is None else int(np.asarray(step))
        super().__init__(self.step_dir, "t5x", step=step, dense_step=step, config=config)

    # ---------------------------------------------------------------- parameters
    def keys(self) -> list[str]:
        return sorted(self._params)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._params)

    def __contains__(self, key: str) -> bool:
        return key in self._params

    def _node(self, key, tree):
        try:
            return tree[key]
        except KeyError:
            raise CheckpointError(f"{self.step_dir}: no tensor {key!r}") from None

    def _open(self, spec, key: str):
        spec, path = self._local_spec(spec, key)
        try:
            return ts.open(spec, open=True, read=True).result()
        except Exception as e:
            raise CheckpointError(f"{path}: cannot open the zarr array ({e})") from None

    def _local_spec(self, spec, key: str) -> tuple[dict, str]:
        """(``spec`` with its zarr array's path resolved, that path as the spec names it)
        after checking that the array (and every file in it) resolves inside the checkpoint
        (``paths.contained``): a spec naming an absolute path or ``..`` out of it is refused
        before tensorstore opens anything."""
        spec = dict(spec)
        kvstore = spec["kvstore"]
        where = f"{self.step_dir}/{CHECKPOINT_FILE}: tensor {key!r}"
        if spec["driver"] != "zarr":  # what T5X writes; another driver may name other files
            raise CheckpointError(
                f"{where}: tensorstore driver {spec['driver']!r} is not supported (expected 'zarr')"
            )
        if not isinstance(kvstore, Mapping):
            raise CheckpointError(
                f"{where}: tensorstore kvstore must be an object "
                '{"driver": "file", "path": ...}, got ' + repr(kvstore)
            )
        kvstore = dict(kvstore)
        if kvstore.get("driver", "file") != "file":
            raise CheckpointError(
                f"{self.step_dir}: tensor stored on {kvstore.get('driver')!r}; copy the "
                "checkpoint to a local directory first"
            )
        if not isinstance(kvstore.get("path"), str):
            raise CheckpointError(f"{where}: tensorstore kvstore 'path' must be a string")
        given = kvstore["path"]
        if "path" in spec:  # the driver-level path, appended to the kvstore's
            if not isinstance(spec["path"], str):
                raise CheckpointError(f"{where}: tensorstore 'path' must be a string")
            given = os.path.join(given, spec.pop("path"))
        path = os.path.join(self.step_dir, given)  # an absolute `given` stays as it is
        entry = f"{where} (zarr path {given!r})"
        real = self._checked.get(path)
        if real is None:
            real = contained(path, self._root, entry)
            check_entries(path, self._root, recursive=True)
            self._checked[path] = real
        kvstore["path"] = real
        spec["kvstore"] = kvstore
        return spec, path

    def shape(self, key: str) -> tuple[int, ...]:
        node = self._node(key, self._params)
        return tuple(self._open(node, key).shape) if _is_ts_spec(node) else np.shape(node)

    def dtype(self, key: str) -> np.dtype:
        node = self._node(key, self._params)
        if _is_ts_spec(node):
            return np.dtype(self._open(node, key).dtype.numpy_dtype)
        return np.asarray(node).dtype

    def read(self, key: str, tree=None) -> np.ndarray:
        node = self._node(key, self._params if tree is None else tree)
        if not _is_ts_spec(node):
            return np.asarray(node)
        try:
            return np.asarray(self._open(node, key).read().result())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.step_dir}: cannot read {key!r} ({e})") from None

    # ---------------------------------------------------------------- optimizer state
    def optimizer_state_keys(self) -> list[str]:
        """Keys of ``optimizer/state/param_states`` (e.g. Adafactor's ``…/kernel/v_row``)."""
        return sorted(self._opt_state)

    def read_optimizer_state(self, key: str) -> np.ndarray:
        return self.read(key, self._opt_state)


def write_t5x(
    step_dir: str,
    params: Mapping[str, np.ndarray],
    *,
    step: int = 0,
    param_states: Mapping[str, np.ndarray] | None = None,
    inline_below: int = 256,
) -> None:
    """Write ``params`` (flat ``/`` keys) as T5X does: arrays with at least ``inline_below``
    elements go to tensorstore zarr files (gzip, one chunk) named ``target.<dotted path>``;
    smaller ones stay inline in the msgpack. ``param_states`` (flat) go under
    ``optimizer/state/param_states`` the same way, named ``state.param_states.<path>``."""
    os.makedirs(step_dir, exist_ok=True)

    def store(prefix, flat):
        out = {}
        for path, value in flat.items():
            arr = np.asarray(value)
            if arr.size < inline_below:
                out[path] = arr
                continue
            name = prefix + "." + path.replace("/", ".")
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": name},
                "metadata": {
                    "shape": list(arr.shape),
                    "chunks": list(arr.shape),
                    "dtype": "bfloat16" if arr.dtype.name == "bfloat16" else arr.dtype.str,
                    "compressor": {"id": "gzip", "level": 1},
                },
            }
            absolute = dict(spec, kvstore={"driver": "file", "path": os.path.join(step_dir, name)})
            ts.open(absolute, create=True, delete_existing=True).result().write(arr).result()
            out[path] = spec
        return unflatten(out)

    state = {
        "optimizer": {
            "target": store("target", params),
            "state": {
                "step": np.asarray(step, np.int32),
                "param_states": store("state.param_states", param_states or {}),
            },
        }
    }
    with open(os.path.join(step_dir, CHECKPOINT_FILE), "wb") as f:
        f.write(serialization.msgpack_serialize(state))
