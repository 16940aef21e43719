"""Row permutations whose gradients are gathers too.

The MoE layers sort tokens by expert, pad them into blocks and exchange them between devices:
injective row moves. Autodiff of a gather scatter-adds in the backward pass (a serial loop on
XLA:CPU, atomics on GPU); for an injective move the gradient is another gather, by the inverse
index, which is what ``take_rows`` computes.
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
