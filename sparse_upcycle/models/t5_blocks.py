"""T5's blocks: MLP, encoder and decoder layers and stacks (``t5.py`` assembles them into
``T5`` and documents the parameter paths; the structure follows T5X's
``t5x/examples/t5/network.py``)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle.layers import (
    Attention,
    Dense,
    RelativePositionBias,
    RMSNorm,
    activation,
    dot_product_attention,
)
from sparse_upcycle.models import remat as remat_lib
from sparse_upcycle.models import scan
from sparse_upcycle.models.moe_config import MoeConfig

if TYPE_CHECKING:
    from sparse_upcycle.models.t5 import T5Config


class Keys:
    """Fresh PRNG keys for dropout sites and routers, or None everywhere when not training.

    Key ``n`` is ``fold_in(rng, n)``: a copy that starts at ``count`` continues the stream."""

    def __init__(self, rng: jax.Array | None, count: int = 0):
        self.rng, self.count = rng, count

    def __call__(self) -> jax.Array | None:
        if self.rng is None:
            return None
        self.count += 1
        return jax.random.fold_in(self.rng, self.count)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, broadcast_length=True):
    """Inverted dropout; T5X shares the mask along the length axis (``broadcast_dims=(-2,)``)."""
    if key is None or rate == 0.0:
        return x
    shape = (*x.shape[:-2], 1, x.shape[-1]) if broadcast_length else x.shape
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class MlpBlock(nnx.Module):
    """T5X ``MlpBlock``: ``prod_i act_i(x·wi_i)``, dropout, ``·wo`` (one activation: ``wi``)."""

    def __init__(self, emb_dim: int, mlp_dim: int, activations: Sequence[str], *, rngs: nnx.Rngs):
        self.activations = tuple(activations)
        n = len(self.activations)
        self.input_names = ("wi",) if n == 1 else tuple(f"wi_{i}" for i in range(n))
        for name in self.input_names:
            setattr(self, name, Dense(emb_dim, mlp_dim, ("embed", "mlp"), rngs=rngs))
        self.wo = Dense(mlp_dim, emb_dim, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_rate=0.0, key=None) -> jax.Array:
        pairs = zip(self.activations, self.input_names, strict=True)
        h = functools.reduce(operator.mul, [activation(a)(getattr(self, n)(x)) for a, n in pairs])
        return self.wo(dropout(h, dropout_rate, key))


def _attention(cfg: T5Config, rngs: nnx.Rngs) -> Attention:
    # T5X folds 1/sqrt(head_dim) into the query init (layers.py, MultiHeadDotProductAttention):
    # variance_scaling(1, fan_in, normal) / sqrt(head_dim) == variance_scaling(1/head_dim, ...).
    query_init = nnx.initializers.variance_scaling(1.0 / cfg.head_dim, "fan_in", "normal")
    return Attention(
        cfg.emb_dim, cfg.num_heads, cfg.head_dim, scale=1.0, query_init=query_init, rngs=rngs
    )


def _mlp(cfg: T5Config, moe: MoeConfig | None, *, causal: bool, rngs: nnx.Rngs):
    if moe is None:
        return MlpBlock(cfg.emb_dim, cfg.mlp_dim, cfg.mlp_activations, rngs=rngs)
    return moe.make_layer(
        cfg.emb_dim, cfg.mlp_dim, cfg.mlp_activations, causal=causal, rngs=rngs, dtype=cfg.dtype
    )


def _apply_mlp(layer, cfg: T5Config, x, token_mask, keys: Keys, train: bool):
    """Dense: (y, None); MoE: (y, RouterMetrics). Padding tokens never reach a router."""
    if isinstance(layer, MlpBlock):
        return layer(x, dropout_rate=cfg.dropout_rate, key=keys()), None
    return layer(x, token_mask, rng=keys(), train=train)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: T5Config, moe: MoeConfig | None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, eps = cfg.emb_dim, cfg.layer_norm_eps
        self.pre_attention_layer_norm = RMSNorm(d, eps, rngs=rngs)
        self.attention = _attention(cfg, rngs)
        self.pre_mlp_layer_norm = RMSNorm(d, eps, rngs=rngs)
        self.mlp = _mlp(cfg, moe, causal=False, rngs=rngs)

    def __call__(self, x, bias, attn_mask, token_mask, keys: Keys, train: bool):
        rate = self.cfg.dropout_rate
        h = self.pre_attention_layer_norm(x)
        h, _ = self.attention(h, h, bias=bias, mask=attn_mask)
        x = x + dropout(h, rate, keys())
        h, metrics = _apply_mlp(
            self.mlp, self.cfg, self.pre_mlp_layer_norm(x), token_mask, keys, train
        )
        return x + dropout(h, rate, keys()), metrics


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: T5Config, moe: MoeConfig | None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, eps = cfg.emb_dim, cfg.layer_norm_eps
        self.pre_self_attention_layer_norm = RMSNorm(d, eps, rngs=rngs)
        self.self_attention = _attention(cfg, rngs)
        self.pre_cross_attention_layer_norm = RMSNorm(d, eps, rngs=rngs)
        self.encoder_decoder_attention = _attention(cfg, rngs)
        self.pre_mlp_layer_norm = RMSNorm(d, eps, rngs=rngs)
        self.mlp = _mlp(cfg, moe, causal=True, rngs=rngs)

    def __call__(
        self,
        y,
        cross,
        self_bias,
        self_mask,
        cross_mask,
        token_mask,
        keys,
        train,
        cache=None,
        index=None,
    ):
        """``cross`` is the encoder output [B, S, d], or its projected (k, v) when decoding."""
        rate = self.cfg.dropout_rate
        h = self.pre_self_attention_layer_norm(y)
        h, cache = self.self_attention(
            h, h, bias=self_bias, mask=self_mask, cache=cache, cache_index=index
        )
        y = y + dropout(h, rate, keys())
        h = self.pre_cross_attention_layer_norm(y)
        if isinstance(cross, tuple):
            h = _attend_to_kv(self.encoder_decoder_attention, h, *cross, mask=cross_mask)
        else:
            h, _ = self.encoder_decoder_attention(h, cross, mask=cross_mask)
        y = y + dropout(h, rate, keys())
        h, metrics = _apply_mlp(
            self.mlp, self.cfg, self.pre_mlp_layer_norm(y), token_mask, keys, train
        )
        return y + dropout(h, rate, keys()), metrics, cache


def project_kv(attn: Attention, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, S, heads, head_dim] of ``x`` (the encoder output, projected once)."""
    b, s, _ = x.shape
    shape = (b, s, attn.num_kv_heads, attn.head_dim)
    return attn.key(x).reshape(shape), attn.value(x).reshape(shape)


