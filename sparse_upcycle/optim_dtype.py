"""Storage dtypes of the train state: parameters (``model.param_dtype``) and optimizer state
(``optimizer.state_dtype``), both ``float32`` (default) or ``bfloat16``, with the arithmetic of
every update in float32.

``with_state_dtype(tx, state_dtype)`` wraps an optax transformation so that

* ``init`` builds the state from float32 copies of the parameters and stores its floating
  leaves in ``state_dtype`` (AdamW's ``mu``/``nu``; Adafactor's ``v_row``/``v_col``/``v`` and
  momentum); integer leaves (step counters) are left alone;
* ``update`` casts gradients, parameters and those state leaves up to float32, runs ``tx``
  (global-norm clipping, moments, Adafactor's factored statistics, clipping and parameter
  scale, weight decay) in float32, returns the updates in float32 and stores the new state
  rounded (to nearest, XLA's convert) back to ``state_dtype``.

optax's own dtype knobs (``optax.adamw(mu_dtype=...)``, ``optax.adafactor(dtype_momentum=...)``,
read in optax 0.2.8 ``_src/alias.py``) are left at their defaults: they only choose one
accumulator's dtype and keep the other state in the parameter dtype (``scale_by_adam``'s ``nu``
has no such option), while this wrapper sets every slot at once and keeps the arithmetic in
float32 whatever the parameter dtype is.

The train step (``training.make_train_step``) differentiates the loss w.r.t. the stored
parameters (bfloat16 gradients for bfloat16 parameters; the layers cast weights to the
activation dtype, so the forward and backward passes run in the activation dtype), and adds
the float32 update to the parameter in float32 before rounding the sum to the parameter dtype
(``optax.apply_updates``: ``(p + u).astype(p.dtype)``, and ``bfloat16 + float32`` is float32).

What rounding to bfloat16 costs (8 significant bits: a change smaller than half a unit in the
last place, about ``2^-9 = 0.2%`` of the value, rounds away):

* bfloat16 parameters drop every update smaller than ~0.2% of the weight it applies to; float32
  master weights (the default) keep them.
* A bfloat16 moving average ``m <- b m + (1 - b) x`` stops moving once
  ``(1 - b) |x - m| < 2^-9 |m|``. For AdamW's ``nu`` with ``b2 = 0.999`` that is
  ``|g^2 / nu - 1| < ~2``: ``nu`` no longer decays and grows only for a gradient ~1.7x its RMS.
  Adafactor's ``beta2_t = 1 - (t+1)^-0.8`` reaches the same regime after a few thousand steps.
  ``mu`` with ``b1 = 0.9`` keeps moving. Rounding is to nearest, not stochastic; a run that
  needs the second moment to track should keep ``state_dtype=float32``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

DTYPES = ("float32", "bfloat16")


def cast_floating(tree: Any, dtype) -> Any:
    """``tree`` with its floating-point leaves (arrays or ``jax.ShapeDtypeStruct``) in ``dtype``;
    other leaves (integer counters, keys) unchanged."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, tree)


def with_state_dtype(
    inner: optax.GradientTransformation, state_dtype: str = "float32"
) -> optax.GradientTransformation:
    """``inner`` computed in float32, its state stored in ``state_dtype`` (module docstring).
    The state keeps ``inner``'s structure (no wrapper node), so slot loading
    (``optim_slots``) and the state shardings see the same tree."""
    if state_dtype not in DTYPES:
        raise ValueError(
            f"optimizer.state_dtype must be one of {', '.join(DTYPES)}; got {state_dtype!r}"
        )
    store = jnp.dtype(state_dtype)

    def init(params):
        return cast_floating(inner.init(cast_floating(params, jnp.float32)), store)

    def update(updates, state, params=None):
        up = lambda tree: cast_floating(tree, jnp.float32)
        params32 = None if params is None else up(params)
        new_updates, new_state = inner.update(up(updates), up(state), params32)
        return new_updates, cast_floating(new_state, store)

    return optax.GradientTransformation(init, update)


__all__ = ["DTYPES", "cast_floating", "with_state_dtype"]
