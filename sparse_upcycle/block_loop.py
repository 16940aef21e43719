"""A function of row blocks, each with its own expert's parameters, run over a dynamic number of
blocks: forward and backward are ``fori_loop``s over the blocks in use only.

``jax.lax.scan`` runs a static number of iterations, so a buffer sized for the worst case is
computed whole even when a few blocks hold rows; a ``fori_loop`` with a traced bound runs only
the blocks in use but has no reverse-mode derivative. ``block_apply`` has its own
(``jax.custom_vjp``): the backward loop recomputes each used block's forward under ``jax.vjp``
(nothing is saved but the inputs), writes the block's input gradient and adds its parameter
gradient to its expert's slot. Blocks at or past ``num_blocks`` come back zero and get zero
gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _varying_axes(a) -> set[str]:
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier releases: ``vma``
    return set(getattr(manual, "varying", None) or getattr(aval, "vma", None) or ())


def _varying(tree, *like):
    """``tree`` marked as varying over the manual mesh axes that any of ``like`` varies over
    (inside ``shard_map`` a loop carry must have its body's types; outside, unchanged)."""
    axes = set()
    for leaf in jax.tree.leaves(like):
        axes |= _varying_axes(leaf)
    if not axes:
        return tree

    def cast(a):
        missing = tuple(sorted(axes - _varying_axes(a)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


def _take(tree, e):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False), tree)


def block_apply(
    fn: Callable, params, x_Bbd: jax.Array, expert_B: jax.Array, num_blocks: jax.Array
) -> jax.Array:
    """``y[i] = fn(x[i], params[expert[i]])`` for ``i < num_blocks``, zero for the others.

    ``params`` is a pytree of arrays with a leading expert axis; ``fn(x_bd, params_e)`` maps
    one [b, d] block to [b, d_out] (the same ``d_out`` for every block). Inside ``shard_map``
    everything is first marked varying over the axes any input varies over, so that autodiff
    of that cast (not the rule below) sums the parameter gradients over those axes."""
    like = (params, x_Bbd, expert_B, num_blocks)
    params, x_Bbd, expert_B, num_blocks = _varying(like, *like)
    return _block_apply(fn, params, x_Bbd, expert_B, num_blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_apply(fn, params, x_Bbd, expert_B, num_blocks):
    return _forward(fn, params, x_Bbd, expert_B, num_blocks)


def _forward(fn, params, x_Bbd, expert_B, num_blocks):
    out = jax.eval_shape(fn, x_Bbd[0], _take(params, 0))

    def body(i, y):
        y_i = fn(x_Bbd[i], _take(params, expert_B[i]))
        return jax.lax.dynamic_update_index_in_dim(y, y_i.astype(y.dtype), i, 0)

    y0 = _varying(
        jnp.zeros((x_Bbd.shape[0], *out.shape), out.dtype), params, x_Bbd, expert_B, num_blocks
    )
    return jax.lax.fori_loop(0, num_blocks, body, y0)


def _fwd(fn, params, x_Bbd, expert_B, num_blocks):
    return _forward(fn, params, x_Bbd, expert_B, num_blocks), (params, x_Bbd, expert_B, num_blocks)


def _bwd(fn, residuals, dy_Bbd):
    params, x_Bbd, expert_B, num_blocks = residuals

    def body(i, carry):
        dx, dparams = carry
        e = expert_B[i]
        _, vjp = jax.vjp(fn, x_Bbd[i], _take(params, e))
        dx_i, dparams_e = vjp(dy_Bbd[i].astype(dy_Bbd.dtype))
        dx = jax.lax.dynamic_update_index_in_dim(dx, dx_i.astype(dx.dtype), i, 0)

        def add(acc, g):
            row = jax.lax.dynamic_index_in_dim(acc, e, keepdims=False) + g.astype(acc.dtype)
            return jax.lax.dynamic_update_index_in_dim(acc, row, e, 0)

        return dx, jax.tree.map(add, dparams, dparams_e)

    zeros = (jnp.zeros_like(x_Bbd), jax.tree.map(jnp.zeros_like, params))
    zeros = _varying(zeros, params, x_Bbd, expert_B, num_blocks, dy_Bbd)
    dx, dparams = jax.lax.fori_loop(0, num_blocks, body, zeros)
    return dparams, dx, None, None


_block_apply.defvjp(_fwd, _bwd)