def _attend_to_kv(attn: Attention, x, k, v, *, mask):
    """``attn(x, encoded)`` with the encoder's keys/values already projected."""
    b, l, _ = x.shape
    q = attn.query(x).reshape(b, l, attn.num_heads, attn.head_dim)
    out = dot_product_attention(q, k, v, scale=attn.scale, mask=mask)
    return attn.out(out.reshape(b, l, attn.num_heads * attn.head_dim))


def _relpos_bias(cfg: T5Config, *, bidirectional: bool, rngs: nnx.Rngs) -> RelativePositionBias:
    return RelativePositionBias(
        cfg.num_heads,
        cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance,
        bidirectional=bidirectional,
        rngs=rngs,
    )


def layers_of(module: nnx.Module, n: int) -> list:
    return [getattr(module, f"layers_{i}") for i in range(n)]


def call_layer(remat: str, layer, args: tuple, keys: Keys, train: bool):
    """``layer(*args, keys, train)``, rematerialised as ``remat`` says (``models/remat.py``).

    Under ``nnx.remat`` the layer draws its keys from a copy of ``keys`` holding the traced
    ``rng``; ``keys`` then moves on by as many keys as the layer drew (counted while tracing),
    so every policy sees the same key stream as ``"none"``."""
    if remat == "none":
        return layer(*args, keys, train)
    start, drawn = keys.count, []

    def body(layer, rng, *args):
        inner = Keys(rng, start)
        out = layer(*args, inner, train)
        drawn.append(inner.count)
        return out

    out = remat_lib.block(remat, body)(layer, keys.rng, *args)
    keys.count = drawn[-1]
    return out


