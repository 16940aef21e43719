"""ViT's blocks: attention, MLP, encoder block and the encoder stack, with big_vision's
parameter names (``vit.py`` assembles them into ``ViT`` and documents the parameter paths;
the structure follows big_vision's ``big_vision/models/vit.py``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle import routing
from sparse_upcycle.layers import (
    Dense,
    Kernel,
    LayerNorm,
    activation,
    dot_product_attention,
)
from sparse_upcycle.models import remat as remat_lib
from sparse_upcycle.models import scan
from sparse_upcycle.moe import MoeMlp
from sparse_upcycle.sharding import gathered

if TYPE_CHECKING:
    from sparse_upcycle.models.vit import ViTConfig


def _flat_init(init, n_in: int):
    """Apply a 2-D ``init`` to the kernel flattened to [prod(in dims), prod(out dims)] and
    reshape back, as flax linen's ``DenseGeneral`` does (so xavier fans are d and H·D)."""

    def wrapped(key, shape, dtype=jnp.float32):
        flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
        return init(key, flat, dtype).reshape(shape)

    return wrapped


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class MultiHeadDotProductAttention(nnx.Module):
    """Self-attention with flax linen's ``MultiHeadDotProductAttention`` parameter layout
    (3-D ``DenseGeneral`` kernels, biases everywhere, q·k scaled by head_dim**-0.5)."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
        head_dim = width // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        xavier = nnx.initializers.xavier_uniform()

        def projection() -> Kernel:
            return Kernel(
                _flat_init(xavier, 1),
                (width, num_heads, head_dim),
                ("embed", "heads", "kv"),
                rngs=rngs,
                bias_axes=("heads", "kv"),
            )

        # Created in this order (query, key, value): each takes the next key from ``rngs``.
        self.query = projection()
        self.key = projection()
        self.value = projection()
        self.out = Kernel(
            _flat_init(xavier, 2),
            (num_heads, head_dim, width),
            ("heads", "kv", "embed"),
            rngs=rngs,
            bias_axes=("embed",),
        )

    def __call__(self, x_BLd: jax.Array) -> jax.Array:
        dt = x_BLd.dtype

        def project(layer):
            y = jnp.einsum("bld,dhk->blhk", x_BLd, gathered(layer.kernel).astype(dt))
            return y + layer.bias[...].astype(dt)

        q, k, v = project(self.query), project(self.key), project(self.value)
        o = dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        y = jnp.einsum("blhk,hkd->bld", o, gathered(self.out.kernel).astype(dt))
        return y + self.out.bias[...].astype(dt)


class MlpBlock(nnx.Module):
    """big_vision's ``MlpBlock``: ``Dense_0`` → activation → dropout → ``Dense_1``."""

    def __init__(self, width: int, mlp_dim: int, act: str, dropout: float, *, rngs: nnx.Rngs):
        xavier = nnx.initializers.xavier_uniform()
        self.Dense_0 = Dense(
            width, mlp_dim, ("embed", "mlp"), init=xavier, use_bias=True, rngs=rngs
        )
        self.Dense_1 = Dense(
            mlp_dim, width, ("mlp", "embed"), init=xavier, use_bias=True, rngs=rngs
        )
        self.act, self.dropout = act, dropout

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        h = activation(self.act)(self.Dense_0(x))
        return self.Dense_1(dropout(h, self.dropout, dropout_key))


class Encoder1DBlock(nnx.Module):
    """Pre-LN block; ``MlpBlock_0`` is an ``MlpBlock`` or, in MoE blocks, a ``moe.MoeMlp``."""

    def __init__(self, config: ViTConfig, sparse: bool, *, rngs: nnx.Rngs):
        c = config
        self.dropout = c.dropout
        self.LayerNorm_0 = LayerNorm(c.width, c.layer_norm_eps, rngs=rngs)
        self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(
            c.width, c.num_heads, rngs=rngs
        )
        self.LayerNorm_1 = LayerNorm(c.width, c.layer_norm_eps, rngs=rngs)
        self.sparse = sparse
        self.MlpBlock_0: MoeMlp | MlpBlock
        if sparse:
            self.MlpBlock_0 = c.moe.make_layer(
                c.width,
                c.mlp_dim,
                (c.mlp_act,),
                causal=False,
                rngs=rngs,
                dtype=jnp.dtype(c.dtype),
                naming="big_vision",
                use_bias=True,
            )
        else:
            self.MlpBlock_0 = MlpBlock(c.width, c.mlp_dim, c.mlp_act, c.dropout, rngs=rngs)

    def __call__(self, x, *, train: bool, key: jax.Array | None):
        keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
        y = self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x))
        x = x + dropout(y, self.dropout, keys[0])
        y = self.LayerNorm_1(x)
        metrics = None
        if isinstance(self.MlpBlock_0, MoeMlp):  # a sparse block
            y, metrics = self.MlpBlock_0(y, rng=keys[1], train=train)
        else:
            y = self.MlpBlock_0(y, keys[1])
        x = x + dropout(y.astype(x.dtype), self.dropout, keys[2])
        return x, metrics


class Encoder(nnx.Module):
    """big_vision's ``Transformer``: ``encoderblock_{i}`` then ``encoder_norm``."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.depth = config.depth
        self.remat, self.scan_layers = config.remat, config.scan_layers
        sparse = set(config.moe.sparse_layers(config.depth))
        for i in range(config.depth):
            setattr(self, f"encoderblock_{i}", Encoder1DBlock(config, i in sparse, rngs=rngs))
        self.encoder_norm = LayerNorm(config.width, config.layer_norm_eps, rngs=rngs)

    def __call__(self, x, *, train: bool, key: jax.Array | None):
        metrics: list[routing.RouterMetrics] = []
        blocks = [getattr(self, f"encoderblock_{i}") for i in range(self.depth)]
        if self.scan_layers:

            def body(block, x, i):
                return block(
                    x, train=train, key=None if key is None else jax.random.fold_in(key, i)
                )

            x, metrics = scan.run(blocks, body, x, remat=self.remat)
            return self.encoder_norm(x), metrics

        def run(block, x, key):
            return block(x, train=train, key=key)

        run = remat_lib.block(self.remat, run)
        for i in range(self.depth):
            block_key = None if key is None else jax.random.fold_in(key, i)
            x, m = run(blocks[i], x, block_key)
            if m is not None:
                metrics.append(m)
        return self.encoder_norm(x), metrics
