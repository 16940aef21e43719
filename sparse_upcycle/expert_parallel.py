"""Expert-parallel dropless top-K: each device routes its own tokens, sends every assignment to
the device that holds its expert with one all-to-all, runs its local experts as a grouped
matmul, and sends the outputs back with a second all-to-all (DeepSpeed-MoE / Megatron-Core's
"alltoall" token dispatcher; Rajbhandari et al. 2022, §4; no token is ever gathered whole).

Used by ``moe.MoeMlp`` for a ``DroplessDecision`` when a mesh is set whose ``expert`` axis is
above 1 and whose ``fsdp`` and ``model`` axes are 1, E is a multiple of the expert axis and the
routing groups split evenly over ``data × expert`` (``applicable``); elsewhere the layer keeps
its single-program path, where the partitioner moves the sorted assignments itself.

Layout inside ``jax.shard_map`` (all mesh axes manual): a device holds ``G / (data·expert)``
groups of tokens and ``E / n`` experts, n = the expert axis size. Its ``N = G_loc·S·K``
assignments are sorted by expert, which also sorts them by destination device (expert ``e``
lives on device ``e // (E/n)``). The exchange buffers are ``[n, N, d]``: the all-to-all is the
fixed-size ``jax.lax.all_to_all``, with room for all N assignments to go to one device, so no
assignment can be dropped whatever the routing; the price is n times the bytes of a ragged
exchange (``jax.lax.ragged_all_to_all``, left for the accelerator path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparse_upcycle import permute, routing

BATCH_AXES = ("data", "expert")  # the mesh axes routing groups are split over (sharding.py)


def _mesh_sizes() -> dict[str, int] | None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    return dict(mesh.shape)


def applicable(num_groups: int, num_experts: int) -> bool:
    """Whether the current mesh (``jax.set_mesh``) runs dropless routing expert-parallel."""
    sizes = _mesh_sizes()
    if sizes is None:
        return False
    n = sizes.get("expert", 1)
    if n <= 1 or any(sizes.get(a, 1) > 1 for a in ("fsdp", "model")):
        return False
    return num_experts % n == 0 and num_groups % (sizes.get("data", 1) * n) == 0


def dropless_moe(experts, x_GSd: jax.Array, decision: routing.DroplessDecision, impl: str):
    """``moe._dropless_moe`` with the assignments exchanged between the expert devices:
    [G, S, d] -> [G, S, d], the same values (see module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    n = mesh.shape["expert"]
    num_experts = decision.num_experts
    e_loc = num_experts // n
    graphdef, state = nnx.split(experts)
    leaves, treedef = jax.tree.flatten(state)
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    group_spec = P(batch)
    expert_spec = [P("expert", *([None] * (leaf.ndim - 1))) for leaf in leaves]

    def body(x, expert_index, weight, *local_leaves):
        local = nnx.merge(graphdef, jax.tree.unflatten(treedef, local_leaves))
        g, s, d = x.shape
        k = expert_index.shape[-1]
        num = g * s * k
        # Sort by expert (so by destination device); padding assignments have id E -> dropped.
        # Every row move below is permute.take_rows: a gather both ways.
        expert_N = expert_index.reshape(num)
        order = jnp.argsort(expert_N, stable=True).astype(jnp.int32)
        expert_sorted = expert_N[order]
        peer = expert_sorted // e_loc  # == n for padding
        counts = jnp.sum(jax.nn.one_hot(peer, n, dtype=jnp.int32), axis=0)
        start = jnp.cumsum(counts) - counts
        slot = jnp.arange(num) - start[jnp.minimum(peer, n - 1)]
        dest = jnp.where(peer < n, peer * num + slot, n * num).astype(jnp.int32)  # [n, N] flat
        source = permute.inverse_permutation(dest, n * num)
        inverse = permute.inverse_permutation(order, num)
        sorted_x = permute.take_rows(jnp.repeat(x.reshape(g * s, d), k, axis=0), order, inverse)
        send_x = permute.take_rows(sorted_x, source, dest).reshape(n, num, d)
        local_e = jnp.where(peer < n, expert_sorted % e_loc, e_loc).astype(jnp.int32)
        send_e = jnp.append(local_e, e_loc)[jnp.minimum(source, num)].reshape(n, num)
        # recv[p] = what device p sent to this one.
        recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True).reshape(n * num, d)
        recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True).reshape(n * num)
        # The local experts as one grouped matmul over the received rows.
        order_r = jnp.argsort(recv_e, stable=True).astype(jnp.int32)
        inverse_r = permute.inverse_permutation(order_r, n * num)
        sizes = jnp.sum(jax.nn.one_hot(recv_e, e_loc, dtype=jnp.int32), axis=0)
        y_sorted = local.grouped(permute.take_rows(recv_x, order_r, inverse_r), sizes, impl)
        routed = jnp.arange(n * num)[:, None] < sizes.sum()
        y_sorted = jnp.where(routed, y_sorted, 0)
        y_recv = permute.take_rows(y_sorted, inverse_r, order_r).reshape(n, num, d)
        # Back to the devices the rows came from, then to assignment order.
        y_back = jax.lax.all_to_all(y_recv, "expert", 0, 0, tiled=True).reshape(n * num, d)
        y_mine = permute.take_rows(y_back, dest, source).astype(jnp.float32)
        y_N = permute.take_rows(y_mine, inverse, order)
        y = jnp.sum(y_N.reshape(g * s, k, d) * weight.reshape(g * s, k, 1), axis=1)
        return y.reshape(g, s, d).astype(x.dtype)

    fn = jax.shard_map(
        body,
        in_specs=(group_spec, group_spec, group_spec, *expert_spec),
        out_specs=group_spec,
    )
    weight = decision.combine_weight.astype(jnp.float32)
    return fn(x_GSd, decision.expert_index, weight, *leaves)
