"""Vision Transformer (Dosovitskiy et al. 2021) as big_vision writes it, dense or sparse-MoE.

Reference: google-research/big_vision ``big_vision/models/vit.py`` (``_Model``, ``Encoder``,
``Encoder1DBlock``, ``MlpBlock``, ``decode_variant``). Parameter paths are big_vision's, so a
big_vision ``.npz`` maps by identity:

* ``embedding/kernel`` [p, p, c, width] (+ ``bias`` [width]): the patch "conv" (stride = size).
* ``pos_embedding`` [1, N, width]: learned, added to the N patch tokens only. big_vision adds
  the position embedding *before* prepending the class token (see its ``fix_old_checkpoints``:
  older checkpoints had a cls position, which it folds into ``cls``); we do the same.
* ``cls`` [1, 1, width] (``pool_type="tok"`` only), zero-initialised.
* ``Transformer/encoderblock_{i}/LayerNorm_0`` → ``MultiHeadDotProductAttention_0`` → residual →
  ``LayerNorm_1`` → ``MlpBlock_0`` (``Dense_0`` → GELU → ``Dense_1``) → residual (pre-LN).
  Attention kernels are flax ``DenseGeneral`` 3-D: ``{query,key,value}/kernel`` [width, H, D]
  with ``bias`` [H, D], ``out/kernel`` [H, D, width] with ``bias`` [width].
* ``Transformer/encoder_norm``, then pooling (``tok``: the class token; ``gap``: the mean of
  all tokens) and ``head/kernel`` [width, num_classes] + ``head/bias`` (zero-initialised, as
  big_vision's ``head_zeroinit=True``).

MoE blocks (``config.moe``) replace ``MlpBlock_0`` by a ``moe.MoeMlp`` at the same path, with
big_vision expert names and biases: ``MlpBlock_0/router/w/kernel`` [width, E],
``MlpBlock_0/expert/Dense_0/kernel`` [E, width, mlp_dim] + ``bias`` [E, mlp_dim],
``MlpBlock_0/expert/Dense_1/kernel`` [E, mlp_dim, width] + ``bias`` [E, width]. The default
routing is the Sparse Upcycling paper's vision setting (Komatsuzaki et al. 2023): expert
choice, capacity factor 2, combine weights normalised per token, every other block. Tokens of
the whole batch ([B, L] flattened, class tokens included) are cut into routing groups of
``moe.group_size`` (MoeConfig's default, 4096); a multiple of ``config.seq_len`` keeps images
whole within a group.
Differences from big_vision: no dropout inside an MoE MLP (only after it), and MLP biases are
zero-initialised (big_vision: N(0, 1e-6²)).

GELU: big_vision's ``nn.gelu`` is flax's default, the tanh approximation; that is
``mlp_act="gelu"`` here. HF ViT uses the exact erf form: ``mlp_act="gelu_exact"``.

Named configs (``config(name, **overrides)``):

* ``"Ti/16"``, ``"S/16"``, ``"B/16"``, ``"L/16"`` (any patch: ``"B/32"``): 224×224×3 inputs,
  1000 classes; sizes from big_vision's ``decode_variant`` (Zhai et al. 2021, Table 2).
* ``"<size>/<patch>-28"`` (e.g. ``"Ti/4-28"``, ``"S/7-28"``): 28×28×1 inputs (Fashion-MNIST),
  10 classes. ``"<size>/<patch>-<R>"`` for another R gives R×R×3 inputs, 1000 classes.
* ``"tiny"`` (= ``"tiny/7-28"``): width 32, depth 2, mlp 64, 2 heads; for tests.

``pool_type`` defaults to ``"tok"`` (big_vision's default is ``"gap"``) because the dense
checkpoints one upcycles (original ViT, HF) classify from the class token.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_upcycle import flop_terms
from sparse_upcycle.layers import (
    Dense,
    Kernel,
    activation,
    fan_in_init,
    logical_param,
)
from sparse_upcycle.models import remat as remat_lib
from sparse_upcycle.models.moe_config import MoeConfig, average_metrics
from sparse_upcycle.models.vit_blocks import Encoder, dropout
from sparse_upcycle.sharding import gathered

POOL_TYPES = ("tok", "gap")
POSEMB_TYPES = ("learn",)

# width, depth, mlp_dim, num_heads (big_vision decode_variant).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 64, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}


def default_moe() -> MoeConfig:
    """Dense by default (num_experts=0); set num_experts for the paper's vision routing."""
    return MoeConfig(
        num_experts=0,
        layers="every_other",
        router="expert_choice",
        capacity_factor=2.0,
        eval_capacity_factor=2.0,
        normalize_combine_weights=True,
    )


