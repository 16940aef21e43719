"""Orbax checkpoints: ours (a ``params`` item written by ``upcycle``/``train``) and generic
PyTree ones. The tree is flattened to ``a/b/c`` keys; a top-level ``params`` key (ours, and
many training states) is descended into.

``StreamingWriter`` writes a checkpoint about 64 MB at a time with Orbax's partial saving
(``orbax.checkpoint.experimental.v1.partial``): the tree lives under ``<path>/state`` and is
only visible once finalised, so the whole tree is never in memory at once."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.paths import check_entries, source_root
from sparse_upcycle.checkpoints.reader import CheckpointReader
from sparse_upcycle.checkpoints.tree import flatten, path_str, unflatten

SLOT_NAMES = ("v_row", "v_col", "v", "m")  # per-parameter slots as T5X names them


def _tree_dir(path: str) -> str:
    """The directory holding the PyTree: ``<path>/state`` for the v1 layout, else ``path``."""
    state = os.path.join(path, "state")
    return state if os.path.isfile(os.path.join(state, "_METADATA")) else path


def _reason(e: Exception) -> str:
    """Orbax's/TensorStore's message, first line only, without internals that explain nothing
    (an AttributeError on a metadata object that failed to parse)."""
    if isinstance(e, (AttributeError, TypeError, KeyError)):
        return "unparsable metadata"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _drop_closed_loop_noise() -> None:
    """After a failed restore, TensorStore may still complete reads into the event loop that
    Orbax's call already closed; Python reports each as an unraisable ``RuntimeError: Event
    loop is closed`` traceback at exit, after our one-line error. Those are harmless: drop
    them (every other unraisable exception still reaches the previous hook)."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_sparse_upcycle", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._sparse_upcycle = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def is_orbax(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))
        or os.path.exists(os.path.join(path, "_METADATA"))
    )


