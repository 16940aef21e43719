"""Analytic model FLOPs of a training step, and the device's measured matmul peak (for MFU).

Convention ("model FLOPs", as in Chowdhery et al. 2022, "PaLM", appendix B): only matrix
multiplications are counted, a multiply-add is 2 FLOPs, and a training step (forward +
backward) costs 3 × the forward, because the backward pass computes two matmuls (gradient with
respect to the input and to the weight) for every forward one (Kaplan et al. 2020, §2.1).
Norms, activations, softmax, the loss, gathers and scatters are not counted. For a dense
decoder this reproduces PaLM's ``6·N + 12·L·H·Q·T`` FLOPs per token (N = matmul parameters):
``tests/test_flops.py`` checks that identity against the parameter count.

Per token, with width d, H query heads and K key/value heads of size Dh (forward)::

    attention projections   2·d·H·Dh (query) + 2·H·Dh·d (out)          per query token
                            2·2·d·K·Dh (key, value)                     per key/value token
    attention scores/values 2·H·Dh·T (q·kᵀ) + 2·H·Dh·T (probs·v)       per query token
    dense MLP               2·n_in·d·f + 2·f·d                          per token
    expert MLP              2·n_in·d·f_e + 2·f_e·d                      per expert slot
    shared expert MLP       2·n_in·d·f_s + 2·f_s·d                      per token (MoE layers)
    router                  2·d·E (+ 2·d for a shared-expert gate)      per routed token
    logits / head           2·d·V (T5, decoder: every target token; ViT: one per image)
    patch embedding (ViT)   2·(p_h·p_w·c)·d                             per patch

n_in is 2 for gated MLPs (T5 v1.1 gated-GELU, SwiGLU) and 1 otherwise; f_e is the expert
width (``MoeConfig.expert_mlp_dim`` or f), f_s the shared experts' total width
(``MoeConfig.shared_mlp_dim``; 0 without shared experts). T is the number of keys a query
attends over. The whole [L, T] score matrix is counted even under a causal mask, because the
model computes it (PaLM appendix B counts it the same way). T5's cross-attention projects the
encoder's keys and values once per decoder layer.

MoE layers (``moe.py``) cut the B·L tokens of a layer into G groups of S tokens
(``routing.routing_groups``: by default S = min(group_size, B·L), G = ceil(B·L / S), the last group
padded) and count what the hardware computes:

* capacity routing (expert choice, or top-K with a capacity factor): every expert runs over all
  its slots, filled or not: ``G·E·C`` slots, C from ``routing.expert_choice_capacity`` /
  ``routing.top_k_capacity`` (the training capacity factor in a training step, the evaluation
  one in ``forward_flops(train=False)``);
* dropless top-K: ``B·L·K`` slots (one per token-expert assignment; the padding rows a
  block-sparse kernel adds are an implementation overhead, not model FLOPs);
* the router runs on all ``G·S`` token positions, padding included.

So a training step costs ``3 × forward`` with the forward the sum of the table above over all
layers and tokens of the batch. MFU is ``model_flops_per_step / step_seconds / (devices ·
peak)`` (``mfu``), with ``peak`` one device's, from its data sheet or ``measure_peak_flops``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from sparse_upcycle import models
from sparse_upcycle.flop_terms import BREAKDOWN_KEYS, moe_slots

__all__ = [
    "BREAKDOWN_KEYS",
    "TRAIN_MULTIPLIER",
    "batch_lengths",
    "forward_flops",
    "measure_peak_flops",
    "mfu",
    "model_flops_per_step",
    "moe_slots",
]

TRAIN_MULTIPLIER = 3  # forward + backward (2 matmuls per forward matmul); Kaplan et al. 2020


def batch_lengths(family: str, batch: Any) -> tuple[int, int, int]:
    """(batch_size, input_len, target_len) from a batch (a dict of arrays or shapes) or from
    the tuple itself; each family reads what it needs (``models/<family>.batch_lengths``)."""
    return models.get(family).batch_lengths(batch)


def forward_flops(family: str, cfg: Any, batch: Any, *, train: bool = False) -> dict[str, int]:
    """Model FLOPs of one forward pass over ``batch``, by component, plus ``"total"``.

    Args:
      family: a registered model family ("t5", "vit", "decoder", ...).
      cfg: the family's model config.
      batch: a dict of arrays or shapes (T5: ``encoder_input_tokens`` and
        ``decoder_input_tokens``/``decoder_target_tokens``; decoder: ``tokens``/``inputs``;
        ViT: ``image``/``images``), or ``(batch_size, input_len, target_len)`` (T5),
        ``(batch_size, seq_len)`` (decoder), ``batch_size`` (ViT).
      train: route MoE layers with the training capacity factor (True) or the evaluation one.

    Returns:
      ``{"attention_projections", "attention_scores_values", "dense_mlp", "expert_mlp",
      "shared_expert_mlp", "router", "embedding", "logits", "total"}`` as Python ints
      (formulas: module docstring).
    """
    module = models.get(family)
    out = module.forward_flops(cfg, *module.batch_lengths(batch), train)
    out["total"] = sum(out[k] for k in BREAKDOWN_KEYS)
    return out


def model_flops_per_step(family: str, cfg: Any, batch: Any) -> dict[str, int]:
    """Model FLOPs of one training step (forward + backward = 3 × forward, training capacity),
    by component plus ``"total"``; arguments as ``forward_flops``."""
    fwd = forward_flops(family, cfg, batch, train=True)
    return {k: TRAIN_MULTIPLIER * v for k, v in fwd.items()}


def mfu(
    model_flops: float, step_seconds: float, peak_flops_per_second: float, num_devices: int = 1
) -> float:
    """Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, §4.1 and appendix B).

    ``model_flops`` is the whole step's count (all devices), ``peak_flops_per_second`` one
    device's peak (``measure_peak_flops`` times one device), so the denominator is
    ``num_devices × peak``."""
    return model_flops / step_seconds / (peak_flops_per_second * num_devices)


def measure_peak_flops(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted ``size``×``size`` matmul on the default device: the median of
    ``repeats`` timed runs after one warm-up (compile) run, each waited for with
    ``block_until_ready``. A practical stand-in for the data-sheet peak on CPU."""
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be >= 1, got {size}, {repeats}")
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (size, size), dtype)
    b = jax.random.normal(kb, (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)
