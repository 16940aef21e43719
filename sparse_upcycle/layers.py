"""Shared building blocks: parameters with logical axis names, activations, initialisers.

Every parameter carries its logical axis names (``embed``, ``mlp``, ``expert``, ``heads``,
``vocab`` …) as flax metadata; ``sharding.py`` maps them to mesh axes with one rules table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1 "gelu_new" (tanh form)
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def logical_param(
    init: Callable[..., jax.Array],
    key: jax.Array,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """A parameter annotated with logical axis names (not sharded eagerly: see sharding.py)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class Kernel(nnx.Module):
    """A weight at ``<name>/kernel`` (the path T5X and big_vision use for dense layers), with a
    zero-initialised ``<name>/bias`` when ``bias_axes`` are given."""

    def __init__(self, init, shape, axes, *, rngs: nnx.Rngs, dtype=jnp.float32, bias_axes=None):
        self.kernel = logical_param(init, rngs.params(), shape, axes, dtype)
        if bias_axes is not None:
            bias_shape = [shape[i] for i, a in enumerate(axes) if a in bias_axes]
            self.bias = logical_param(
                nnx.initializers.zeros, rngs.params(), bias_shape, bias_axes, dtype
            )


def fan_in_init(in_axis: int = -2, out_axis: int = -1, batch_axis: Sequence[int] = ()):
    """T5X's default kernel init: variance_scaling(1.0, fan_in, truncated_normal)."""
    return nnx.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=in_axis,
        out_axis=out_axis,
        batch_axis=tuple(batch_axis),
    )
