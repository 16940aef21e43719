"""Initial weights of a training run (``init_from``): random, an ``upcycle`` output, or a
dense checkpoint taken as is or upcycled in memory (online upcycling), placed tensor by tensor
into sharded device arrays so the whole model never sits on one host device."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.hf import HFCheckpoint
from sparse_upcycle.checkpoints.layout import HF_SOURCE_DIR, save_hf_source
from sparse_upcycle.checkpoints.open import open_checkpoint
from sparse_upcycle.checkpoints.paths import check_entries, source_root
from sparse_upcycle.checkpoints.reader import CheckpointReader
from sparse_upcycle.checkpoints.tree import flatten, path_str, unflatten
from sparse_upcycle.config import ConfigError
from sparse_upcycle.task import ModelSpec, model_class
from sparse_upcycle.upcycle import router_init
from sparse_upcycle.upcycle.rules import (
    ROUTER_RE,
    Recipe,
    check_float,
    tile_optimizer_state,
    upcycle_tree,
)
from sparse_upcycle.upcycle.sources import check_readers


def _device_put_host(value: np.ndarray, sharding_: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds (each keeps its own shards)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def initial_params(
    config, spec: ModelSpec, source: CheckpointReader | None, abstract, shardings
) -> tuple[dict, dict]:
    """(params, slots): params as sharded arrays (pure dict) in the dtypes of ``abstract``
    (the train state's: ``model.param_dtype``), and the optimizer slots to load (flat
    ``{param path/slot: array}``, empty unless the recipe tiles them). A checkpoint's values
    are cast to those dtypes; the checkpoint itself is only read."""
    if source is None:
        cls = model_class(spec.family)

        def init():
            model = cls(spec.config, rngs=nnx.Rngs(config.seed))
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            return jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract)

        return jax.jit(init, out_shardings=shardings)(), {}

    target = {p: (tuple(s.shape), np.dtype(s.dtype)) for p, s in flatten(abstract).items()}
    flat_sh = flatten(shardings)
    slots: dict[str, np.ndarray] = {}
    # An `upcycle` output, or an MoE checkpoint continued without a recipe (an HF Qwen-MoE,
    # say): take it as it is.
    moe_source = spec.recipe is None and any(ROUTER_RE.match(p) for p in target)
    if source.is_upcycled or moe_source:
        missing = sorted(set(target) - set(source.keys()))
        extra = sorted(set(source.keys()) - set(target))
        if missing or extra:
            fix = "upcycle" if source.is_upcycled else "the checkpoint's own MoE settings"
            raise CheckpointError(
                f"{config.init_from}: does not match the model (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); train with the config used for {fix}"
            )
        params = place_as_is(source, target, flat_sh)
        if source.is_upcycled:
            slots = {k: source.read_optimizer_state(k) for k in source.optimizer_state_keys()}
        return params, slots

    recipe = spec.recipe or Recipe()
    if recipe.router_init in router_init.PROMPTED:
        raise ConfigError(
            f"upcycle.router_init={recipe.router_init}: prompted routers are built by "
            "`sparse-upcycle upcycle` (train from its output); online upcycling takes "
            "router_init=random or uniform_random"
        )
    reads = [o.read for o in open_sources(config, recipe, source)] if recipe.sources else []
    try:
        stream = upcycle_tree(source.keys(), source.read, target, recipe, reads)
        out = {path: _device_put_host(value, flat_sh[path]) for path, value in stream}
    except ValueError as e:
        raise CheckpointError(f"{config.init_from}: {e}") from None
    if spec.recipe is not None and spec.recipe.optimizer == "tile":
        keys = source.optimizer_state_keys()
        if not keys and source.training_state():
            return unflatten(out), {}  # a train checkpoint's optax state: tiled_opt_state
        if not keys:
            raise CheckpointError(
                f"{config.init_from}: upcycle.optimizer=tile needs the dense optimizer state "
                "and this checkpoint holds none; use optimizer=reset"
            )
        slots = dict(tile_optimizer_state(keys, source.read_optimizer_state, target, recipe))
    return unflatten(out), slots


OPT_STATE_INITS = ("reset", "carry")


def _opt_leaves(abstract_opt) -> list[tuple[str, jax.ShapeDtypeStruct]]:
    leaves = jax.tree_util.tree_leaves_with_path(abstract_opt)
    return [(path_str(p), leaf) for p, leaf in leaves]


def check_carry(config, spec: ModelSpec, source: CheckpointReader | None, abstract_opt) -> None:
    """``init_opt_state``: ``reset`` (a fresh optimizer state, the default) or ``carry``: a
    dense continuation takes ``init_from``'s whole optimizer state (a checkpoint ``train``
    wrote for this model with this optimizer), so it goes on as the dense run would have:
    AdamW's moments and step count, Adafactor's factored moments and decay counter. The
    learning-rate schedule continues through ``optimizer.step_offset``. Checked from the
    checkpoint's metadata, before anything is read or written."""
    how = config.get("init_opt_state", "reset")
    if how not in OPT_STATE_INITS:
        raise ConfigError(f"init_opt_state must be one of {OPT_STATE_INITS}, got {how!r}")
    if how == "reset":
        return
    if source is None:
        raise ConfigError("init_opt_state=carry needs an init_from checkpoint, not scratch")
    if spec.recipe is not None or source.is_upcycled:
        raise ConfigError(
            "init_opt_state=carry is for a dense continuation; an upcycled model's optimizer "
            "state is upcycle.optimizer (reset | tile)"
        )
    held = source.training_state()
    if not held:
        raise CheckpointError(
            f"{config.init_from}: holds no training optimizer state (init_opt_state=carry "
            "takes a checkpoint `train` wrote); use init_opt_state=reset"
        )
    want = dict(_opt_leaves(abstract_opt))
    missing, extra = sorted(set(want) - set(held)), sorted(set(held) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{config.init_from}: its optimizer state does not match this run's optimizer "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); carry needs the optimizer the "
            "checkpoint was trained with (optimizer.name and its fields)"
        )
    for key, leaf in want.items():
        if tuple(held[key][0]) != tuple(leaf.shape):
            raise CheckpointError(
                f"{config.init_from}: optimizer state {key!r} has shape {held[key][0]}, this "
                f"run's has {tuple(leaf.shape)}"
            )