def scan_layers(layers: list, args: tuple, x, keys: Keys, train: bool, remat: str):
    """``call_layer`` over ``layers`` as ``jax.lax.scan``s (``models/scan.py``): ``x`` is
    the first of each layer's ``(x, *args)``, and the scan carries ``keys``' count so every
    layer draws the keys it draws unrolled. Returns (x, metrics); ``keys`` moves on."""

    def body(layer, carry, i):
        x, count = carry
        inner = Keys(keys.rng, count)
        out = layer(x, *args, inner, train)
        return (out[0], jnp.asarray(inner.count, jnp.int32)), out[1]

    start = jnp.asarray(keys.count, jnp.int32)
    (x, count), metrics = scan.run(layers, body, (x, start), remat=remat)
    if keys.rng is not None:
        keys.count = count
    return x, metrics


class Encoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Kept apart from cfg (whose equality ignores remat) so the graphdef, and with it a jit
        # cache entry, differs between policies.
        self.remat, self.scan_layers = cfg.remat, cfg.scan_layers
        self.relpos_bias = _relpos_bias(cfg, bidirectional=True, rngs=rngs)
        sparse = cfg.encoder_moe.sparse_layers(cfg.num_encoder_layers)
        for i in range(cfg.num_encoder_layers):
            moe = cfg.encoder_moe if i in sparse else None
            # Attributes layers_0, layers_1, … give T5X's paths (a list would give layers/0).
            setattr(self, f"layers_{i}", EncoderLayer(cfg, moe, rngs=rngs))
        self.encoder_norm = RMSNorm(cfg.emb_dim, cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x, mask_BS, keys: Keys, train: bool):
        s = x.shape[1]
        bias = self.relpos_bias(s, s)
        attn_mask = mask_BS[:, None, None, :]
        metrics = []
        layers = layers_of(self, self.cfg.num_encoder_layers)
        if self.scan_layers:
            x, metrics = scan_layers(layers, (bias, attn_mask, mask_BS), x, keys, train, self.remat)
            layers = []
        for layer in layers:
            args = (x, bias, attn_mask, mask_BS)
            x, m = call_layer(self.remat, layer, args, keys, train)
            metrics += [m] if m is not None else []
        x = dropout(self.encoder_norm(x), self.cfg.dropout_rate, keys(), broadcast_length=False)
        return x, metrics


class Decoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.remat, self.scan_layers = cfg.remat, cfg.scan_layers  # as Encoder
        self.relpos_bias = _relpos_bias(cfg, bidirectional=False, rngs=rngs)
        sparse = cfg.decoder_moe.sparse_layers(cfg.num_decoder_layers)
        for i in range(cfg.num_decoder_layers):
            moe = cfg.decoder_moe if i in sparse else None
            setattr(self, f"layers_{i}", DecoderLayer(cfg, moe, rngs=rngs))
        self.decoder_norm = RMSNorm(cfg.emb_dim, cfg.layer_norm_eps, rngs=rngs)
        if not cfg.logits_via_embedding:
            self.logits_dense = Dense(cfg.emb_dim, cfg.vocab_size, ("embed", "vocab"), rngs=rngs)

    def __call__(self, y, encoded, enc_mask_BS, dec_mask_BL, keys: Keys, train: bool):
        l = y.shape[1]
        self_bias = self.relpos_bias(l, l)
        causal = jnp.arange(l)[:, None] >= jnp.arange(l)[None, :]
        self_mask = causal[None, None] & dec_mask_BL[:, None, None, :]
        cross_mask = enc_mask_BS[:, None, None, :]
        metrics = []
        layers = layers_of(self, self.cfg.num_decoder_layers)
        if self.scan_layers:
            args = (encoded, self_bias, self_mask, cross_mask, dec_mask_BL)
            y, metrics = scan_layers(layers, args, y, keys, train, self.remat)
            layers = []
        for layer in layers:
            args = (y, encoded, self_bias, self_mask, cross_mask, dec_mask_BL)
            y, m, _ = call_layer(self.remat, layer, args, keys, train)
            metrics += [m] if m is not None else []
        return self.final(y, keys), metrics

    def final(self, y, keys: Keys):
        return dropout(self.decoder_norm(y), self.cfg.dropout_rate, keys())