def _pair(v) -> tuple[int, int]:
    """``v`` as (height, width): an int is square, a sequence gives its two entries."""
    if isinstance(v, int):
        return (int(v), int(v))
    height, width = v
    return (int(height), int(width))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """big_vision ViT fields, plus the MoE block and the activation dtype (params stay fp32).

    ``remat`` (``models/remat.py``) rematerialises every ``encoderblock_i``: ``"none"`` keeps
    all activations, ``"dots_saveable"`` keeps every matmul output, ``"minimal"`` the matmuls
    without batch dimensions, ``"full"`` only each block's input. It changes memory and
    compute, never the function, so config equality ignores it. ``scan_layers``
    (``models/scan.py``) runs the blocks as one ``jax.lax.scan``; equality ignores it too."""

    num_classes: int = 1000  # 0: no head, the model returns the pooled features
    patch_size: tuple[int, int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    pool_type: str = "tok"  # "tok" (class token, as HF/original ViT) | "gap" (big_vision default)
    posemb: str = "learn"
    image_size: tuple[int, int] = (224, 224)
    num_channels: int = 3
    dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    mlp_act: str = "gelu"  # tanh GELU as big_vision; "gelu_exact" for HF
    head_zeroinit: bool = True
    dtype: str = "float32"  # activations
    moe: MoeConfig = dataclasses.field(default_factory=default_moe)
    remat: str = dataclasses.field(default="none", compare=False)
    scan_layers: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self):
        remat_lib.check(self.remat)
        object.__setattr__(self, "patch_size", _pair(self.patch_size))
        object.__setattr__(self, "image_size", _pair(self.image_size))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", dataclasses.replace(default_moe(), **self.moe))
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
        if self.posemb not in POSEMB_TYPES:
            raise ValueError(f"posemb must be one of {POSEMB_TYPES}, got {self.posemb!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if min(self.grid) < 1:
            raise ValueError(
                f"image_size {self.image_size} is smaller than patch {self.patch_size}"
            )
        activation(self.mlp_act)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (height, width); a remainder is cropped, as a VALID conv does."""
        (height, width), (patch_h, patch_w) = self.image_size, self.patch_size
        return (height // patch_h, width // patch_w)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.num_patches + (1 if self.pool_type == "tok" else 0)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


_NAME = re.compile(r"^(?P<size>[A-Za-z]+)(?:/(?P<patch>\d+))?(?:-(?P<res>\d+))?$")


def config(name: str, **overrides: Any) -> ViTConfig:
    """A named config (see the module docstring), then ``overrides`` of ``ViTConfig`` fields.

    ``moe`` may be a ``MoeConfig`` or a dict of ``MoeConfig`` fields applied to the ViT default
    (expert choice, capacity factor 2, normalised combine weights, every other block).
    """
    m = _NAME.match(name)
    if not m or m["size"] not in SIZES or (m["size"] != "tiny" and m["patch"] is None):
        raise ValueError(
            f"unknown ViT config {name!r}; expected <size>/<patch>[-<res>] with size in "
            f"{sorted(SIZES)} (e.g. 'B/16', 'Ti/4-28') or 'tiny'"
        )
    width, depth, mlp_dim, heads = SIZES[m["size"]]
    fields: dict[str, Any] = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
    if m["size"] == "tiny":
        fields.update(patch_size=7, image_size=28, num_channels=1, num_classes=10)
    if m["patch"]:
        fields["patch_size"] = int(m["patch"])
    if m["res"]:
        res = int(m["res"])
        fields["image_size"] = res
        if res == 28:
            fields.update(num_channels=1, num_classes=10)
        else:
            fields.update(num_channels=3, num_classes=1000)
    fields.update(overrides)
    return ViTConfig(**fields)


# --------------------------------------------------------------------------------------------
# The model (its blocks: ``vit_blocks.py``).
# --------------------------------------------------------------------------------------------


class ViT(nnx.Module):
    """ViT classifier; ``model(images [B, H, W, C]) -> (logits [B, num_classes] fp32, aux)``.

    ``aux`` is ``moe_config.average_metrics`` over the MoE blocks (``{}`` for a dense model).
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        (ph, pw), w = c.patch_size, c.width
        self.embedding = Kernel(
            fan_in_init(),  # flax nn.Conv default: lecun_normal over fan_in = p·p·c
            (ph, pw, c.num_channels, w),
            ("unmodeled", "unmodeled", "unmodeled", "embed"),
            rngs=rngs,
            bias_axes=("embed",),
        )
        self.pos_embedding = logical_param(
            nnx.initializers.normal(stddev=w**-0.5),
            rngs.params(),
            (1, c.num_patches, w),
            ("unmodeled", "unmodeled", "embed"),
        )
        if c.pool_type == "tok":
            self.cls = logical_param(
                nnx.initializers.zeros,
                rngs.params(),
                (1, 1, w),
                ("unmodeled", "unmodeled", "embed"),
            )
        self.Transformer = Encoder(c, rngs=rngs)
        if c.num_classes:
            self.head = Dense(
                w,
                c.num_classes,
                ("embed", "unmodeled"),
                init=nnx.initializers.zeros if c.head_zeroinit else None,
                use_bias=True,
                rngs=rngs,
            )

    def patchify(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, N, p·p·C] in the (row, col, channel) order of the conv kernel,
        patches row-major (the order of big_vision's reshape and HF's ``flatten(2)``)."""
        (gh, gw), (ph, pw) = self.config.grid, self.config.patch_size
        b, _, _, ch = images.shape
        x = images[:, : gh * ph, : gw * pw]
        x = x.reshape(b, gh, ph, gw, pw, ch).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, gh * gw, ph * pw * ch)

    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool = False,
        rng: jax.Array | None = None,
        pre_logits: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits [B, num_classes] float32, router metrics); ``pre_logits``: the pooled
        representation the head reads, [B, width], instead of the logits."""
        c = self.config
        if images.ndim != 4 or tuple(images.shape[1:]) != (*c.image_size, c.num_channels):
            raise ValueError(
                f"images must be [B, {c.image_size[0]}, {c.image_size[1]}, {c.num_channels}], "
                f"got {images.shape}"
            )
        if train and c.dropout > 0 and rng is None:
            raise ValueError("train=True with dropout > 0 needs an rng")
        key = rng if train else None
        dt = jnp.dtype(c.dtype)
        kernel = gathered(self.embedding.kernel).astype(dt)
        x = self.patchify(images.astype(dt)) @ kernel.reshape(-1, c.width)
        x = x + self.embedding.bias[...].astype(dt)
        x = x + self.pos_embedding[...].astype(dt)  # patches only, before the class token
        if c.pool_type == "tok":
            cls = jnp.broadcast_to(self.cls[...].astype(dt), (x.shape[0], 1, c.width))
            x = jnp.concatenate([cls, x], axis=1)
        x = dropout(x, c.dropout, None if key is None else jax.random.fold_in(key, c.depth))
        x, metrics = self.Transformer(x, train=train, key=key)
        x = x[:, 0] if c.pool_type == "tok" else jnp.mean(x.astype(jnp.float32), axis=1)
        x = x.astype(dt)
        if c.num_classes and not pre_logits:
            x = self.head(x)
        return x.astype(jnp.float32), average_metrics(metrics)


def abstract_params(config: ViTConfig) -> dict:
    """The parameter tree (pure nested dict) as ``jax.ShapeDtypeStruct``s; nothing allocated."""
    model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def num_params(config: ViTConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))


