"""The decoder's blocks: the gated MLP and one pre-norm attention + MLP block (``decoder.py``
assembles them into ``Decoder`` and documents the parameter paths)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle.layers import Attention, Dense, RMSNorm, activation
from sparse_upcycle.moe import MoeMlp

if TYPE_CHECKING:
    from sparse_upcycle.models.decoder import DecoderConfig

SWIGLU = ("silu", "linear")


class GatedMlp(nnx.Module):
    """Dense gated MLP ``wo(act_0(wi_0 x) * act_1(wi_1 x))`` with T5X names; SwiGLU for
    activations ("silu", "linear") (wi_0 = HF gate_proj, wi_1 = up_proj, wo = down_proj)."""

    def __init__(self, emb_dim: int, mlp_dim: int, activations=SWIGLU, *, rngs: nnx.Rngs):
        self.activations = tuple(activations)
        self.wi_0 = Dense(emb_dim, mlp_dim, ("embed", "mlp"), rngs=rngs)
        self.wi_1 = Dense(emb_dim, mlp_dim, ("embed", "mlp"), rngs=rngs)
        self.wo = Dense(mlp_dim, emb_dim, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act_0, act_1 = (activation(a) for a in self.activations)
        return self.wo(act_0(self.wi_0(x)) * act_1(self.wi_1(x)))


class DecoderBlock(nnx.Module):
    """One pre-norm block: attention, then a dense or MoE MLP, each with a residual."""

    def __init__(self, config: DecoderConfig, sparse: bool, *, rngs: nnx.Rngs):
        c = config
        self.rope_theta = c.rope_theta
        self.sparse = sparse
        self.pre_attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, rngs=rngs)
        self.attention = Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.head_size,
            num_kv_heads=c.kv_heads,
            scale=c.head_size**-0.5,
            use_bias=c.attention_bias,
            out_bias=c.attention_out_bias,
            qk_norm_eps=c.rms_norm_eps if c.qk_norm else None,
            rngs=rngs,
        )
        self.pre_mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, rngs=rngs)
        self.mlp: MoeMlp | GatedMlp
        if sparse:
            self.mlp = c.moe.make_layer(
                c.hidden_size,
                c.intermediate_size,
                SWIGLU,
                causal=True,
                rngs=rngs,
                dtype=jnp.dtype(c.dtype),
            )
        else:
            self.mlp = GatedMlp(c.hidden_size, c.intermediate_size, SWIGLU, rngs=rngs)

    def __call__(self, x, *, positions, mask, token_mask, train, rng, cache, cache_index):
        h = self.pre_attention_norm(x)
        h, cache = self.attention(
            h,
            h,
            mask=mask,
            rope_theta=self.rope_theta,
            q_positions=positions,
            kv_positions=positions,
            cache=cache,
            cache_index=cache_index,
        )
        x = x + h
        h = self.pre_mlp_norm(x)
        metrics = None
        if isinstance(self.mlp, MoeMlp):  # a sparse block
            h, metrics = self.mlp(h, token_mask, rng=rng if train else None, train=train)
        else:
            h = self.mlp(h)
        return x + h.astype(x.dtype), cache, metrics
