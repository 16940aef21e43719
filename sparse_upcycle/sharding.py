"""Device mesh, the ONE logical-axis-rules table, and the shardings built from it.

Mesh. Up to four named axes, ``("data", "fsdp", "expert", "model")`` (``make_mesh``), all
``AxisType.Auto``: the partitioner propagates shardings from the inputs and from the few
``constrain`` calls. (Explicit axes would make every op's output sharding part of its type,
and they refuse ops such as the dropless router's ``argsort`` over a sharded axis.) The
``fsdp`` axis exists only when its size is above 1, so a mesh without FSDP is the
``("data", "expert", "model")`` mesh it always was (same programs, same compilation cache).

Rules. Parameters carry logical axis names (``layers.logical_param``: ``("expert", "embed",
"mlp")`` …); activations are named at the few places that pin a layout (``moe.py``).
``LOGICAL_AXIS_RULES`` maps every logical name to the mesh axes its dimension is split over;
a name missing from the table is an error (``logical_to_spec``), never silently replicated.

===================  ======================  ==============================================
logical name         mesh axes               what it names
===================  ======================  ==============================================
``batch``            ``("data", "expert")``  batch rows; MoE routing groups G, token-major
``batch_no_expert``  ``"data"``              G in the expert-major ``[G, E, C, d]`` buffers
``length``           replicated              sequence positions
``embed``            ``"fsdp"``              model width d (parameters: FSDP, below)
``mlp``              ``"model"``             MLP / expert hidden width f
``heads``            ``"model"``             attention heads
``joined_kv``        ``"model"``             heads·head_dim, flattened (T5X kernels)
``kv``               replicated              head_dim
``vocab``            ``"model"``             vocabulary
``expert``           ``"expert"``            experts E
``relpos_buckets``   replicated              T5 relative-position buckets
``unmodeled``        replicated              anything not worth splitting (ViT patch dims,
                                             router output, classifier classes)
===================  ======================  ==============================================

The ``fsdp`` axis is data-parallel too: wherever the table names ``data``, a mesh with an
``fsdp`` axis splits that dimension over ``("data", "fsdp")`` (``DATA_PARALLEL``). So
``batch`` is split over ``data × fsdp × expert`` and ``batch_no_expert`` over ``data × fsdp``.

FSDP (ZeRO-3; Rajbhandari et al. 2020, "ZeRO", stage 3). Parameters, and with them the
optimizer state (``opt_sharding.opt_state_shardings`` follows the parameters), are split on
their ``embed`` dimension d over ``fsdp``: every weight matrix has one (``[d, f]``, ``[f, d]``,
``[E, d, f]``, ``[vocab, d]``, ``[d, heads·kv]``), it is neither the expert nor the model
dimension, and its size (the model width) is a multiple of any sensible ``fsdp``. Each device
then holds 1/fsdp of every such leaf. Vectors (norm scales ``[d]``, biases) stay whole: they
are tiny, and split on d they would pull the activations they multiply off their batch layout.
Nothing in the step asks for the gathers: the partitioner sees a weight split on d meet a batch
split over ``fsdp`` and all-gathers the weight where it is used (per layer, in the forward and
again in the backward pass) and reduces its gradient into the split layout of the optimizer
update (``sparse-upcycle plan`` counts the collectives; XLA:CPU reduces with all-reduces, not
reduce-scatters). Two things keep the partitioner from the other way round (moving the
activations onto the split d by replicating the tokens, "Involuntary full rematerialization" in
the compile log, which made ``t5_xl_upcycle``'s temporaries 113 GiB per device instead of 21;
README, Train): every weight is read through ``gathered`` (whole over ``fsdp`` where it is
used), and ``constrain`` never puts ``fsdp`` on an activation's ``embed`` dim, even where the
batch dim could not take it (fewer routing groups than devices). A leaf whose d is not
divisible by ``fsdp``, or that has no ``embed`` dimension (T5's relative-position bias), is
replicated over ``fsdp``. ``mesh.shard_params_over_data=True`` uses all the data-parallel
devices for this (``mesh_from_config``: the ``data`` size moves into ``fsdp``).

Expert-parallel layout (vmoe, Riquelme et al. 2021; MaxText). No devices are reserved for
experts: the ``expert`` mesh axis is a second data-parallel axis, so the batch is split over
``data × expert`` devices, and the expert weights ``[E, d, f]`` are split on E over ``expert``
(and on f over ``model``), replicated over ``data``. In an MoE layer (``moe.py``):

1. tokens ``[G, S, d]`` keep the routing groups G on ``("data", "expert")``, the devices that
   hold their tokens, so every group is routed where it lives (routing never looks across
   groups);
2. the dispatched buffers ``[G, E, C, d]`` are constrained to ``("batch_no_expert",
   "expert", None, "embed")`` = ``P("data", "expert", None, None)``: within each ``data``
   slice the ``expert`` mesh axis moves from G to E, one all-to-all, after which each device
   holds all of its slice's tokens for its own E/n_expert experts and runs them locally;
3. the expert outputs go back to G-major (a second all-to-all) for the combine.

The dropless path (tokens sorted by expert, grouped matmul) has no expert-major buffer: only
step 1 applies, and the partitioner gathers the sorted assignments and expert weights it needs
(no expert parallelism there yet).

Two rules keep every spec valid rather than failing (``logical_to_spec``):

* a mesh axis already used by an earlier dimension of the same spec is dropped from the later
  one (a dimension left with no mesh axis is replicated), since a ``PartitionSpec`` may use each
  mesh axis once: ``("batch", "expert")`` -> ``P(("data", "expert"), None)``;
* a dimension whose size is not divisible by the product of its mesh axis sizes is replicated
  (jit refuses uneven shardings): a vocabulary of 32100 on ``model=8`` is replicated. This is
  silent by design (tiny test models, odd vocabularies); check the specs if memory matters.

Mesh axes that the mesh lacks (or that are manual, inside ``shard_map``) are dropped too, so
the same table serves a data-only mesh.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_upcycle.checkpoints.tree import key_name, path_str

MESH_AXES = ("data", "fsdp", "expert", "model")  # "fsdp" only when its size is above 1
# The mesh axes a dimension the table maps to "data" is split over (the fsdp axis is
# data-parallel for activations, and shards the parameters on "embed").
DATA_PARALLEL = ("data", "fsdp")

# The one table: logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).
# Read-only, so that no caller can change the layout behind the others' backs.
LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = types.MappingProxyType(
    {
        # Activations.
        "batch": ("data", "expert"),  # expert parallelism reuses the data-parallel devices
        "batch_no_expert": "data",  # expert-major buffers: the expert axis is taken by E
        "length": None,
        # Parameters (and activations along the same dimensions).
        "embed": "fsdp",  # FSDP / ZeRO-3: parameters split on d over fsdp (see above)
        "mlp": "model",
        "heads": "model",
        "joined_kv": "model",
        "kv": None,
        "vocab": "model",
        "expert": "expert",
        "relpos_buckets": None,
        "unmodeled": None,
    }
)

LogicalAxes = tuple[str | None, ...]


# --------------------------------------------------------------------------------------------
# Mesh.
# --------------------------------------------------------------------------------------------


def make_mesh(
    data: int = -1,
    expert: int = 1,
    model: int = 1,
    devices: Sequence[Any] | None = None,
    *,
    fsdp: int = 1,
) -> Mesh:
    """A ``("data", "fsdp", "expert", "model")`` mesh over ``devices`` (default: all devices),
    without the ``fsdp`` axis when its size is 1.

    Args:
      data, fsdp, expert, model: axis sizes; at most one may be -1, meaning "the devices left
        over".
      devices: the devices to use (default ``jax.devices()``).

    Raises:
      ValueError: if a size is not a positive integer or -1, if more than one size is -1, or
        if the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _resolve_sizes(
        {"data": data, "fsdp": fsdp, "expert": expert, "model": model}, len(devices)
    )
    names = tuple(a for a in MESH_AXES if a != "fsdp" or sizes[a] > 1)
    shape = tuple(sizes[a] for a in names)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _resolve_sizes(sizes: dict[str, Any], n: int) -> dict[str, int]:
    """Mesh axis sizes with the one -1 replaced by the devices left over (``make_mesh``)."""
    sizes = dict(sizes)
    for name, size in sizes.items():
        if (
            isinstance(size, bool)
            or not isinstance(size, int | np.integer)
            or (size < 1 and size != -1)
        ):
            raise ValueError(f"mesh axis {name}={size!r}: expected a positive integer or -1")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free} (sizes {sizes})")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n % known:
            raise ValueError(
                f"mesh {sizes}: the fixed axes ({known} devices) do not divide the {n} devices"
            )
        sizes[free[0]] = n // known
    elif known != n:
        raise ValueError(f"mesh {sizes} needs {known} devices, but there are {n}")
    return {name: int(size) for name, size in sizes.items()}


