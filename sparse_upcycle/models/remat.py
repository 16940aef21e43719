"""Rematerialisation (gradient checkpointing) of Transformer blocks: ``model.remat``.

Each family wraps every block (T5 encoder/decoder layer, ViT ``encoderblock_i``, decoder
``layers_i``) in ``flax.nnx.remat`` (``jax.checkpoint``) with the policy named by its config's
``remat`` field. A policy decides which values computed inside a block are kept for the
backward pass; the rest is computed again from the block's inputs when the gradient needs it.
The function, the parameters and their paths are the same whatever the policy: only the
memory of a training step and its compute change.

=================  ================================================================  =========
``remat``          kept inside a block for the backward pass                         recompute
=================  ================================================================  =========
``none``           everything (no ``jax.checkpoint``)                                nothing
``dots_saveable``  every matmul output (``jax.checkpoint_policies.dots_saveable``),   least
                   attention logits and batched expert einsums included
``minimal``        matmuls without batch dimensions: the ``x·W`` projections         more
                   (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``;
                   MaxText's ``remat_policy="minimal"`` is this policy)
``full``           nothing but the block's inputs (``jax.checkpoint`` with no        the whole
                   policy)                                                           block
=================  ================================================================  =========

``minimal`` follows MaxText's naming (``remat_policy``: ``minimal`` is
``checkpoint_dots_with_no_batch_dims``, ``full`` is no policy): "minimal" rematerialisation,
not minimal memory. It keeps the weight projections but recomputes what has a batch dimension
in its contraction: attention scores ``q·k`` and ``probs·v`` (batched over heads), which grow
with the sequence length squared, and the expert matmuls of ``MoeMlp``'s slot dispatch
(``"gecd,edf"``: batched over experts). Elementwise work (norms, activations, softmax, dropout)
is recomputed by every policy but ``none``.

Randomness. Dropout and router jitter take explicit ``jax.random`` keys, never ``nnx.Rngs``
state, so a recomputed block draws the same masks and noise as the forward pass did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

REMAT = ("none", "full", "dots_saveable", "minimal")

_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # jax.checkpoint's default: nothing saveable
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check(value: Any) -> str:
    """``value`` if it names a policy; ValueError naming ``model.remat`` and the choices."""
    if not isinstance(value, str) or value not in REMAT:
        raise ValueError(f"model.remat must be one of {', '.join(REMAT)}; got {value!r}")
    return value


def policy(remat: str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy of ``remat`` (not ``"none"``; ``None`` for ``"full"``)."""
    if check(remat) == "none":
        raise ValueError("model.remat='none' has no checkpoint policy")
    return _POLICIES[remat]


def block(remat: str, fn: Callable) -> Callable:
    """``fn(module, *args)`` under ``nnx.remat`` with the policy of ``remat`` (``fn`` itself
    for ``"none"``). ``args`` are arrays or pytrees of them (``None`` for absent ones); Python
    values (``train``) stay closed over in ``fn``."""
    if check(remat) == "none":
        return fn
    return nnx.remat(fn, policy=_POLICIES[remat])
