"""Shardings of an optax state, derived from the parameters' (``sharding.param_shardings``):
a state leaf takes the sharding of the parameter it mirrors, adapted to its shape
(``opt_state_shardings``)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_upcycle.checkpoints.tree import key_name


def _normalized_path(path) -> tuple[str, ...]:
    """Key names of a tree path without the trailing ``.value`` of an nnx Variable."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return tuple(key_name(k) for k in keys)


def _derived_spec(leaf_shape, param_shape, spec: P) -> P | None:
    """The param's spec adapted to a leaf of a related shape, or None (replicate)."""
    leaf_shape, param_shape = tuple(leaf_shape), tuple(param_shape)
    entries = tuple(spec) + (None,) * (len(param_shape) - len(spec))
    if leaf_shape == param_shape:
        return spec
    # Factored statistics (Adafactor's v_row / v_col) drop one dimension of the parameter.
    # When two dims have the same size either choice is a valid sharding of the leaf.
    if len(leaf_shape) == len(param_shape) - 1:
        for drop in range(len(param_shape)):
            if param_shape[:drop] + param_shape[drop + 1 :] == leaf_shape:
                return P(*(entries[:drop] + entries[drop + 1 :]))
    if 0 < len(leaf_shape) < len(param_shape) and param_shape[: len(leaf_shape)] == leaf_shape:
        return P(*entries[: len(leaf_shape)])
    return None


def opt_state_shardings(opt_state_abstract, params_shardings, mesh: Mesh, params_abstract=None):
    """Shardings for an optax state (from ``jax.eval_shape(opt.init, params)``).

    Optax states hold subtrees shaped like the parameter tree (Adam ``mu``/``nu``, momentum,
    Adafactor ``v_row``/``v_col``/``v``), so a state leaf belongs to the parameter whose path
    is the longest suffix of the leaf's path. Then:

    * same shape as the parameter: the parameter's sharding;
    * the parameter's shape with one dimension removed (factored second moments), or a prefix
      of it: the parameter's spec with the same dimension removed / the same prefix;
    * anything else (step counts, ``(1,)`` placeholders, unmatched leaves): replicated.

    Args:
      opt_state_abstract: the optimizer state, abstract or real.
      params_shardings: ``param_shardings(...)`` of the parameters the state was built for.
      mesh: the mesh of those shardings.
      params_abstract: the parameters (abstract or real) in the structure of
        ``params_shardings``. Without it a parameter's shape is unknown, and a leaf gets the
        parameter's sharding when it has the parameter's rank (and each sharded dim divides),
        else replication: exact for Adam-like states, replicated for factored statistics.

    Returns:
      A pytree of ``NamedSharding`` in the structure of ``opt_state_abstract``.
    """
    is_sharding = lambda x: isinstance(x, NamedSharding)
    flat_sh = jax.tree_util.tree_flatten_with_path(params_shardings, is_leaf=is_sharding)[0]
    shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    if params_abstract is not None:
        for path, x in jax.tree_util.tree_flatten_with_path(params_abstract)[0]:
            shapes[_normalized_path(path)] = tuple(np.shape(x))
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...] | None, P]] = {}
    for path, sharding in flat_sh:
        key = _normalized_path(path)
        if params_abstract is not None and key not in shapes:
            raise ValueError(f"params_abstract has no parameter {'/'.join(key)}")
        by_path[key] = (shapes.get(key), sharding.spec)
    replicated = NamedSharding(mesh, P())

    def leaf_sharding(path, leaf) -> NamedSharding:
        keys = _normalized_path(path)
        for start in range(len(keys)):  # longest suffix first
            if keys[start:] in by_path:
                param_shape, spec = by_path[keys[start:]]
                break
        else:
            return replicated
        shape = tuple(np.shape(leaf))
        if param_shape is None:
            if len(shape) != len(spec) and len(spec) != 0:
                return replicated
            return NamedSharding(mesh, _checked(spec, shape, mesh))
        derived = _derived_spec(shape, param_shape, spec)
        return (
            replicated if derived is None else NamedSharding(mesh, _checked(derived, shape, mesh))
        )

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state_abstract)


def _checked(spec: P, shape, mesh: Mesh) -> P:
    """``spec`` with every dim that its mesh axes do not divide replicated."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for size, entry in zip(shape, entries, strict=True):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        out.append(entry if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return P(*out)