def mesh_sizes(mesh_config: Mapping[str, Any] | None, n: int) -> dict[str, int]:
    """The axis sizes a config's ``mesh`` section gives on ``n`` devices, -1 resolved and
    ``shard_params_over_data`` applied (the ``data`` size moved into ``fsdp``).

    Raises:
      ValueError: as ``make_mesh``; ``shard_params_over_data`` not a bool.
    """
    m = mesh_config if mesh_config is not None else {}
    sizes = _resolve_sizes(
        {
            "data": m.get("data", -1),
            "fsdp": m.get("fsdp", 1),
            "expert": m.get("expert", 1),
            "model": m.get("model", 1),
        },
        n,
    )
    over_data = m.get("shard_params_over_data", False)
    if not isinstance(over_data, bool):
        raise ValueError(f"shard_params_over_data={over_data!r}: expected True or False")
    if over_data:
        sizes["fsdp"], sizes["data"] = sizes["data"] * sizes["fsdp"], 1
    return sizes


def mesh_from_config(
    mesh_config: Mapping[str, Any] | None, devices: Sequence[Any] | None = None
) -> Mesh:
    """The mesh of a config's ``mesh`` section (``defaults.default_config``: ``data``, ``fsdp``,
    ``expert``, ``model``, ``shard_params_over_data``) over ``devices`` (default: all).

    Raises:
      ValueError: as ``mesh_sizes``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(mesh_config, len(devices))
    return make_mesh(
        sizes["data"], sizes["expert"], sizes["model"], devices=devices, fsdp=sizes["fsdp"]
    )


def data_parallel_size(mesh) -> int:
    """The devices the batch is split over: ``data × fsdp × expert`` (those the mesh has)."""
    return math.prod(mesh.shape.get(a, 1) for a in (*DATA_PARALLEL, "expert"))


# --------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec.
# --------------------------------------------------------------------------------------------


def _current_mesh():
    """The mesh set with ``jax.set_mesh`` (an ``AbstractMesh``), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _usable_axes(mesh) -> set[str] | None:
    """Mesh axes a spec may name: all of them, except manual ones (inside shard_map)."""
    if mesh is None:
        return None
    return {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind in (AxisType.Auto, AxisType.Explicit)
    }


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None) -> P:
    """The ``PartitionSpec`` for an array with logical ``axes`` (one name or None per dim).

    Args:
      axes: logical axis names from ``LOGICAL_AXIS_RULES``, or None for a replicated dim.
      shape: the array's shape; with a mesh it lets non-divisible dims fall back to
        replication (see the module docstring).
      mesh: a ``Mesh`` or ``AbstractMesh``; default the one set with ``jax.set_mesh``, if any.
        Without any mesh, mesh axes are neither filtered nor size-checked.

    Raises:
      ValueError: for a logical name missing from the table, or if ``shape`` has a different
        rank than ``axes``.
    """
    axes = tuple(axes)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    mesh = _current_mesh() if mesh is None else mesh
    usable = _usable_axes(mesh)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise ValueError(
                f"logical axis {name!r} (in {axes}) is not in sharding.LOGICAL_AXIS_RULES; "
                f"known: {sorted(LOGICAL_AXIS_RULES)}"
            )
        rule = LOGICAL_AXIS_RULES[name]
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        # "data" stands for every data-parallel axis: ("data", "fsdp").
        mesh_axes = tuple(x for a in mesh_axes for x in (DATA_PARALLEL if a == "data" else (a,)))
        # A mesh axis may appear once per spec: the earlier dimension keeps it.
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if usable is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in usable)
        if mesh_axes and shape is not None and mesh is not None:
            if shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = ()  # jit refuses uneven shards: replicate this dim instead
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to its logical ``axes`` when a mesh is set (with
    ``jax.set_mesh``); the identity otherwise, so single-device code is unchanged."""
    mesh = _current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(axes, x.shape, mesh)
    # An activation keeps d whole: ``embed`` -> ``fsdp`` is for parameters. Where the batch
    # dim could not take ``fsdp`` (too few routing groups to split), the table would give it
    # to d, and the partitioner would replicate the tokens to get there.
    kept = (_without(e, "fsdp") if a == "embed" else e for a, e in zip(axes, spec, strict=True))
    spec = P(*kept)
    return jax.lax.with_sharding_constraint(x, spec)


def gathered(var: nnx.Variable) -> jax.Array:
    """A parameter's value as the step uses it: whole over ``fsdp`` (ZeRO-3's per-layer
    all-gather, Rajbhandari et al. 2020, §5.3), still split over ``expert`` and ``model``.

    Without this the partitioner may instead move the activations onto the weight's split d and
    gather the *tokens* (the compile log's "Involuntary full rematerialization"), which at paper
    scale costs more temporaries than FSDP saves. With it, a weight's gradient is computed from
    the local tokens and reduced back onto its shards. The identity without a mesh or without
    an ``fsdp`` axis (and inside ``shard_map``, where the axis is manual)."""
    value = var[...]
    usable = _usable_axes(_current_mesh())
    if usable is None or "fsdp" not in usable:
        return value
    axes = var.get_metadata().get("out_sharding")
    if axes is None or len(axes) != value.ndim:
        return value
    stored = logical_to_spec(axes, value.shape)
    used = _spec_without(stored, "fsdp")
    return value if used == stored else jax.lax.with_sharding_constraint(value, used)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dim over ``("data", "fsdp", "expert")`` (those the mesh has), the other
    ``ndim - 1`` dims replicated."""
    if ndim < 1:
        raise ValueError(f"a batch needs at least one dimension, got ndim={ndim}")
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


# --------------------------------------------------------------------------------------------
# Parameters.
# --------------------------------------------------------------------------------------------


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _variable_axes(path: str, var: nnx.Variable) -> LogicalAxes | None:
    """A Variable's logical axes; an error for a Param without them (it would be replicated
    without anyone noticing), None (replicated) for other variables."""
    axes = var.get_metadata().get("out_sharding")
    if axes is None and isinstance(var, nnx.Param):
        raise ValueError(f"parameter {path} has no logical axes (use layers.logical_param)")
    return None if axes is None else tuple(axes)


def _as_state(tree) -> Any:
    return nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree


def logical_axes(model_or_state: nnx.Module | nnx.State) -> dict:
    """The logical axes of every parameter, as a pure nested dict with the paths of
    ``nnx.to_pure_dict`` (T5X: ``encoder/layers_0/mlp/wi_0/kernel`` -> ``("embed", "mlp")``).

    Args:
      model_or_state: a module (abstract ones from ``nnx.eval_shape`` cost nothing) or an
        ``nnx.State`` of its ``nnx.Param``s.
    """
    state = _as_state(model_or_state)
    out: dict = {}
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]:
        if not _is_variable(var):
            raise ValueError(f"{path_str(path)} is not an nnx.Variable: pass a module or State")
        node = out
        keys = [key_name(k) for k in path]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = _variable_axes(path_str(path), var)
    return out