def _schedule_counts(abstract_opt) -> set[str]:
    """Paths of the step counters optax's learning-rate schedules read
    (``ScaleByScheduleState.count``)."""
    found: set[str] = set()

    def visit(path, node):
        if isinstance(node, optax.ScaleByScheduleState):
            found.add(f"{path_str(path)}/count" if path else "count")
        return node

    jax.tree_util.tree_map_with_path(
        visit, abstract_opt, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
    )
    return found


def tiles_training_state(spec: ModelSpec, source: CheckpointReader | None) -> bool:
    """Whether this run's optimizer state is the dense run's, tiled into experts
    (``upcycle.optimizer=tile`` on a checkpoint ``train`` wrote: ``tiled_opt_state``)."""
    return (
        source is not None
        and spec.recipe is not None
        and spec.recipe.optimizer == "tile"
        and not source.optimizer_state_keys()
        and bool(source.training_state())
    )


def tiled_opt_state(config, source: CheckpointReader, abstract_opt, shardings):
    """``upcycle.optimizer=tile`` from a dense ``train`` checkpoint: the MoE's optimizer state
    with every leaf the dense run has (same path and shape) carried, every expert leaf
    (``…/expert/<name>/…`` of shape ``[E, *s]``) the dense leaf ``…/<name>/…`` of shape ``s``
    repeated over the experts (each expert starts as the dense MLP, so the dense moments fit
    each; Komatsuzaki et al. 2023, §3: the vision models keep the optimizer state), and the
    router's leaves (new parameters) at zero, as a fresh AdamW or Adafactor state has them.
    The moment counters are carried, the schedule's counter restarts (``carried_opt_state``).
    A leaf with no counterpart in the dense state is refused by name."""
    named = _opt_leaves(abstract_opt)
    plan = _tile_plan(config, source, named)
    values = source.read_training_state(sorted({p[0] for p in plan.values() if p}))
    schedule = _schedule_counts(abstract_opt)
    treedef = jax.tree_util.tree_structure(abstract_opt)
    flat_sh = jax.tree_util.tree_leaves(shardings)
    leaves = []
    for (key, leaf), sh in zip(named, flat_sh, strict=True):
        how = plan[key]
        if how is None or key in schedule:
            value = np.zeros(leaf.shape, leaf.dtype)
        else:
            value = np.asarray(values[how[0]])
            if how[1]:
                value = np.broadcast_to(value[None], leaf.shape)
        leaves.append(_device_put_host(np.asarray(value, leaf.dtype), sh))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def check_tile(config, spec: ModelSpec, source: CheckpointReader | None, abstract_opt) -> None:
    """Refuse, from the metadata and before anything is written, a ``tiled_opt_state`` that
    would find no dense counterpart for some leaf."""
    if tiles_training_state(spec, source):
        assert source is not None
        _tile_plan(config, source, _opt_leaves(abstract_opt))


def _tile_plan(config, source: CheckpointReader, named) -> dict[str, tuple[str, bool] | None]:
    """Per MoE optimizer-state leaf: (the dense leaf it comes from, repeated over experts?),
    or None for a router leaf (zeros)."""
    held = source.training_state()
    plan: dict[str, tuple[str, bool] | None] = {}
    for key, leaf in named:
        shape = tuple(leaf.shape)
        dense_key = key.replace("/expert/", "/", 1)
        if key in held and tuple(held[key][0]) == shape:
            plan[key] = (key, False)
        elif "/expert/" in key and dense_key in held and tuple(held[dense_key][0]) == shape[1:]:
            plan[key] = (dense_key, True)
        elif "/router/" in key:
            plan[key] = None
        else:
            raise CheckpointError(
                f"{config.init_from}: optimizer state {key!r} has no counterpart in the dense "
                "run's state; upcycle.optimizer=tile needs the optimizer the dense model was "
                "trained with (or use upcycle.optimizer=reset)"
            )
    return plan


