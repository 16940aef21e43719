"""T5 v1.1 encoder-decoder (Raffel et al. 2020; v1.1 = gated-GELU, untied logits, no dropout in
pre-training), dense or with sparse MoE MLP blocks (Komatsuzaki et al. 2023, "Sparse Upcycling").

The network follows T5X's ``t5x/examples/t5/network.py`` block by block: pre-norm RMS layer norms,
attention without 1/sqrt(head_dim) scaling (folded into the query init), one relative position
bias table per stack shared by its layers (bidirectional in the encoder, causal in the decoder),
a shared token embedding, and untied output logits (``logits_via_embedding=False``).

Parameter paths are T5X's (``nnx.to_pure_dict(nnx.state(model))``)::

    token_embedder/embedding                                   [vocab, d]
    encoder/relpos_bias/rel_embedding                          [heads, buckets]
    encoder/layers_{i}/pre_attention_layer_norm/scale          [d]
    encoder/layers_{i}/attention/{query,key,value}/kernel      [d, heads·head_dim]
    encoder/layers_{i}/attention/out/kernel                    [heads·head_dim, d]
    encoder/layers_{i}/pre_mlp_layer_norm/scale                [d]
    encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel                  [d, f]   (wi for one activation)
    encoder/layers_{i}/mlp/wo/kernel                           [f, d]
    encoder/encoder_norm/scale
    decoder/relpos_bias/rel_embedding
    decoder/layers_{i}/pre_self_attention_layer_norm/scale,   .../self_attention/...
    decoder/layers_{i}/pre_cross_attention_layer_norm/scale,  .../encoder_decoder_attention/...
    decoder/layers_{i}/pre_mlp_layer_norm/scale,              .../mlp/...
    decoder/decoder_norm/scale
    decoder/logits_dense/kernel                                [d, vocab]  (untied only)

An MoE block keeps the ``mlp`` name: ``.../mlp/router/w/kernel [d, E]``,
``.../mlp/expert/wi_0/kernel [E, d, f]`` (see ``moe.py``).

Known differences from T5X: no dropout on attention probabilities (``layers.Attention`` has no
hook for it; T5 v1.1 pre-trains with dropout 0); attention masks cover padding keys only
(T5X also masks padding queries, whose outputs are never read); key/value/out kernels are
initialised truncated-normal instead of normal with the same variance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle.layers import (
    Attention,
    Dense,
    Embed,
    RelativePositionBias,
    RMSNorm,
    activation,
    dot_product_attention,
)
from sparse_upcycle.models import moe_config
from sparse_upcycle.models.moe_config import MoeConfig

# --------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------


def _encoder_moe_default() -> MoeConfig:
    # The Sparse Upcycling paper's encoder routing: expert choice, capacity factor 2.
    return MoeConfig(router="expert_choice", capacity_factor=2.0, eval_capacity_factor=2.0)


def _decoder_moe_default() -> MoeConfig:
    # Decoders must route causally (expert choice sees later tokens): top-K, K = 2.
    return MoeConfig(router="top_k", k=2)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5X's ``T5Config`` field names plus the MoE blocks. ``dtype`` is the activation dtype
    (parameters are always float32); ``num_experts=0`` in a ``MoeConfig`` means dense."""

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 6
    head_dim: int = 64
    mlp_dim: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    mlp_activations: tuple[str, ...] = ("gelu", "linear")
    dropout_rate: float = 0.0
    logits_via_embedding: bool = False
    dtype: str = "float32"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    encoder_moe: MoeConfig = dataclasses.field(default_factory=_encoder_moe_default)
    decoder_moe: MoeConfig = dataclasses.field(default_factory=_decoder_moe_default)

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        for name in ("encoder_moe", "decoder_moe"):
            value = getattr(self, name)
            if isinstance(value, dict):  # e.g. from an ml_collections / JSON config
                default = (
                    _encoder_moe_default() if name == "encoder_moe" else _decoder_moe_default()
                )
                object.__setattr__(self, name, dataclasses.replace(default, **value))
        if not self.mlp_activations:
            raise ValueError("mlp_activations must name at least one activation")
        for act in self.mlp_activations:
            activation(act)  # fail early on an unknown name


# T5 v1.1 sizes (T5X t5_1_1 gin files; HF google/t5-v1_1-*).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, layers=2),
    "small": dict(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024, layers=8),
    "base": dict(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048, layers=12),
    "large": dict(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816, layers=24),
    "xl": dict(emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120, layers=24),
    "xxl": dict(emb_dim=4096, num_heads=64, head_dim=64, mlp_dim=10240, layers=24),
}