def _flatten_dict(tree, is_leaf=None) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_str(path): leaf for path, leaf in leaves}


def param_shardings(params_or_abstract, mesh: Mesh, axes: Mapping | None = None):
    """A ``NamedSharding`` for every parameter, in the structure of the input.

    Two input forms:

    * an ``nnx.State`` of ``nnx.Param`` (or a module) whose variables carry ``out_sharding``
      metadata, real or abstract (``nnx.eval_shape``). The result is a State of the same
      Variables holding NamedShardings: pass it straight to ``jax.jit(in_shardings=...)`` for
      that state, or ``nnx.to_pure_dict`` it.
    * a pure nested dict of arrays / ``ShapeDtypeStruct``s (checkpoints, upcycling) with
      ``axes``, the parallel dict of logical axes (``logical_axes(abstract_model)``). The
      result is a pure dict of NamedShardings.

    Raises:
      ValueError: a parameter without logical axes or with a name missing from the rules
        table (the message names the parameter), or ``axes`` not matching the parameters.
    """
    if axes is None:
        state = _as_state(params_or_abstract)
        flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
        shardings = []
        for path, var in flat:
            if not _is_variable(var):
                raise ValueError(
                    f"{path_str(path)} has no logical axes: pass an nnx.State of Params, or a "
                    "pure dict together with axes=logical_axes(model)"
                )
            name = path_str(path)
            shardings.append(_sharding(name, _variable_axes(name, var), var.shape, mesh))
        # Each Variable flattens to exactly one leaf (its value), so the State's own treedef
        # rebuilt with shardings as leaves keeps every Variable and its metadata.
        return jax.tree.unflatten(jax.tree.structure(state), shardings)

    flat_params = _flatten_dict(params_or_abstract)
    flat_axes = _flatten_dict(axes, is_leaf=lambda x: isinstance(x, tuple) or x is None)
    if flat_params.keys() != flat_axes.keys():
        missing = sorted(flat_params.keys() - flat_axes.keys())[:5]
        extra = sorted(flat_axes.keys() - flat_params.keys())[:5]
        raise ValueError(f"axes do not match params: no axes for {missing}; no param for {extra}")
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _sharding(path_str(path), flat_axes[path_str(path)], np.shape(x), mesh),
        params_or_abstract,
    )