def carried_opt_state(source: CheckpointReader, abstract_opt, shardings):
    """The optimizer state of ``source`` (``check_carry`` passed) as this run's sharded state,
    in the dtypes of ``abstract_opt``. The moments and their counters (AdamW's bias
    correction, Adafactor's decay) are carried; the schedule's counter restarts at this run's
    step 0, so that ``optimizer.step_offset`` alone says where the schedule goes on (carried,
    it would count the dense steps twice)."""
    named = _opt_leaves(abstract_opt)
    values = source.read_training_state([k for k, _ in named])
    for key in _schedule_counts(abstract_opt):
        values[key] = np.zeros_like(values[key])
    treedef = jax.tree_util.tree_structure(abstract_opt)
    flat_sh = jax.tree_util.tree_leaves(shardings)
    leaves = [
        _device_put_host(np.asarray(values[k]).astype(leaf.dtype), sh)
        for (k, leaf), sh in zip(named, flat_sh, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def place_as_is(source: CheckpointReader, target: dict, flat_sh: dict) -> dict:
    """The checkpoint's tensors as they are (``target``: ``{path: (shape, dtype)}``, every one
    in the checkpoint), each checked for its shape and a float-to-float cast, placed with
    ``flat_sh``; a nested dict."""
    out = {}
    for path in target:
        value = source.read(path)
        if tuple(value.shape) != target[path][0]:
            raise CheckpointError(
                f"{path}: the checkpoint gives shape {tuple(value.shape)}, the model "
                f"config expects {target[path][0]}"
            )
        try:
            check_float(path, value.dtype, target[path][1])
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        out[path] = _device_put_host(value.astype(target[path][1]), flat_sh[path])
    return unflatten(out)


def open_sources(config, recipe: Recipe, base: CheckpointReader) -> list[CheckpointReader]:
    """Online upcycling of several dense sources (``upcycle.sources``, Branch-Train-MiX):
    every source, opened, in the recipe's order; ``init_from`` must name the base one
    (``sources[base_source]``), already open as ``base``. Paths, shapes and model configs are
    compared before any tensor is read."""
    paths = list(recipe.sources)
    named = paths[recipe.base_source]
    if os.path.realpath(named) != os.path.realpath(config.init_from):
        raise ConfigError(
            f"with upcycle.sources, init_from must be the base source "
            f"upcycle.sources[{recipe.base_source}] = {named!r}, got {config.init_from!r}"
        )
    fmt = config.get("init_format", "auto")
    opened = [
        base if i == recipe.base_source else open_checkpoint(p, fmt) for i, p in enumerate(paths)
    ]
    for i, o in enumerate(opened):
        if o.is_upcycled:
            raise CheckpointError(
                f"upcycle.sources[{i}] = {paths[i]!r} is an upcycle output (an MoE), not a "
                "dense source"
            )
    try:
        check_readers(paths, opened)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return opened


def source_paths(config) -> list[tuple[str, str]]:
    """``(field, path)`` of every checkpoint a run reads: ``init_from`` and, with several
    dense sources, each of ``upcycle.sources`` (the workdir must overlap none of them)."""
    init_from = config.get("init_from", "scratch")
    out = [("init_from", init_from)] if init_from and init_from != "scratch" else []
    listed = config.upcycle.get("sources") if "upcycle" in config else None
    return out + [(f"upcycle.sources[{i}]", p) for i, p in enumerate(listed or ()) if p]


def open_init_source(config) -> CheckpointReader | None:
    """The checkpoint ``init_from`` names (None for scratch); an ``upcycle`` output opens as
    one (``is_upcycled``)."""
    init_from = config.get("init_from", "scratch")
    if init_from == "scratch":
        return None
    if not init_from:
        raise ConfigError(
            "config.init_from is not set: give a checkpoint (--config.init_from=PATH) or "
            "--config.init_from=scratch"
        )
    return open_checkpoint(init_from, config.get("init_format", "auto"))


def keep_hf_source(config, source: CheckpointReader | None, workdir: str) -> None:
    """Copy what an HF initial checkpoint came with (config, tokenizer, generation config:
    ``layout.save_hf_source``) to ``workdir/hf_source``, for ``export`` of the run's steps.
    The source is an HF directory, or an ``upcycle`` output that kept its HF source."""
    dst = os.path.join(workdir, HF_SOURCE_DIR)
    if source is None or os.path.exists(dst):
        return
    if isinstance(source, HFCheckpoint):
        save_hf_source(source, workdir)
        return
    kept = os.path.join(config.get("init_from", ""), HF_SOURCE_DIR)
    if source.is_upcycled and os.path.isfile(os.path.join(kept, "config.json")):
        # copied by value (links followed): every file must lie inside init_from
        check_entries(kept, source_root(config.init_from), recursive=True)
        shutil.copytree(kept, dst)
