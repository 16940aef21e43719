"""HF ``transformers`` ViT ⇄ big_vision-layout ViT parameters (``models/vit.py``), pure numpy.

Sources: HF ``transformers/models/vit/modeling_vit.py`` (``ViTEmbeddings``, ``ViTAttention``,
``ViTLayer``, ``ViTForImageClassification``) and ``conversion_mapping.py`` (``ViTModel``);
google-research/big_vision ``big_vision/models/vit.py`` (``_Model``, ``fix_old_checkpoints``).

Key names. HF checkpoint *files* (``save_pretrained``, the Hub) use the names in the table;
transformers ≥ 5 renames modules in memory (``vit.layers.{i}.attention.q_proj``, ``…o_proj``,
``…mlp.fc1``/``fc2``) and maps file names on load. ``from_hf`` accepts either spelling, with or
without the ``vit.`` prefix (``ViTForImageClassification`` vs bare ``ViTModel``); ``to_hf``
writes the file names with the ``vit.`` prefix. ``torch.nn.Linear`` stores ``[out, in]``.

Name/transpose table (w width, c channels, p patch, N patches, H heads, D head dim, f mlp_dim;
HF names after the ``vit.`` prefix, ``{i}`` the layer; ``…`` = ``encoder.layer.{i}.`` on the
left and ``Transformer/encoderblock_{i}/`` on the right)::

  embeddings.patch_embeddings.projection.weight [w,c,p,p] ↔ embedding/kernel [p,p,c,w]
                                                            (transpose (2, 3, 1, 0))
  embeddings.patch_embeddings.projection.bias   [w]       ↔ embedding/bias [w]
  embeddings.cls_token [1,1,w] + position_embeddings[:, :1] → cls [1,1,w]   (fold, see below)
  embeddings.position_embeddings[:, 1:] [1,N,w]           ↔ pos_embedding [1,N,w]
  …layernorm_before.{weight,bias}                         ↔ …LayerNorm_0/{scale,bias}
  …attention.attention.{query,key,value}.weight [H·D,w]   ↔ …MultiHeadDotProductAttention_0/
                                                            {query,key,value}/kernel [w,H,D]
                                                            (W.T reshaped)
  …attention.attention.{query,key,value}.bias [H·D]       ↔ …/{query,key,value}/bias [H,D]
  …attention.output.dense.weight [w,H·D]                  ↔ …/out/kernel [H,D,w] (W.T reshaped)
  …attention.output.dense.bias [w]                        ↔ …/out/bias [w]
  …layernorm_after.{weight,bias}                          ↔ …LayerNorm_1/{scale,bias}
  …intermediate.dense.weight [f,w], .bias [f]             ↔ …MlpBlock_0/Dense_0/kernel [w,f], bias
  …output.dense.weight [w,f], .bias [w]                   ↔ …MlpBlock_0/Dense_1/kernel [f,w], bias
  layernorm.{weight,bias}                                 ↔ Transformer/encoder_norm/{scale,bias}
  classifier.weight [classes,w], .bias (no vit. prefix)   ↔ head/kernel [w,classes], head/bias

The class-token position. HF prepends ``cls_token`` and then adds all 1+N position
embeddings; big_vision adds ``pos_embedding`` to the N patches and then prepends ``cls``. Both
are the same function when ``cls = cls_token + position_embeddings[:, :1]``, which is what
``from_hf`` stores (big_vision's own ``fix_old_checkpoints`` does this fold for old
checkpoints). The fold cannot be undone, so ``to_hf`` writes ``cls_token = cls`` and a zero
class position; ``to_hf(from_hf(sd))`` therefore equals ``sd`` except for those two entries,
whose sum is kept (``from_hf(to_hf(params)) == params`` exactly).

Not mapped: HF's ``pooler.dense`` (``ViTModel``'s tanh pooler, unused by
``ViTForImageClassification``) and ``embeddings.mask_token`` (masked image modelling) are
dropped by ``from_hf``; any other unknown key is an error. HF ViT has no MoE: convert the dense
model, then upcycle.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sparse_upcycle.checkpoints.hf_types import check_hf_types
from sparse_upcycle.models.vit import ViTConfig, default_moe

# transformers ≥ 5 in-memory names → checkpoint-file names (after the ``vit.`` prefix is cut).
_V5_TO_FILE = (
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)
_DROPPED = ("pooler.", "embeddings.mask_token")

# HF hidden_act → our activation names (models/vit.py, layers.ACTIVATIONS).
_ACTS = {
    "gelu": "gelu_exact",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _normalise_key(key: str) -> str:
    if key.startswith("vit."):
        key = key[len("vit.") :]
    for pattern, repl in _V5_TO_FILE:
        key = pattern.sub(repl, key)
    return key


def _check_dense(config: ViTConfig) -> None:
    if config.moe.sparse_layers(config.depth):
        raise ValueError(
            "HF ViT checkpoints are dense: convert with the dense config (moe.num_experts=0), "
            "then upcycle"
        )
    if config.pool_type != "tok":
        raise ValueError(
            f"HF ViT pools the class token: needs pool_type='tok', not {config.pool_type!r}"
        )


def from_hf(state_dict: dict[str, Any], config: ViTConfig) -> dict:
    """HF ViT state dict (numpy arrays; file or transformers-5 names) → pure params dict.

    Arrays keep their dtype (cast them if you need fp32). Raises ``ValueError`` on a missing,
    misshaped or unknown key.
    """
    _check_dense(config)
    sd = {}
    for key, value in state_dict.items():
        sd[_normalise_key(key)] = np.asarray(value)
    w, h, d = config.width, config.num_heads, config.head_dim

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"HF ViT state dict has no {key!r} (config: {config})")
        value = sd.pop(key)
        if value.shape != shape:
            raise ValueError(f"{key}: expected shape {shape} for this config, got {value.shape}")
        return value

    (ph, pw), c, n = config.patch_size, config.num_channels, config.num_patches
    patch = "embeddings.patch_embeddings.projection."
    params: dict[str, Any] = {
        "embedding": {
            "kernel": take(patch + "weight", (w, c, ph, pw)).transpose(2, 3, 1, 0),
            "bias": take(patch + "bias", (w,)),
        }
    }
    cls_token = take("embeddings.cls_token", (1, 1, w))
    pos = take("embeddings.position_embeddings", (1, 1 + n, w))
    params["cls"] = (cls_token.astype(np.float32) + pos[:, :1].astype(np.float32)).astype(
        cls_token.dtype
    )
    params["pos_embedding"] = pos[:, 1:]

    def norm(prefix):
        return {"scale": take(prefix + "weight", (w,)), "bias": take(prefix + "bias", (w,))}

    def linear(prefix, out_dim, in_dim):
        return take(prefix + "weight", (out_dim, in_dim)).T, take(prefix + "bias", (out_dim,))

    encoder: dict[str, Any] = {}
    for i in range(config.depth):
        p = f"encoder.layer.{i}."
        attn = {}
        for name in ("query", "key", "value"):
            kernel, bias = linear(f"{p}attention.attention.{name}.", h * d, w)
            attn[name] = {"kernel": kernel.reshape(w, h, d), "bias": bias.reshape(h, d)}
        kernel, bias = linear(f"{p}attention.output.dense.", w, h * d)
        attn["out"] = {"kernel": kernel.reshape(h, d, w), "bias": bias}
        k0, b0 = linear(f"{p}intermediate.dense.", config.mlp_dim, w)
        k1, b1 = linear(f"{p}output.dense.", w, config.mlp_dim)
        encoder[f"encoderblock_{i}"] = {
            "LayerNorm_0": norm(f"{p}layernorm_before."),
            "MultiHeadDotProductAttention_0": attn,
            "LayerNorm_1": norm(f"{p}layernorm_after."),
            "MlpBlock_0": {
                "Dense_0": {"kernel": k0, "bias": b0},
                "Dense_1": {"kernel": k1, "bias": b1},
            },
        }
    encoder["encoder_norm"] = norm("layernorm.")
    params["Transformer"] = encoder
    if config.num_classes:
        kernel, bias = linear("classifier.", config.num_classes, w)
        params["head"] = {"kernel": kernel, "bias": bias}
    unknown = sorted(k for k in sd if not k.startswith(_DROPPED))
    if unknown:
        raise ValueError(
            f"HF ViT state dict has keys this config does not use: {unknown[:8]}"
            + (" …" if len(unknown) > 8 else "")
        )
    return params


def to_hf(params: dict, config: ViTConfig) -> dict[str, np.ndarray]:
    """Pure params dict → HF ``ViTForImageClassification`` state dict with checkpoint-file
    names (``vit.encoder.layer.{i}.attention.attention.query.weight`` …), numpy arrays."""
    return dict(iter_to_hf(params, config, prefix="vit."))


def extras_from_hf(state_dict) -> dict[str, np.ndarray]:
    """What ``from_hf`` folds or drops, for ``iter_to_hf`` to write back: ``cls_token`` and
    ``cls_position`` (``position_embeddings[:, :1]``), and the dropped tensors (pooler, mask
    token) as ``dropped/<their name>``. ``state_dict`` is read only for these keys."""
    extras = {}
    for key in state_dict:
        norm = _normalise_key(key)
        if norm == "embeddings.cls_token":
            extras["cls_token"] = np.asarray(state_dict[key])
        elif norm == "embeddings.position_embeddings":
            extras["cls_position"] = np.ascontiguousarray(np.asarray(state_dict[key])[:, :1])
        elif norm.startswith(_DROPPED):
            extras["dropped/" + key] = np.asarray(state_dict[key])
    return extras


def iter_to_hf(params, config: ViTConfig, extras: dict | None = None, prefix: str | None = None):
    """``to_hf`` one tensor at a time (``params`` may be a ``tree.LazyTree``). ``prefix``
    defaults to ``"vit."`` with a head and ``""`` without (``ViTModel``'s own names).

    With ``extras`` (``extras_from_hf`` of the source), the class token and its position are
    written as the source had them when ``cls`` still equals their fold bit for bit (the
    model was not trained since), and the dropped tensors are written back as they were."""
    _check_dense(config)
    extras = extras or {}
    p0 = ("vit." if config.num_classes else "") if prefix is None else prefix
    w, h, d = config.width, config.num_heads, config.head_dim

    def arr(x):
        return np.ascontiguousarray(np.asarray(x))

    patch = p0 + "embeddings.patch_embeddings.projection."
    yield patch + "weight", arr(np.asarray(params["embedding"]["kernel"]).transpose(3, 2, 0, 1))
    yield patch + "bias", arr(params["embedding"]["bias"])
    cls = np.asarray(params["cls"])
    pos = np.asarray(params["pos_embedding"])
    cls_token, cls_position = cls, np.zeros((1, 1, w), pos.dtype)
    if "cls_token" in extras and "cls_position" in extras:
        folded = (
            extras["cls_token"].astype(np.float32) + extras["cls_position"].astype(np.float32)
        ).astype(extras["cls_token"].dtype)
        if folded.shape == cls.shape and np.array_equal(folded.astype(cls.dtype), cls):
            cls_token, cls_position = extras["cls_token"], extras["cls_position"]
    yield p0 + "embeddings.cls_token", arr(cls_token)
    yield (
        p0 + "embeddings.position_embeddings",
        arr(np.concatenate([np.asarray(cls_position, pos.dtype), pos], axis=1)),
    )

    def norm(name, p):
        yield name + "weight", arr(p["scale"])
        yield name + "bias", arr(p["bias"])

    def linear(name, kernel_2d, bias):
        yield name + "weight", arr(np.asarray(kernel_2d).T)
        yield name + "bias", arr(bias)

    enc = params["Transformer"]
    for i in range(config.depth):
        blk, p = enc[f"encoderblock_{i}"], f"{p0}encoder.layer.{i}."
        attn = blk["MultiHeadDotProductAttention_0"]
        yield from norm(p + "layernorm_before.", blk["LayerNorm_0"])
        for name in ("query", "key", "value"):
            kernel = np.asarray(attn[name]["kernel"]).reshape(w, h * d)
            bias = np.asarray(attn[name]["bias"]).reshape(-1)
            yield from linear(f"{p}attention.attention.{name}.", kernel, bias)
        kernel = np.asarray(attn["out"]["kernel"]).reshape(h * d, w)
        yield from linear(p + "attention.output.dense.", kernel, attn["out"]["bias"])
        yield from norm(p + "layernorm_after.", blk["LayerNorm_1"])
        mlp = blk["MlpBlock_0"]
        yield from linear(
            p + "intermediate.dense.", mlp["Dense_0"]["kernel"], mlp["Dense_0"]["bias"]
        )
        yield from linear(p + "output.dense.", mlp["Dense_1"]["kernel"], mlp["Dense_1"]["bias"])
    yield from norm(p0 + "layernorm.", enc["encoder_norm"])
    if config.num_classes:
        yield from linear("classifier.", params["head"]["kernel"], params["head"]["bias"])
    for key, value in extras.items():
        if key.startswith("dropped/"):
            yield key[len("dropped/") :], arr(value)


def config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ViTConfig:
    """``ViTConfig`` from an HF ViT ``config.json`` dict (``ViTConfig.to_dict()``).

    Attention-probability dropout has no counterpart (big_vision has none); it only matters
    in training and is ignored. ``overrides`` set any ``ViTConfig`` field (e.g. ``dtype``).
    """
    c = hf_config
    check_hf_types(
        c,
        ints=(
            "patch_size",
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "image_size",
            "num_channels",
        ),
        floats=("hidden_dropout_prob", "layer_norm_eps", "attention_probs_dropout_prob"),
        bools=("qkv_bias",),
        strs=("hidden_act",),
        dicts=("id2label", "label2id"),
    )
    labels = c.get("num_labels")
    if labels is not None and (isinstance(labels, bool) or not isinstance(labels, int)):
        raise ValueError(f"config.json: num_labels must be an integer, got {labels!r}")
    if not c.get("qkv_bias", True):
        raise ValueError("HF ViT with qkv_bias=False has no big_vision counterpart")
    act = c.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise ValueError(f"HF hidden_act {act!r} not supported; known: {sorted(_ACTS)}")
    if c.get("id2label") is not None:  # an empty map is a headless ViTModel (num_labels=0)
        num_classes = len(c["id2label"])
    elif "ViTModel" in (c.get("architectures") or ()):
        num_classes = 0  # transformers 5 leaves the label maps out of a ViTModel's config
    else:
        num_classes = int(c.get("num_labels", 2))
    fields: dict[str, Any] = dict(
        num_classes=num_classes,
        patch_size=c.get("patch_size", 16),
        width=c.get("hidden_size", 768),
        depth=c.get("num_hidden_layers", 12),
        mlp_dim=c.get("intermediate_size", 3072),
        num_heads=c.get("num_attention_heads", 12),
        pool_type="tok",
        posemb="learn",
        image_size=c.get("image_size", 224),
        num_channels=c.get("num_channels", 3),
        dropout=float(c.get("hidden_dropout_prob", 0.0)),
        layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
        mlp_act=_ACTS[act],
        head_zeroinit=False,
        moe=default_moe(),
    )
    fields.update(overrides)
    return ViTConfig(**fields)


# Our activation names → HF hidden_act (the inverse of ``_ACTS``; gelu_new is the tanh GELU).
_TO_HF_ACTS = {
    "gelu_exact": "gelu",
    "gelu": "gelu_new",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def config_to_hf(config: ViTConfig) -> dict[str, Any]:
    """An HF ViT ``config.json`` dict (``ViTForImageClassification``; ``ViTModel`` when
    ``num_classes=0``) for a dense ``ViTConfig``; ``config_from_hf`` inverts it.

    Not written: ``dtype`` and ``head_zeroinit`` (an initialiser, meaningless for a checkpoint;
    ``config_from_hf`` sets it False). Labels are ``LABEL_{i}`` placeholders, one per class.
    Refused (ValueError), as HF's ViT cannot express them: MoE blocks (HF ViT is dense: export
    the dense model), ``pool_type`` other than ``"tok"`` (HF classifies the class token),
    ``posemb`` other than ``"learn"``, a non-square ``patch_size``/``image_size`` (HF configs
    carry single ints; its position-embedding interpolation assumes square patches) and an
    ``mlp_act`` without an HF ``hidden_act`` name.
    """
    c = config
    if c.moe.sparse_layers(c.depth):
        raise ValueError(
            "HF ViT classes are dense (no MoE layers): export a dense model (moe.num_experts=0)"
        )
    if c.pool_type != "tok":
        raise ValueError(
            f"HF ViT pools the class token: needs pool_type='tok', not {c.pool_type!r}"
        )
    if c.posemb != "learn":
        raise ValueError(f"HF ViT has learned position embeddings only, not {c.posemb!r}")
    for name in ("patch_size", "image_size"):
        h, w = getattr(c, name)
        if h != w:
            raise ValueError(f"HF ViT configs have a square {name} (one int), not {(h, w)}")
    if c.mlp_act not in _TO_HF_ACTS:
        raise ValueError(
            f"mlp_act {c.mlp_act!r} has no HF hidden_act; supported: {sorted(_TO_HF_ACTS)}"
        )
    id2label = {str(i): f"LABEL_{i}" for i in range(c.num_classes)}
    return dict(
        architectures=["ViTForImageClassification" if c.num_classes else "ViTModel"],
        model_type="vit",
        hidden_size=c.width,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim,
        hidden_act=_TO_HF_ACTS[c.mlp_act],
        hidden_dropout_prob=float(c.dropout),
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=float(c.layer_norm_eps),
        image_size=c.image_size[0],
        patch_size=c.patch_size[0],
        num_channels=c.num_channels,
        qkv_bias=True,
        encoder_stride=c.patch_size[0],
        num_labels=c.num_classes,
        id2label=id2label,
        label2id={v: int(k) for k, v in id2label.items()},
    )


__all__ = ["config_from_hf", "config_to_hf", "extras_from_hf", "from_hf", "iter_to_hf", "to_hf"]