def _sharding(path: str, axes: LogicalAxes | None, shape, mesh: Mesh) -> NamedSharding:
    if axes is None:
        return NamedSharding(mesh, P())
    try:
        spec = logical_to_spec(axes, shape, mesh)
    except ValueError as e:
        raise ValueError(f"parameter {path}: {e}") from None
    if len(shape) < 2:
        # A vector (norm scale, bias) stays whole on fsdp: split on d, it would pull the
        # activations it multiplies off their batch layout (module docstring, FSDP).
        spec = _spec_without(spec, "fsdp")
    return NamedSharding(mesh, spec)


def _spec_without(spec: P, axis: str) -> P:
    """``spec`` with ``axis`` taken out of every entry."""
    return P(*(_without(entry, axis) for entry in spec))


def _without(entry, axis: str):
    """A ``PartitionSpec`` entry without ``axis``."""
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept = tuple(a for a in names if a != axis)
    return kept[0] if len(kept) == 1 else (kept or None)


def shard_tree(tree, shardings):
    """Places a pytree on devices with a same-structure pytree of shardings.

    Host values (numpy, Python scalars) are cut with ``jax.make_array_from_callback``, which
    only ever touches this process's shards, so it also works on multi-host meshes when every
    host holds the full tree (a loaded checkpoint). Arrays already on devices are resharded
    with ``jax.device_put``.
    """

    def put(x, sharding):
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)