def config(name: str, **overrides: Any) -> T5Config:
    """A named T5 v1.1 size (``tiny`` is for tests) with field overrides."""
    if name not in SIZES:
        raise ValueError(f"unknown T5 size {name!r}; known: {sorted(SIZES)}")
    size = dict(SIZES[name])
    layers = size.pop("layers")
    size.update(num_encoder_layers=layers, num_decoder_layers=layers)
    return T5Config(**{**size, **overrides})


# --------------------------------------------------------------------------------------------
# Blocks.
# --------------------------------------------------------------------------------------------


class _Keys:
    """Fresh PRNG keys for dropout sites and routers, or None everywhere when not training."""

    def __init__(self, rng: jax.Array | None):
        self.rng, self.count = rng, 0

    def __call__(self) -> jax.Array | None:
        if self.rng is None:
            return None
        self.count += 1
        return jax.random.fold_in(self.rng, self.count)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None, broadcast_length=True):
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
        return self.wo(_dropout(h, dropout_rate, key))


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


def _apply_mlp(layer, cfg: T5Config, x, token_mask, keys: _Keys, train: bool):
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

    def __call__(self, x, bias, attn_mask, token_mask, keys: _Keys, train: bool):
        rate = self.cfg.dropout_rate
        h = self.pre_attention_layer_norm(x)
        h, _ = self.attention(h, h, bias=bias, mask=attn_mask)
        x = x + _dropout(h, rate, keys())
        h, metrics = _apply_mlp(
            self.mlp, self.cfg, self.pre_mlp_layer_norm(x), token_mask, keys, train
        )
        return x + _dropout(h, rate, keys()), metrics


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
        y = y + _dropout(h, rate, keys())
        h = self.pre_cross_attention_layer_norm(y)
        if isinstance(cross, tuple):
            h = _attend_to_kv(self.encoder_decoder_attention, h, *cross, mask=cross_mask)
        else:
            h, _ = self.encoder_decoder_attention(h, cross, mask=cross_mask)
        y = y + _dropout(h, rate, keys())
        h, metrics = _apply_mlp(
            self.mlp, self.cfg, self.pre_mlp_layer_norm(y), token_mask, keys, train
        )
        return y + _dropout(h, rate, keys()), metrics, cache


def _project_kv(attn: Attention, x: jax.Array) -> tuple[jax.Array, jax.Array]:
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


def _layers(module: nnx.Module, n: int) -> list:
    return [getattr(module, f"layers_{i}") for i in range(n)]


class Encoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.relpos_bias = _relpos_bias(cfg, bidirectional=True, rngs=rngs)
        sparse = cfg.encoder_moe.sparse_layers(cfg.num_encoder_layers)
        for i in range(cfg.num_encoder_layers):
            moe = cfg.encoder_moe if i in sparse else None
            # Attributes layers_0, layers_1, … give T5X's paths (a list would give layers/0).
            setattr(self, f"layers_{i}", EncoderLayer(cfg, moe, rngs=rngs))
        self.encoder_norm = RMSNorm(cfg.emb_dim, cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x, mask_BS, keys: _Keys, train: bool):
        s = x.shape[1]
        bias = self.relpos_bias(s, s)
        attn_mask = mask_BS[:, None, None, :]
        metrics = []
        for layer in _layers(self, self.cfg.num_encoder_layers):
            x, m = layer(x, bias, attn_mask, mask_BS, keys, train)
            metrics += [m] if m is not None else []
        x = _dropout(self.encoder_norm(x), self.cfg.dropout_rate, keys(), broadcast_length=False)
        return x, metrics


