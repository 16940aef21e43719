"""Shared building blocks: parameters with logical axis names, activations, initialisers.

Every parameter carries its logical axis names (``embed``, ``mlp``, ``expert``, ``heads``,
``vocab`` …) as flax metadata; ``sharding.py`` maps them to mesh axes with one rules table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle.sharding import gathered

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


# --------------------------------------------------------------------------------------------
# Norms, dense layers, embeddings.
# --------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """RMS layer norm (T5, Llama): ``x / sqrt(mean(x²) + eps) * scale``, statistics in fp32.

    ``axes`` is the logical name of ``scale``'s one dimension: ``("embed",)`` for a norm over
    the model width, ``("kv",)`` (replicated) for Qwen3's per-head norms over head_dim."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        axes: tuple[str] = ("embed",),
    ):
        self.eps = eps
        self.scale = logical_param(nnx.initializers.ones, rngs.params(), (dim,), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (ViT), statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = logical_param(
            nnx.initializers.ones, rngs.params(), (dim,), ("embed",), param_dtype
        )
        self.bias = logical_param(
            nnx.initializers.zeros, rngs.params(), (dim,), ("embed",), param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Dense(Kernel):
    """``x @ kernel (+ bias)`` over the last axis; kernel [in, out] with logical ``axes``."""

    def __init__(
        self,
        in_dim,
        out_dim,
        axes,
        *,
        init=None,
        use_bias=False,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        super().__init__(
            init or fan_in_init(),
            (in_dim, out_dim),
            axes,
            rngs=rngs,
            dtype=param_dtype,
            bias_axes=(axes[1],) if use_bias else None,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ gathered(self.kernel).astype(x.dtype)
        return y + self.bias[...].astype(x.dtype) if hasattr(self, "bias") else y


class Embed(nnx.Module):
    """Token embedding ``embedding`` [vocab, d]; ``attend`` gives logits against it (tied)."""

    def __init__(self, vocab_size, dim, *, init=None, rngs: nnx.Rngs, param_dtype=jnp.float32):
        init = init or nnx.initializers.normal(stddev=1.0)  # T5X: variance_scaling(1, fan_in)
        self.embedding = logical_param(
            init, rngs.params(), (vocab_size, dim), ("vocab", "embed"), param_dtype
        )

    def __call__(self, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
        return jnp.take(gathered(self.embedding), ids, axis=0).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return x @ gathered(self.embedding).astype(x.dtype).T


# --------------------------------------------------------------------------------------------
# Positions.
# --------------------------------------------------------------------------------------------


def t5_relative_position_bucket(
    relative_position, bidirectional=True, num_buckets=32, max_distance=128
):
    """T5's bucketing of ``key_pos - query_pos`` (Raffel et al. 2020, §2.1; the Mesh TensorFlow
    formula): half the buckets (all, if causal) for exact small distances, the rest
    logarithmically spaced up to ``max_distance``; in the bidirectional case the upper half of
    the buckets is for keys after the query."""
    bucket = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        bucket = (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    n_safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(n_safe / max_exact) / jnp.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
    """T5 relative position bias, shared by all layers of a stack: ``rel_embedding``
    [num_heads, num_buckets] (T5X layout)."""

    def __init__(
        self,
        num_heads,
        num_buckets=32,
        max_distance=128,
        *,
        bidirectional: bool,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        self.num_buckets, self.max_distance, self.bidirectional = (
            num_buckets,
            max_distance,
            bidirectional,
        )
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        self.rel_embedding = logical_param(
            init, rngs.params(), (num_heads, num_buckets), ("heads", "relpos_buckets"), param_dtype
        )

    def __call__(self, q_len: int, k_len: int, q_offset=0) -> jax.Array:
        """[1, H, q_len, k_len] bias for queries at positions q_offset + arange(q_len)."""
        q_pos = jnp.arange(q_len)[:, None] + q_offset
        k_pos = jnp.arange(k_len)[None, :]
        buckets = t5_relative_position_bucket(
            k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance
        )
        return jnp.take(self.rel_embedding[...], buckets, axis=1)[None].astype(jnp.float32)


def apply_rope(x_BLHD: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021) in the half-split layout of Llama/HF
    (dimension i pairs with i + D/2), computed in fp32."""
    d = x_BLHD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions_BL[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x = x_BLHD.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BLHD.dtype)


# --------------------------------------------------------------------------------------------
# Attention.
# --------------------------------------------------------------------------------------------


def dot_product_attention(q_BLHD, k_BSKD, v_BSKD, *, scale: float, bias=None, mask=None):
    """Softmax attention in fp32 with grouped-query support (H query heads share K kv heads,
    H % K == 0). ``bias`` broadcasts to [B, H, L, S]; ``mask`` (True = attend) likewise."""
    b, l, h, d = q_BLHD.shape
    kv = k_BSKD.shape[2]
    q = q_BLHD.reshape(b, l, kv, h // kv, d)
    logits = jnp.einsum("blkrd,bskd->bkrls", q, k_BSKD, preferred_element_type=jnp.float32) * scale
    logits = logits.reshape(b, h, l, k_BSKD.shape[1])
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKD.dtype)
    probs = probs.reshape(b, kv, h // kv, l, -1)
    out = jnp.einsum("bkrls,bskd->blkrd", probs, v_BSKD)
    return out.reshape(b, l, h, d)


class Attention(nnx.Module):
    """Multi-head (grouped-query when ``num_kv_heads < num_heads``) attention with T5X names:
    ``query``/``key``/``value`` kernels [d, heads·head_dim] and ``out`` [heads·head_dim, d]
    (T5X stores DenseGeneral kernels flattened to 2-D). ``scale`` multiplies q·k: 1.0 for T5
    (whose query init folds in 1/sqrt(head_dim)), head_dim**-0.5 for Llama.

    Biases: ``use_bias`` puts one on ``query``/``key``/``value`` and, unless ``out_bias`` says
    otherwise, on ``out`` (HF Llama/Qwen3 ``attention_bias``: all four; HF Qwen2: q/k/v only).
    ``qk_norm_eps`` adds ``query_norm``/``key_norm``, RMSNorms over head_dim applied to each
    head after the projection and before RoPE (Qwen3, transformers
    ``models/qwen3/modeling_qwen3.py``: ``Qwen3Attention.q_norm``/``k_norm``).

    Incremental decoding: pass ``cache=(k [B, T, K, D], v [B, T, K, D])`` and ``cache_index``
    (the position of the first new token); the new keys/values are written there and the
    updated cache is returned."""

    def __init__(
        self,
        emb_dim,
        num_heads,
        head_dim,
        *,
        num_kv_heads=None,
        scale=1.0,
        use_bias=False,
        out_bias=None,
        qk_norm_eps=None,
        query_init=None,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        kv_heads = num_kv_heads or num_heads
        if num_heads % kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of kv heads {kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = (
            num_heads,
            kv_heads,
            head_dim,
            scale,
        )
        kw: dict[str, Any] = dict(use_bias=use_bias, rngs=rngs, param_dtype=param_dtype)
        self.query = Dense(
            emb_dim, num_heads * head_dim, ("embed", "joined_kv"), init=query_init, **kw
        )
        self.key = Dense(emb_dim, kv_heads * head_dim, ("embed", "joined_kv"), **kw)
        self.value = Dense(emb_dim, kv_heads * head_dim, ("embed", "joined_kv"), **kw)
        kw["use_bias"] = use_bias if out_bias is None else out_bias
        self.out = Dense(num_heads * head_dim, emb_dim, ("joined_kv", "embed"), **kw)
        if qk_norm_eps is not None:
            norm: dict[str, Any] = dict(rngs=rngs, param_dtype=param_dtype, axes=("kv",))
            self.query_norm = RMSNorm(head_dim, qk_norm_eps, **norm)
            self.key_norm = RMSNorm(head_dim, qk_norm_eps, **norm)

    def __call__(
        self,
        x_q,
        x_kv,
        *,
        bias=None,
        mask=None,
        rope_theta=None,
        q_positions=None,
        kv_positions=None,
        cache=None,
        cache_index=None,
    ):
        b, l, _ = x_q.shape
        s = x_kv.shape[1]
        q = self.query(x_q).reshape(b, l, self.num_heads, self.head_dim)
        k = self.key(x_kv).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.value(x_kv).reshape(b, s, self.num_kv_heads, self.head_dim)
        if hasattr(self, "query_norm"):
            q, k = self.query_norm(q), self.key_norm(k)
        if rope_theta is not None:
            if q_positions is None or kv_positions is None:
                raise ValueError("rope_theta needs q_positions and kv_positions")
            q = apply_rope(q, q_positions, rope_theta)
            k = apply_rope(k, kv_positions, rope_theta)
        if cache is not None:
            if cache_index is None:
                raise ValueError("a KV cache needs cache_index")
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice_in_dim(
                k_cache, k.astype(k_cache.dtype), cache_index, 1
            )
            v = jax.lax.dynamic_update_slice_in_dim(
                v_cache, v.astype(v_cache.dtype), cache_index, 1
            )
            cache = (k, v)
        out = dot_product_attention(q, k, v, scale=self.scale, bias=bias, mask=mask)
        return self.out(out.reshape(b, l, self.num_heads * self.head_dim)), cache
