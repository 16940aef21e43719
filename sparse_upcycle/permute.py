"""Row moves whose gradients are gathers too.

The MoE layers sort tokens by expert, pad them into blocks and exchange them between devices:
injective row moves (``take_rows``); and a top-K layer with capacity copies each token into at
most K slots (``dispatch_rows`` / ``combine_rows``). Autodiff of a gather scatter-adds in the
backward pass (a serial loop on XLA:CPU, atomics on GPU); for these moves the gradient is
another gather, by the inverse index, which is what these functions compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def take_rows(x_Nd: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[index]`` with zero rows where ``index`` is out of range, for an injective ``index``
    whose inverse is ``inverse`` (``inverse[index[i]] == i``; out of range where no ``i``).

    Both directions are gathers: the gradient is ``g[inverse]``, where autodiff of a gather
    would scatter-add (a serial loop on XLA:CPU, atomics on GPU)."""
    return x_Nd.at[index].get(mode="fill", fill_value=0)


def _take_rows_fwd(x_Nd, index, inverse):
    return take_rows(x_Nd, index, inverse), inverse


def _take_rows_bwd(inverse, g):
    return g.at[inverse].get(mode="fill", fill_value=0), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def inverse_permutation(index: jax.Array, size: int) -> jax.Array:
    """For an injective ``index`` into ``size`` rows (out-of-range entries ignored): ``inv`` of
    length ``size`` with ``inv[index[i]] = i`` and ``len(index)`` (out of range) elsewhere."""
    n = index.shape[0]
    inv = jnp.full((size,), n, jnp.int32)
    return inv.at[index].set(jnp.arange(n, dtype=jnp.int32), mode="drop")


@jax.custom_vjp
def dispatch_rows(x_Sd: jax.Array, token_R: jax.Array, slot_SK: jax.Array) -> jax.Array:
    """``x[token_R]``: the token of each of R slots. ``slot_SK`` lists the slots of each token
    (at most K; out of range for none), so the gradient is a gather and a sum over K:
    ``g_x[s] = Σ_k g[slot[s, k]]``. Exact when the cotangent is zero on the slots no token
    lists (the MoE weighs its empty slots by zero, and an expert's input gradient is zero where
    its output's is)."""
    return x_Sd[token_R]


def _dispatch_rows_fwd(x_Sd, token_R, slot_SK):
    return x_Sd[token_R], slot_SK


def _dispatch_rows_bwd(slot_SK, g_Rd):
    rows = g_Rd.at[slot_SK].get(mode="fill", fill_value=0)  # [S, K, d]
    return rows.astype(jnp.float32).sum(axis=1).astype(g_Rd.dtype), None, None


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def combine_rows(
    y_Rd: jax.Array,
    weight_SK: jax.Array,
    slot_SK: jax.Array,
    token_R: jax.Array,
    weight_R: jax.Array,
) -> jax.Array:
    """``out[s] = Σ_k weight[s, k] · y[slot[s, k]]`` in float32 ([S, d]; out-of-range slots
    add 0). ``token_R`` / ``weight_R``: the token each slot holds and its weight (0 in empty
    slots), the same routing slot-major, so that y's gradient is a gather too:
    ``g_y[r] = weight_R[r] · g[token_R[r]]``. Differentiable in ``y_Rd`` and ``weight_SK``."""
    rows = y_Rd.at[slot_SK].get(mode="fill", fill_value=0).astype(jnp.float32)
    return jnp.einsum("skd,sk->sd", rows, weight_SK.astype(jnp.float32))


def _combine_rows_fwd(y_Rd, weight_SK, slot_SK, token_R, weight_R):
    out = combine_rows(y_Rd, weight_SK, slot_SK, token_R, weight_R)
    return out, (y_Rd, weight_SK, slot_SK, token_R, weight_R)


def _combine_rows_bwd(res, g_Sd):
    y_Rd, weight_SK, slot_SK, token_R, weight_R = res
    g_y = (g_Sd[token_R] * weight_R[:, None].astype(jnp.float32)).astype(y_Rd.dtype)
    rows = y_Rd.at[slot_SK].get(mode="fill", fill_value=0).astype(jnp.float32)
    g_w = jnp.einsum("skd,sd->sk", rows, g_Sd).astype(weight_SK.dtype)
    return g_y, g_w, None, None, None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)