class Decoder(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.relpos_bias = _relpos_bias(cfg, bidirectional=False, rngs=rngs)
        sparse = cfg.decoder_moe.sparse_layers(cfg.num_decoder_layers)
        for i in range(cfg.num_decoder_layers):
            moe = cfg.decoder_moe if i in sparse else None
            setattr(self, f"layers_{i}", DecoderLayer(cfg, moe, rngs=rngs))
        self.decoder_norm = RMSNorm(cfg.emb_dim, cfg.layer_norm_eps, rngs=rngs)
        if not cfg.logits_via_embedding:
            self.logits_dense = Dense(cfg.emb_dim, cfg.vocab_size, ("embed", "vocab"), rngs=rngs)

    def __call__(self, y, encoded, enc_mask_BS, dec_mask_BL, keys: _Keys, train: bool):
        l = y.shape[1]
        self_bias = self.relpos_bias(l, l)
        causal = jnp.arange(l)[:, None] >= jnp.arange(l)[None, :]
        self_mask = causal[None, None] & dec_mask_BL[:, None, None, :]
        cross_mask = enc_mask_BS[:, None, None, :]
        metrics = []
        for layer in _layers(self, self.cfg.num_decoder_layers):
            y, m, _ = layer(y, encoded, self_bias, self_mask, cross_mask, dec_mask_BL, keys, train)
            metrics += [m] if m is not None else []
        return self.final(y, keys), metrics

    def final(self, y, keys: _Keys):
        return _dropout(self.decoder_norm(y), self.cfg.dropout_rate, keys())


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------


class T5(nnx.Module):
    """T5 v1.1 encoder-decoder; ``model(enc_tokens, dec_tokens) -> (logits fp32 [B, L, V], aux)``
    where ``aux`` is ``moe_config.average_metrics`` over all MoE layers ({} when dense)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        # T5X: normal(stddev=1) embedding init (network.py, token_embedder).
        self.token_embedder = Embed(config.vocab_size, config.emb_dim, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    # -- helpers ---------------------------------------------------------------------------

    def _embed(self, tokens, keys: _Keys):
        x = self.token_embedder(tokens.astype(jnp.int32), self.config.dtype)
        return _dropout(x, self.config.dropout_rate, keys())

    def _logits(self, y):
        y = y.astype(jnp.float32)  # T5X computes the logits in float32 for stability
        if self.config.logits_via_embedding:
            # T5X network.py / HF T5 v1.0: tied logits scaled by 1/sqrt(emb_dim).
            return self.token_embedder.attend(y) / math.sqrt(self.config.emb_dim)
        return self.decoder.logits_dense(y)

    def _keys(self, rng, train: bool) -> _Keys:
        if train and self.config.dropout_rate > 0 and rng is None:
            raise ValueError(f"train=True with dropout_rate={self.config.dropout_rate} needs rng")
        return _Keys(rng if train else None)

    # -- full forward ----------------------------------------------------------------------

    def encode(self, encoder_input_tokens, *, encoder_mask=None, train=False, rng=None):
        """Returns (encoded [B, S, d], list of RouterMetrics of the encoder's MoE layers)."""
        if encoder_mask is None:
            encoder_mask = encoder_input_tokens != 0
        keys = self._keys(rng, train)
        x = self._embed(encoder_input_tokens, keys)
        return self.encoder(x, encoder_mask.astype(bool), keys, train)

    def decode(
        self,
        encoded,
        encoder_mask,
        decoder_input_tokens,
        *,
        decoder_mask=None,
        train=False,
        rng=None,
    ):
        """Teacher-forced decoder: (logits fp32 [B, L, V], list of RouterMetrics).

        ``decoder_mask`` [B, L] (True = real token; default all real) masks decoder padding
        from self-attention keys and from the routers. T5's decoder inputs start with token 0,
        so it cannot be derived from the tokens (T5X uses ``decoder_target_tokens > 0``)."""
        if decoder_mask is None:
            decoder_mask = jnp.ones(decoder_input_tokens.shape, bool)
        keys = self._keys(rng, train)
        y = self._embed(decoder_input_tokens, keys)
        y, metrics = self.decoder(
            y, encoded, encoder_mask.astype(bool), decoder_mask.astype(bool), keys, train
        )
        return self._logits(y), metrics

    def __call__(
        self,
        encoder_input_tokens,
        decoder_input_tokens,
        *,
        encoder_mask=None,
        decoder_mask=None,
        train=False,
        rng=None,
    ):
        """Logits fp32 [B, L, V] and averaged router metrics. ``encoder_mask`` defaults to
        ``tokens != 0``; pass ``decoder_mask`` (e.g. ``decoder_target_tokens > 0``) to keep
        decoder padding out of the routers (see ``decode``). ``rng`` feeds dropout and router
        jitter, in training only."""
        if encoder_mask is None:
            encoder_mask = encoder_input_tokens != 0
        enc_rng, dec_rng = (None, None) if rng is None else jax.random.split(rng)
        encoded, enc_metrics = self.encode(
            encoder_input_tokens, encoder_mask=encoder_mask, train=train, rng=enc_rng
        )
        logits, dec_metrics = self.decode(
            encoded,
            encoder_mask,
            decoder_input_tokens,
            decoder_mask=decoder_mask,
            train=train,
            rng=dec_rng,
        )
        return logits, moe_config.average_metrics(enc_metrics + dec_metrics)

    # -- incremental decoding --------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int) -> dict:
        """Empty self-attention KV cache: ``{"index": 0, "layers": ((k, v), …)}``, each k/v
        [batch, max_len, heads, head_dim] in the activation dtype."""
        cfg = self.config
        shape = (batch, max_len, cfg.num_heads, cfg.head_dim)
        zeros = lambda: jnp.zeros(shape, cfg.dtype)
        kv = tuple((zeros(), zeros()) for _ in range(cfg.num_decoder_layers))
        return {"index": jnp.zeros((), jnp.int32), "layers": kv}

    def cross_kv(self, encoded) -> tuple:
        """Each decoder layer's projected encoder keys/values, to compute once per sequence."""
        return tuple(
            _project_kv(layer.encoder_decoder_attention, encoded)
            for layer in _layers(self.decoder, self.config.num_decoder_layers)
        )

    def decode_step(self, tokens_B1, cache, encoded, encoder_mask, *, cross_kv=None):
        """Decode one position (``cache["index"]``) given the tokens fed there: returns
        (logits fp32 [B, V], updated cache). The encoder output stays fixed; pass
        ``cross_kv=self.cross_kv(encoded)`` to avoid re-projecting it at every step."""
        cfg = self.config
        cross_kv = cross_kv if cross_kv is not None else self.cross_kv(encoded)
        index = cache["index"]
        max_len = cache["layers"][0][0].shape[1]
        keys = _Keys(None)
        y = self._embed(tokens_B1, keys)
        bias = self.decoder.relpos_bias(1, max_len, q_offset=index)
        self_mask = (jnp.arange(max_len) <= index)[None, None, None, :]
        cross_mask = encoder_mask.astype(bool)[:, None, None, :]
        token_mask = jnp.ones(tokens_B1.shape, bool)
        new_kv = []
        for layer, kv, ckv in zip(
            _layers(self.decoder, cfg.num_decoder_layers), cache["layers"], cross_kv, strict=True
        ):
            y, _, kv = layer(
                y, ckv, bias, self_mask, cross_mask, token_mask, keys, False, kv, index
            )
            new_kv.append(kv)
        logits = self._logits(self.decoder.final(y, keys))[:, 0]
        return logits, {"index": index + 1, "layers": tuple(new_kv)}

    def generate(
        self,
        encoder_tokens,
        max_len: int,
        temperature: float = 0.0,
        rng: jax.Array | None = None,
        *,
        encoder_mask=None,
        start_id: int = 0,
        eos_id: int | None = 1,
    ) -> jax.Array:
        """Greedy (``temperature=0``) or temperature sampling: tokens [B, max_len] (the start
        token excluded); after ``eos_id`` a sequence emits padding (0). Wrap in ``nnx.jit`` for
        speed."""
        if temperature > 0 and rng is None:
            raise ValueError("temperature sampling needs rng")
        if encoder_mask is None:
            encoder_mask = encoder_tokens != 0
        encoded, _ = self.encode(encoder_tokens, encoder_mask=encoder_mask)
        cross = self.cross_kv(encoded)
        b = encoder_tokens.shape[0]

        def step(carry, t):
            token, cache, done = carry
            logits, cache = self.decode_step(
                token[:, None], cache, encoded, encoder_mask, cross_kv=cross
            )
            if temperature > 0:
                nxt = jax.random.categorical(jax.random.fold_in(rng, t), logits / temperature)
            else:
                nxt = jnp.argmax(logits, axis=-1)
            nxt = jnp.where(done, 0, nxt).astype(jnp.int32)
            if eos_id is not None:
                done = done | (nxt == eos_id)
            return (nxt, cache, done), nxt

        init = (
            jnp.full((b,), start_id, jnp.int32),
            self.init_cache(b, max_len),
            jnp.zeros(b, bool),
        )
        _, tokens = jax.lax.scan(step, init, jnp.arange(max_len))
        return tokens.T


def abstract_params(cfg: T5Config) -> dict:
    """The parameter tree (T5X paths) as ``jax.ShapeDtypeStruct`` leaves; nothing allocated."""
    model = nnx.eval_shape(lambda: T5(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
