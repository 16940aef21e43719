"""DeepSeek-V3's balancing pieces for top-K routers (``routing.TopKRouter`` uses them): the
sequence-wise balance loss and the auxiliary-loss-free selection-bias update."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_load_balancing_loss(
    chose_GSE: jax.Array,
    probs_GSE: jax.Array,
    mask_GS: jax.Array,
    segment_ids_GS: jax.Array,
    num_segments: int,
    k: int,
) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss without its α (DeepSeek-AI 2024, §2.3, eqs.
    17-20), averaged over the sequences that have real tokens:

    ``L = Σ_e f_e·P_e`` per sequence of T real tokens, ``f_e = E/(K·T)·Σ_t 1[e ∈ top-K(t)]``,
    ``P_e = (1/T)·Σ_t p_{t,e}`` with ``p`` the normalised scores. A uniform router scores 1.

    Args:
      chose_GSE: 1 where expert e is among token s's top-K (before capacity), else 0.
      probs_GSE: each token's normalised scores (sum 1 over E).
      mask_GS: True for real tokens; padding counts nowhere.
      segment_ids_GS: each token's sequence index in ``[0, num_segments)``.
      num_segments: the number of sequences (static).
      k: K, the experts per token.
    """
    e = probs_GSE.shape[-1]
    real = mask_GS.reshape(-1).astype(jnp.float32)
    seg = segment_ids_GS.reshape(-1)
    chose = chose_GSE.reshape(-1, e) * real[:, None]
    probs = probs_GSE.reshape(-1, e) * real[:, None]
    t = jax.ops.segment_sum(real, seg, num_segments)  # real tokens per sequence
    f = jax.ops.segment_sum(chose, seg, num_segments) * e / (k * jnp.maximum(t, 1))[:, None]
    p = jax.ops.segment_sum(probs, seg, num_segments) / jnp.maximum(t, 1)[:, None]
    present = t > 0
    per_seq = jnp.sum(f * p, axis=-1)
    return jnp.sum(jnp.where(present, per_seq, 0.0)) / jnp.maximum(present.sum(), 1)


def selection_bias_update(bias_E: jax.Array, expert_load_E: jax.Array, rate: float) -> jax.Array:
    """One auxiliary-loss-free step (Wang et al. 2024, Algorithm 1; DeepSeek-V3 §2.1.2):
    ``b_e + rate·sign(mean load − load_e)``, with the load of the step's batch (any positive
    scale: ``expert_load`` fractions or token counts give the same signs). Overloaded experts
    are pushed down, underloaded ones up; a perfectly balanced expert keeps its bias."""
    load = expert_load_E.astype(jnp.float32)
    step = rate * jnp.sign(jnp.mean(load) - load)
    return (bias_E.astype(jnp.float32) + step).astype(bias_E.dtype)
