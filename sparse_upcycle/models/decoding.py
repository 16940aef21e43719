"""Cached decoding for ``models/decoder.py``: the per-layer KV cache and the jitted generation
loop behind ``Decoder.generate`` (``Decoder.init_cache`` / ``Decoder.extend`` do the work)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx, struct

if TYPE_CHECKING:
    from sparse_upcycle.models.decoder import Decoder


@struct.dataclass
class DecodeCache:
    """Per-layer keys/values [B, T, K, Dh] (after RoPE), which cache slots hold real tokens
    (``key_mask`` [B, T]) and how many slots are filled (``index``, int32 scalar)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_mask: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sample"))
def generate_loop(
    graphdef, state, prompt, prompt_mask, rng, temperature, *, max_new_tokens, sample
):
    """Greedy or sampled generation (``Decoder.generate``): prefill the prompt, then one
    token per ``lax.scan`` step against the cache."""
    model: Decoder = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape

    def pick(logits_BV, key):
        if not sample:
            return jnp.argmax(logits_BV, axis=-1).astype(prompt.dtype)
        return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(prompt.dtype)

    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.extend(prompt, cache, positions=positions, token_mask=prompt_mask)
    keys = jax.random.split(rng, max_new_tokens)
    first = pick(logits[:, -1], keys[0])

    def step(carry, key):
        cache, token, position = carry
        logits, cache = model.extend(token[:, None], cache, positions=position[:, None])
        return (cache, pick(logits[:, 0], key), position + 1), token

    carry = (cache, first, prompt_mask.sum(axis=1).astype(jnp.int32))
    (_, last, _), tokens = jax.lax.scan(step, carry, keys[1:])
    new = jnp.concatenate([tokens.T, last[:, None]], axis=1)
    return jnp.concatenate([prompt, new], axis=1)
