"""HF ``transformers`` T5 (``T5ForConditionalGeneration`` state dict) <-> T5X parameter paths.

Pure numpy: a state dict is ``{name: np.ndarray}`` (e.g. from safetensors' ``load_file`` with
``framework="np"``); parameters are the nested pure dict of ``models/t5.py``. Dense models only
(HF T5 has no MoE layers; upcycling turns the dense tree into an MoE one).

Name table. ``{s}`` = encoder|decoder, ``i`` = block index, ``E.i`` = ``encoder.block.i.layer``,
``D.i`` = ``decoder.block.i.layer``, ``e_i`` = ``encoder/layers_i``, ``d_i`` =
``decoder/layers_i``, ``{qkvo}`` -> ``{query,key,value,out}``. Torch ``nn.Linear`` weights are
[out, in] and T5X kernels [in, out]: T = transposed, = = as is::

  op  HF name                                        T5X path
  =   shared.weight [V, d]                           token_embedder/embedding [V, d]
  =   {s}.embed_tokens.weight [V, d]                 (must equal shared.weight)
  T   {s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, H]
                                                     {s}/relpos_bias/rel_embedding [H, buckets]
  =   E.i.0.layer_norm.weight                        e_i/pre_attention_layer_norm/scale
  T   E.i.0.SelfAttention.{qkvo}.weight              e_i/attention/{qkvo}/kernel
  =   E.i.1.layer_norm.weight                        e_i/pre_mlp_layer_norm/scale
  T   E.i.1.DenseReluDense.{wi_0,wi_1,wo}.weight     e_i/mlp/{wi_0,wi_1,wo}/kernel
  =   encoder.final_layer_norm.weight                encoder/encoder_norm/scale
  =   D.i.0.layer_norm.weight                        d_i/pre_self_attention_layer_norm/scale
  T   D.i.0.SelfAttention.{qkvo}.weight              d_i/self_attention/{qkvo}/kernel
  =   D.i.1.layer_norm.weight                        d_i/pre_cross_attention_layer_norm/scale
  T   D.i.1.EncDecAttention.{qkvo}.weight            d_i/encoder_decoder_attention/{qkvo}/kernel
  =   D.i.2.layer_norm.weight                        d_i/pre_mlp_layer_norm/scale
  T   D.i.2.DenseReluDense.{wi_0,wi_1,wo}.weight     d_i/mlp/{wi_0,wi_1,wo}/kernel
  =   decoder.final_layer_norm.weight                decoder/decoder_norm/scale
  T   lm_head.weight [V, d]                          decoder/logits_dense/kernel [d, V]
      (tied, logits_via_embedding: lm_head.weight = shared.weight, no logits_dense)

A non-gated ``feed_forward_proj`` ("relu") has ``DenseReluDense.wi`` <-> ``mlp/wi``.

Only block 0 of each stack holds the relative attention bias (HF passes it up the stack, T5X
shares one table per stack). HF's q/k/v/o are T5X's flattened DenseGeneral kernels transposed;
neither scales q·k by 1/sqrt(d_kv) (T5 folds it into the query weights), so no rescaling.

transformers 5.x: ``T5Config`` turns a ``tie_word_embeddings`` kwarg into
``scale_decoder_outputs`` and forces ``tie_word_embeddings=True``; an untied v1.1 model needs
``cfg.tie_word_embeddings = False`` set after construction, which also unties
``encoder.embed_tokens``/``decoder.embed_tokens`` from ``shared``. ``to_hf`` therefore writes the
embedding under all three names (and lm_head), and ``from_hf`` refuses input embeddings that
differ from ``shared`` (T5X has one table). ``config_to_hf`` writes both ``tie_word_embeddings``
and ``scale_decoder_outputs`` (= ``logits_via_embedding``); see its docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparse_upcycle.checkpoints.hf_types import check_hf_types
from sparse_upcycle.models.t5 import T5Config

_ATTN = {"q": "query", "k": "key", "v": "value", "o": "out"}

# feed_forward_proj activation -> our activation name. HF maps "gated-gelu" to gelu_new (the
# tanh form) for backwards compatibility; a plain "gelu" is the exact erf form, and so is
# "gelu_python" (the only exact-GELU spelling left for a gated MLP).
_HF_ACT = {
    "gelu_new": "gelu",
    "gelu_python": "gelu_exact",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# Our activation -> feed_forward_proj activation, (non-gated, gated): "gated-gelu" means the
# tanh GELU, so the exact one needs the explicit "gelu_python" when gated.
_TO_HF_ACT = {
    "gelu": ("gelu_new", "gelu"),
    "gelu_exact": ("gelu", "gelu_python"),
    "relu": ("relu", "relu"),
    "silu": ("silu", "silu"),
    "swish": ("silu", "silu"),
}


def config_from_hf(hf_config: dict[str, Any]) -> T5Config:
    """A ``T5Config`` from an HF T5 ``config.json`` dict (or ``T5Config.to_dict()``)."""
    check_hf_types(
        hf_config,
        ints=(
            "vocab_size",
            "d_model",
            "num_heads",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_decoder_layers",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        ),
        floats=("dropout_rate", "layer_norm_epsilon"),
        bools=("scale_decoder_outputs", "tie_word_embeddings"),
        strs=("feed_forward_proj",),
    )
    proj = hf_config.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = parts[0] == "gated"
    act = parts[-1]
    if gated and act == "gelu":
        act = "gelu_new"
    name = "gelu_exact" if act == "gelu" else _HF_ACT.get(act)
    if name is None or len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ValueError(f"unsupported feed_forward_proj {proj!r}")
    # transformers 5.x writes scale_decoder_outputs (= "tied v1.0 head"); older config.json files
    # only have tie_word_embeddings (absent means tied, as in T5 v1.0).
    tied = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
    num_layers = hf_config.get("num_layers", 6)
    return T5Config(
        vocab_size=hf_config.get("vocab_size", 32128),
        emb_dim=hf_config.get("d_model", 512),
        num_heads=hf_config.get("num_heads", 8),
        head_dim=hf_config.get("d_kv", 64),
        mlp_dim=hf_config.get("d_ff", 2048),
        num_encoder_layers=num_layers,
        num_decoder_layers=hf_config.get("num_decoder_layers") or num_layers,
        mlp_activations=(name, "linear") if gated else (name,),
        dropout_rate=float(hf_config.get("dropout_rate", 0.1)),
        logits_via_embedding=bool(tied),
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-6),
    )


def config_to_hf(config: T5Config) -> dict[str, Any]:
    """An HF ``config.json`` dict (``T5ForConditionalGeneration``) for a dense ``T5Config``;
    ``config_from_hf`` inverts it (``dtype`` is not written).

    Refused (ValueError): MoE blocks (HF's T5 classes are dense: export the dense model) and
    ``mlp_activations`` that ``feed_forward_proj`` cannot spell, i.e. anything but ``(act,)`` or
    ``(act, "linear")`` with ``act`` in gelu/gelu_exact/relu/silu/swish. HF's ``gated-gelu`` is
    the tanh GELU (our ``gelu``), so a gated exact GELU is written ``gated-gelu_python``.

    The head: ``logits_via_embedding`` is written as both ``tie_word_embeddings`` (what
    transformers < 5 and other readers use to tie the head) and ``scale_decoder_outputs``
    (transformers 5.x, which turns a ``tie_word_embeddings=False`` kwarg into
    ``scale_decoder_outputs=False`` and forces ``tie_word_embeddings=True``). On 5.x an untied
    model still loads untied with ``from_pretrained``, because it does not tie an
    ``lm_head.weight`` that the checkpoint stores with values differing from ``shared.weight``;
    a model built directly from the config (``T5ForConditionalGeneration(T5Config(**d))``) has a
    tied head unless ``tie_word_embeddings = False`` is set on the config after construction.
    """
    c = config
    if c.encoder_moe.sparse_layers(c.num_encoder_layers) or (
        c.decoder_moe.sparse_layers(c.num_decoder_layers)
    ):
        raise ValueError(
            "HF T5 classes are dense (no MoE layers): export a dense model (num_experts=0)"
        )
    acts = c.mlp_activations
    gated = len(acts) == 2 and acts[1] == "linear"
    if not (len(acts) == 1 or gated) or acts[0] not in _TO_HF_ACT:
        raise ValueError(
            f"mlp_activations {acts} has no HF feed_forward_proj: expected (act,) or "
            f"(act, 'linear') with act in {sorted(_TO_HF_ACT)}"
        )
    act = _TO_HF_ACT[acts[0]][int(gated)]
    tied = bool(c.logits_via_embedding)
    return dict(
        architectures=["T5ForConditionalGeneration"],
        model_type="t5",
        vocab_size=c.vocab_size,
        d_model=c.emb_dim,
        d_kv=c.head_dim,
        d_ff=c.mlp_dim,
        num_layers=c.num_encoder_layers,
        num_decoder_layers=c.num_decoder_layers,
        num_heads=c.num_heads,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        dropout_rate=float(c.dropout_rate),
        layer_norm_epsilon=float(c.layer_norm_eps),
        feed_forward_proj=f"gated-{act}" if gated else act,
        tie_word_embeddings=tied,
        scale_decoder_outputs=tied,
        is_encoder_decoder=True,
        # Fixed by the model, as in T5X: padding is id 0 (the encoder mask is ``tokens != 0``)
        # and decoder inputs start with 0. EOS is the vocabulary's business: HF's default (1).
        pad_token_id=0,
        decoder_start_token_id=0,
    )


def _mlp_names(config: T5Config) -> tuple[str, ...]:
    n = len(config.mlp_activations)
    inputs = ("wi",) if n == 1 else tuple(f"wi_{i}" for i in range(n))
    return (*inputs, "wo")


# Per block: (HF sub-layer, T5X pre-norm name, attention modules as (HF name, T5X name)).
_BLOCK = {
    "encoder": [
        ("0", "pre_attention_layer_norm", ("SelfAttention", "attention")),
        ("1", "pre_mlp_layer_norm", None),
    ],
    "decoder": [
        ("0", "pre_self_attention_layer_norm", ("SelfAttention", "self_attention")),
        ("1", "pre_cross_attention_layer_norm", ("EncDecAttention", "encoder_decoder_attention")),
        ("2", "pre_mlp_layer_norm", None),
    ],
}


def _table(config: T5Config) -> list[tuple[str, tuple[str, ...], bool]]:
    """(HF name, T5X path, transpose) for every parameter except the embedding copies."""
    if config.encoder_moe.sparse_layers(config.num_encoder_layers) or (
        config.decoder_moe.sparse_layers(config.num_decoder_layers)
    ):
        raise ValueError("HF T5 checkpoints are dense: use a config with num_experts=0")
    rows = []
    for stack, n_layers in (
        ("encoder", config.num_encoder_layers),
        ("decoder", config.num_decoder_layers),
    ):
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        rows.append((rel, (stack, "relpos_bias", "rel_embedding"), True))
        for i in range(n_layers):
            for sub, norm, attention in _BLOCK[stack]:
                hf, path = f"{stack}.block.{i}.layer.{sub}", (stack, f"layers_{i}")
                rows.append((f"{hf}.layer_norm.weight", (*path, norm, "scale"), False))
                if attention is None:  # the MLP sub-layer
                    rows += [
                        (f"{hf}.DenseReluDense.{n}.weight", (*path, "mlp", n, "kernel"), True)
                        for n in _mlp_names(config)
                    ]
                else:
                    hf_name, name = attention
                    rows += [
                        (f"{hf}.{hf_name}.{k}.weight", (*path, name, v, "kernel"), True)
                        for k, v in _ATTN.items()
                    ]
        norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
        rows.append((f"{stack}.final_layer_norm.weight", (stack, norm, "scale"), False))
    if not config.logits_via_embedding:
        rows.append(("lm_head.weight", ("decoder", "logits_dense", "kernel"), True))
    return rows


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def from_hf(state_dict: dict[str, np.ndarray], config: T5Config) -> dict:
    """HF T5 state dict -> T5X-path pure dict (arrays keep their dtype; kernels transposed)."""
    missing = [n for n, _, _ in _table(config) if n not in state_dict]
    missing += [] if "shared.weight" in state_dict else ["shared.weight"]
    if missing:
        raise ValueError(f"HF state dict lacks {len(missing)} T5 weights, e.g. {missing[:3]}")
    shared = np.asarray(state_dict["shared.weight"])
    for name in _EMBED_COPIES:
        if name in state_dict and not np.array_equal(state_dict[name], shared):
            raise ValueError(f"{name} differs from shared.weight; T5X has one embedding table")
    params: dict = {"token_embedder": {"embedding": shared}}
    for name, path, transpose in _table(config):
        value = np.asarray(state_dict[name])
        _set(params, path, np.ascontiguousarray(value.T) if transpose else value)
    return params


def to_hf(params: dict, config: T5Config) -> dict[str, np.ndarray]:
    """T5X-path pure dict -> HF T5 state dict (embedding written under all four HF names when
    tied, three otherwise; see the module docstring)."""
    embedding = np.asarray(params["token_embedder"]["embedding"])
    out = {"shared.weight": embedding}
    out.update({name: embedding for name in _EMBED_COPIES})
    if config.logits_via_embedding:
        out["lm_head.weight"] = embedding
    for name, path, transpose in _table(config):
        value = np.asarray(_get(params, path))
        out[name] = np.ascontiguousarray(value.T) if transpose else value
    return out


def iter_to_hf(params, config: T5Config):
    """What ``save_pretrained`` writes for ``T5ForConditionalGeneration``, one tensor at a
    time (``params`` may be a ``tree.LazyTree``): a tied model (``logits_via_embedding``)
    stores the embedding once as ``shared.weight`` (HF ties the input embeddings and the
    head to it on load); an untied one also stores ``{encoder,decoder}.embed_tokens.weight``
    and ``lm_head.weight``."""
    rows = _table(config)  # refuses MoE configs before anything is read
    embedding = np.asarray(params["token_embedder"]["embedding"])
    yield "shared.weight", embedding
    if not config.logits_via_embedding:
        for name in _EMBED_COPIES:
            yield name, embedding
    del embedding
    for name, path, transpose in rows:
        value = np.asarray(_get(params, path))
        yield name, (np.ascontiguousarray(value.T) if transpose else value)