# --------------------------------------------------------------------------------------------
# The family's face (``models/__init__.py``).
# --------------------------------------------------------------------------------------------

Config = ViTConfig
Model = ViT
MOE_FIELDS = ("moe",)
MLP_WIDTH_FIELD = "mlp_dim"
TASK = "images"
TOKENS_KEY = None  # throughput is counted in images
HF_MAP = "sparse_upcycle.checkpoints.hf_vit"
HF_MODEL_TYPES = ("vit",)
_IMAGE_KEYS = ("image", "images")


def moe_layer_names(cfg: ViTConfig) -> list[str]:
    return [f"encoderblock_{i}" for i in cfg.moe.sparse_layers(cfg.depth)]


def forward(model: ViT, batch: dict, train: bool, rng):
    """(logits, targets, weights, router metrics) of an image batch (``image``, ``label``)."""
    logits, aux = model(batch["image"], train=train, rng=rng)
    return logits, batch["label"], jnp.ones(batch["label"].shape, jnp.float32), aux


def features(model: ViT, images: jax.Array) -> jax.Array:
    """Pre-logit features [B, width] (the few-shot probe's input, ``fewshot.py``)."""
    return model(images, train=False, pre_logits=True)[0]


def example_inputs(cfg: ViTConfig, seed: int = 0) -> tuple:
    """Two random images, the inputs ``verify`` compares the dense and MoE models on."""
    h, w = cfg.image_size
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(2, h, w, cfg.num_channels)), jnp.float32),)


def batch_lengths(batch) -> tuple[int, int, int]:
    """(batch size, 0, 0): a ViT's lengths come from its config; ``batch`` is a dict holding
    ``image``/``images``, an int or a tuple starting with the batch size."""
    if isinstance(batch, Mapping):
        return flop_terms.pick(batch, _IMAGE_KEYS, "vit")[0], 0, 0
    batch = (batch,) if isinstance(batch, int) else tuple(int(n) for n in batch)
    if len(batch) >= 1:
        return batch[0], 0, 0
    raise ValueError(
        f"vit batch {batch}: expected batch_size, a tuple starting with it, or a dict of arrays"
    )


def forward_flops(cfg: ViTConfig, b: int, s: int, l: int, train: bool) -> dict[str, int]:
    """Forward model FLOPs by component (``flops.py``): attention and MLP over the b·N tokens,
    the patch embedding and the head (one row per image)."""
    out = flop_terms.zeros()
    d, h, dh, n_tok = cfg.width, cfg.num_heads, cfg.head_dim, cfg.seq_len
    n = b * n_tok
    for _ in range(cfg.depth):
        flop_terms.add_attention(out, flop_terms.attention(d, h, h, dh, n, n, n_tok))
    flop_terms.mlp_stack(out, cfg.moe, cfg.depth, d, cfg.mlp_dim, 1, n, train)
    ph, pw = cfg.patch_size
    out["embedding"] = 2 * ph * pw * cfg.num_channels * d * b * cfg.num_patches
    out["logits"] = 2 * d * cfg.num_classes * b
    return out


__all__ = [
    "MoeConfig",
    "ViT",
    "ViTConfig",
    "abstract_params",
    "config",
    "default_moe",
    "num_params",
]
