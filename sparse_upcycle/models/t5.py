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
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_upcycle import flop_terms
from sparse_upcycle.layers import (
    Embed,
    activation,
)
from sparse_upcycle.models import moe_config
from sparse_upcycle.models import remat as remat_lib
from sparse_upcycle.models.moe_config import MoeConfig
from sparse_upcycle.models.t5_blocks import (
    Decoder,
    Encoder,
    Keys,
    dropout,
    layers_of,
    project_kv,
)

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
    (parameters are always float32); ``num_experts=0`` in a ``MoeConfig`` means dense.

    ``remat`` (``models/remat.py``) rematerialises every encoder and decoder layer:
    ``"none"`` keeps all activations, ``"dots_saveable"`` keeps every matmul output,
    ``"minimal"`` the matmuls without batch dimensions, ``"full"`` only each layer's input.
    It changes memory and compute, never the function, so config equality ignores it.
    ``scan_layers`` (``models/scan.py``) runs each stack as one ``jax.lax.scan`` (the
    teacher-forced forward; cached decoding stays unrolled); equality ignores it too."""

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
    remat: str = dataclasses.field(default="none", compare=False)
    scan_layers: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self):
        remat_lib.check(self.remat)
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

    def _embed(self, tokens, keys: Keys):
        x = self.token_embedder(tokens.astype(jnp.int32), self.config.dtype)
        return dropout(x, self.config.dropout_rate, keys())

    def _logits(self, y):
        y = y.astype(jnp.float32)  # T5X computes the logits in float32 for stability
        if self.config.logits_via_embedding:
            # T5X network.py / HF T5 v1.0: tied logits scaled by 1/sqrt(emb_dim).
            return self.token_embedder.attend(y) / math.sqrt(self.config.emb_dim)
        return self.decoder.logits_dense(y)

    def _keys(self, rng, train: bool) -> Keys:
        if train and self.config.dropout_rate > 0 and rng is None:
            raise ValueError(f"train=True with dropout_rate={self.config.dropout_rate} needs rng")
        return Keys(rng if train else None)

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
            project_kv(layer.encoder_decoder_attention, encoded)
            for layer in layers_of(self.decoder, self.config.num_decoder_layers)
        )

    def decode_step(self, tokens_B1, cache, encoded, encoder_mask, *, cross_kv=None):
        """Decode one position (``cache["index"]``) given the tokens fed there: returns
        (logits fp32 [B, V], updated cache). The encoder output stays fixed; pass
        ``cross_kv=self.cross_kv(encoded)`` to avoid re-projecting it at every step."""
        cfg = self.config
        cross_kv = cross_kv if cross_kv is not None else self.cross_kv(encoded)
        index = cache["index"]
        max_len = cache["layers"][0][0].shape[1]
        keys = Keys(None)
        y = self._embed(tokens_B1, keys)
        bias = self.decoder.relpos_bias(1, max_len, q_offset=index)
        self_mask = (jnp.arange(max_len) <= index)[None, None, None, :]
        cross_mask = encoder_mask.astype(bool)[:, None, None, :]
        token_mask = jnp.ones(tokens_B1.shape, bool)
        new_kv = []
        for layer, kv, ckv in zip(
            layers_of(self.decoder, cfg.num_decoder_layers), cache["layers"], cross_kv, strict=True
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
            if temperature > 0 and rng is not None:  # rng is set when temperature > 0 (above)
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


# --------------------------------------------------------------------------------------------
# The family's face (``models/__init__.py``).
# --------------------------------------------------------------------------------------------

Config = T5Config
Model = T5
MOE_FIELDS = ("encoder_moe", "decoder_moe")
MLP_WIDTH_FIELD = "mlp_dim"
TASK = "seq2seq"
TOKENS_KEY = "decoder_target_tokens"
HF_MAP = "sparse_upcycle.checkpoints.hf_t5"
HF_MODEL_TYPES = ("t5",)
_INPUT_KEYS = ("encoder_input_tokens", "inputs")
_TARGET_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "targets")


def moe_layer_names(cfg: T5Config) -> list[str]:
    enc = cfg.encoder_moe.sparse_layers(cfg.num_encoder_layers)
    dec = cfg.decoder_moe.sparse_layers(cfg.num_decoder_layers)
    return [f"encoder/layers_{i}" for i in enc] + [f"decoder/layers_{i}" for i in dec]


def forward(model: T5, batch: dict, train: bool, rng):
    """(logits, targets, weights, router metrics) of a T5X-style seq2seq batch."""
    targets = batch["decoder_target_tokens"]
    logits, aux = model(
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        decoder_mask=targets > 0,
        train=train,
        rng=rng,
    )
    return logits, targets, batch["decoder_loss_weights"], aux


def example_inputs(cfg: T5Config, seed: int = 0) -> tuple:
    """Random encoder (2 × 16) and decoder (2 × 8) tokens, what ``verify`` compares on."""
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 16))),
        jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 8))),
    )


def batch_lengths(batch) -> tuple[int, int, int]:
    """(batch size, input length, target length) of a dict batch or a 3-tuple."""
    if isinstance(batch, Mapping):
        b, s = flop_terms.pick(batch, _INPUT_KEYS, "t5")[:2]
        b2, l = flop_terms.pick(batch, _TARGET_KEYS, "t5")[:2]
        if b2 != b:
            raise ValueError(f"encoder batch {b} != decoder batch {b2}")
        return b, s, l
    batch = (batch,) if isinstance(batch, int) else tuple(int(n) for n in batch)
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    raise ValueError(
        f"t5 batch {batch}: expected (batch_size, input_len, target_len) or a dict of arrays"
    )


def forward_flops(cfg: T5Config, b: int, s: int, l: int, train: bool) -> dict[str, int]:
    """Forward model FLOPs by component (``flops.py``): encoder self-attention, decoder self-
    and cross-attention (the encoder's keys/values projected once per decoder layer), gated
    MLPs of both stacks, and untied logits for every target token."""
    out = flop_terms.zeros()
    d, h, dh = cfg.emb_dim, cfg.num_heads, cfg.head_dim
    n_in = len(cfg.mlp_activations)
    enc, dec = b * s, b * l
    for _ in range(cfg.num_encoder_layers):
        flop_terms.add_attention(out, flop_terms.attention(d, h, h, dh, enc, enc, s))
    for _ in range(cfg.num_decoder_layers):
        for n_kv, attended in ((dec, l), (enc, s)):  # self-attention, then cross-attention
            flop_terms.add_attention(out, flop_terms.attention(d, h, h, dh, dec, n_kv, attended))
    flop_terms.mlp_stack(
        out, cfg.encoder_moe, cfg.num_encoder_layers, d, cfg.mlp_dim, n_in, enc, train
    )
    flop_terms.mlp_stack(
        out, cfg.decoder_moe, cfg.num_decoder_layers, d, cfg.mlp_dim, n_in, dec, train
    )
    out["logits"] = 2 * d * cfg.vocab_size * dec
    return out