class OrbaxCheckpoint(CheckpointReader):
    """Reads one tensor at a time: the tree's shapes and dtypes come from Orbax's metadata, and
    ``read`` restores a single leaf (``partial_restore``), so a dense model larger than memory
    can be upcycled. Optimizer slots written by ``upcycle`` (``optimizer=tile``) live under a
    top-level ``opt_state`` item and are read with ``read_optimizer_state``. ``config`` is the
    model config when the caller knows it (the checkpoint does not say)."""

    def __init__(self, path: str, *, config: Any = None):
        if not is_orbax(path):
            raise CheckpointError(f"{path}: not an Orbax checkpoint directory (no _METADATA)")
        self.path = os.path.abspath(path)  # before the first restore: its messages name it
        # TensorStore follows whatever the directory holds: nothing may resolve outside it.
        check_entries(self.path, source_root(self.path), recursive=True)
        self._tree_dir = _tree_dir(self.path)
        self._checkpointer = ocp.PyTreeCheckpointer()
        try:
            with _quiet_absl():
                meta: Any = self._checkpointer.metadata(self._tree_dir)
            # Orbax versions differ: StepMetadata(item_metadata=TreeMetadata(tree=…)) or the tree
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
            tree = getattr(tree, "tree", tree)
            flat = _flatten_metadata(tree)
            self._opt_tree = tree.get("opt_state") if hasattr(tree, "get") else None
        except Exception as e:
            _drop_closed_loop_noise()
            raise CheckpointError(
                f"{path}: cannot read the Orbax metadata: a corrupt or truncated metadata file "
                f"under {self._tree_dir} ({_reason(e)}); re-create the checkpoint"
            ) from None
        self._prefix = "params/" if any(k.startswith("params/") for k in flat) else ""
        self._meta = {
            k[len(self._prefix) :]: (tuple(m.shape), np.dtype(m.dtype))
            for k, m in flat.items()
            if k.startswith(self._prefix) and not k.startswith("opt_state/")
        }
        self._slots = {
            k[len("opt_state/") :]: (tuple(m.shape), np.dtype(m.dtype))
            for k, m in flat.items()
            if k.startswith("opt_state/")
        }
        # A training checkpoint's optax state (``train`` writes it whole), not per-parameter
        # slots: kept apart, for ``init_opt_state=carry``.
        self._train_state: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        if any(k.rpartition("/")[2] not in SLOT_NAMES for k in self._slots):
            self._train_state, self._slots = self._slots, {}
        self._all_keys = [k for k, m in flat.items() if not k.startswith("opt_state/")]
        self._cache: dict[str, np.ndarray] = {}
        self._cached_group: str | None = None
        step = None
        if self._prefix and "step" in flat:
            step = int(np.asarray(self._restore("step")))
        super().__init__(self.path, "orbax", step=step, dense_step=step, config=config)

    def _restore(self, full_key: str) -> np.ndarray:
        # One partial restore per group (the first two path components: a layer, an
        # embedding), cached until another group is asked for: restores cost ~15 ms each
        # whatever their size, and a layer's tensors are read together.
        group = "/".join(full_key.split("/")[:2])
        if group != self._cached_group:
            self._cache, self._cached_group = {}, None
            members = [k for k in self._all_keys if k.startswith(group + "/") or k == group]
            self._cache = self._restore_many(members or [full_key])
            self._cached_group = group
        if full_key not in self._cache:
            return self._restore_many([full_key])[full_key]
        return self._cache[full_key]

    def _partial_restore(self, item, what: str):
        """Orbax's partial restore of ``item``'s leaves (any values; numpy arrays back)."""
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            with _quiet_absl():
                return self._checkpointer.restore(
                    self._tree_dir,
                    args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
                )
        except Exception as e:
            _drop_closed_loop_noise()
            raise CheckpointError(
                f"{self.path}: cannot restore {what}: corrupt or truncated data ({_reason(e)})"
            ) from None

    def _restore_many(self, full_keys: list[str]) -> dict[str, np.ndarray]:
        tree = self._partial_restore(unflatten({k: 0 for k in full_keys}), repr(full_keys[0]))
        flat = flatten(tree)
        return {k: np.asarray(flat[k]) for k in full_keys}

    def keys(self) -> list[str]:
        return sorted(self._meta)

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def read(self, key: str) -> np.ndarray:
        if key not in self._meta:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        return self._restore(self._prefix + key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> np.dtype:
        return self._meta[key][1]

    def optimizer_state_keys(self) -> list[str]:
        return sorted(self._slots)

    def read_optimizer_state(self, key: str) -> np.ndarray:
        return self._restore("opt_state/" + key)

    def training_state(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{path: (shape, dtype)}`` of the optax state a ``train`` checkpoint holds (paths as
        ``jax.tree_util`` names them: ``0/mu/layers_0/…/kernel``, ``0/count``); empty for any
        other checkpoint."""
        return dict(self._train_state)

    def read_training_state(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Those leaves of the optax state, in one restore (of the whole state: its lists and
        tuples are kept as the checkpoint's metadata has them)."""
        unknown = sorted(set(keys) - set(self._train_state))
        if unknown:
            raise CheckpointError(f"{self.path}: no optimizer state {unknown[0]!r}")

        leaves = jax.tree.map(lambda m: 0, self._opt_tree, is_leaf=lambda x: hasattr(x, "shape"))
        tree = self._partial_restore({"opt_state": leaves}, "its optimizer state")
        flat = _flatten_metadata(tree["opt_state"])
        return {k: np.asarray(flat[k]) for k in keys}


def _flatten_metadata(tree) -> dict:
    """``a/b/c`` -> array metadata, through dicts, lists and named tuples (optax states)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {path_str(path): leaf for path, leaf in leaves}


@contextlib.contextmanager
def _quiet_absl():
    """Orbax logs a warning through absl for every v1 ``state/`` directory (it has no
    ``_CHECKPOINT_METADATA`` of its own); that is expected here, not news for the user."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def write_orbax(
    path: str,
    params: dict[str, np.ndarray],
    *,
    step: int | None = None,
    opt_state: dict[str, np.ndarray] | None = None,
) -> None:
    """Write flat params as ``{"params": tree[, "step": n][, "opt_state": slots]}`` (the
    layout ``upcycle`` writes)."""
    state: dict[str, Any] = {"params": unflatten(params)}
    if step is not None:
        state["step"] = np.asarray(step, np.int64)
    if opt_state:
        state["opt_state"] = unflatten(opt_state)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), state)
    checkpointer.wait_until_finished()


class StreamingWriter:
    """Add tensors one at a time; every ``flush_bytes`` they are written with an Orbax partial
    save, and ``close`` finalises the checkpoint (nothing is visible at ``path`` before).
    ``item`` is the top-level key a tensor goes under (``params`` or ``opt_state``)."""

    def __init__(self, path: str, flush_bytes: int = 64 << 20):
        self.path = os.path.abspath(path)
        self.flush_bytes = flush_bytes
        self._buffer: dict[str, np.ndarray] = {}
        self._buffered = 0
        self._pending = None  # the save in flight (one at most: memory stays ~2 buffers)
        self.bytes_written = 0

    def add(self, key: str, array: np.ndarray, item: str = "params") -> None:
        full = f"{item}/{key}"
        # contiguous here: a broadcast (copied experts) or transposed view is copied once, in
        # this thread, rather than element by element by the background save
        self._buffer[full] = np.ascontiguousarray(array) if np.ndim(array) else np.asarray(array)
        self._buffered += self._buffer[full].nbytes
        if self._buffered >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        from orbax.checkpoint.experimental.v1 import partial

        self.wait()
        # Written in the background while the caller builds the next buffer.
        self._pending = partial.save_async(self.path, unflatten(self._buffer))
        self.bytes_written += self._buffered
        self._buffer, self._buffered = {}, 0

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def abort(self) -> None:
        """Let a save in flight finish (ignoring its error) so that the caller can remove the
        directory without a background thread writing into it afterwards."""
        try:
            self.wait()
        except Exception:
            pass

    def close(self, step: int | None = None) -> None:
        from orbax.checkpoint.experimental.v1 import partial

        self.flush()
        self.wait()
        if step is not None:
            partial.save(self.path, {"step": np.asarray(step, np.int64)})
        partial.finalize(self.path)
