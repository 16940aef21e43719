"""Training losses shared by all models."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def cross_entropy_loss(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """T5X ``compute_weighted_cross_entropy`` (t5x/losses.py): returns (sum of weighted token
    losses, sum of weighted z-loss terms, sum of weights).

    Per token, with V classes, confidence ``c = 1 - label_smoothing`` and ``lo = (1-c)/(V-1)``:
    ``loss = -Σ_v soft_v · log_softmax_v + z_loss · logsumexp² - normalizer``, where
    ``soft = onehot(targets)·c + (1-onehot)·lo`` and the constant ``normalizer = -(c·log c +
    (V-1)·lo·log(lo + 1e-20))`` (the soft targets' entropy) makes a perfect prediction score 0.
    The z-loss term (Mesh TF / PaLM) pulls log Z toward 0. Everything in float32.
    """
    if logits.ndim != targets.ndim + 1:
        raise ValueError(
            f"logits {logits.shape} must have one more axis than targets {targets.shape}"
        )
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = (1.0 - confidence) / (v - 1)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    normalizer = -(confidence * math.log(confidence) + (v - 1) * low * math.log(low + 1e-20))
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    target_lp = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), -1)[..., 0]
    # Σ_v soft_v·log p_v = lo·Σ_v log p_v + (c - lo)·log p_target
    cross = -(low * jnp.sum(log_probs, axis=-1) + (confidence - low) * target_lp)
    z_term = z_loss * jnp.square(log_z)
    loss = cross + z_term - normalizer
    if weights is None:
        return jnp.sum(loss), jnp.sum(z_term), jnp.asarray(math.prod(targets.shape), jnp.float32)
    weights = weights.astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(z_term * weights), jnp.sum(weights)
