"""HF Llama / Mixtral / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE state dicts <->
``models/decoder.py`` parameters, in pure numpy.

Sources for the formats: HF transformers ``models/llama/modeling_llama.py``,
``models/mixtral/modeling_mixtral.py``, ``models/qwen2/modeling_qwen2.py`` and
``models/qwen3/modeling_qwen3.py`` (5.x), ``conversion_mapping.py`` (Mixtral's on-disk
per-expert names vs the fused 5.x in-memory names), MaxText
``utils/ckpt_scripts/llama_or_mistral_ckpt.py`` (the same mapping to a JAX layout).

torch ``nn.Linear`` stores ``weight`` as [out, in] and computes ``x @ weight.T``; our kernels
are [in, out], hence the transposes. ``{i}`` is the layer, ``{j}`` the expert, ``T`` a 2-D
transpose, ``Tₑ`` a transpose of the last two axes of an [E, ·, ·] array.

=================================================  =====  ====================================
HF name (``model.layers.{i}.`` = ``L.``)           op     ours
=================================================  =====  ====================================
``model.embed_tokens.weight`` [V, d]               —      ``token_embedder/embedding``
``L.input_layernorm.weight`` [d]                   —      ``layers_{i}/pre_attention_norm/scale``
``L.self_attn.q_proj.weight`` [H·Dh, d]            T      ``layers_{i}/attention/query/kernel``
``L.self_attn.k_proj.weight`` [K·Dh, d]            T      ``layers_{i}/attention/key/kernel``
``L.self_attn.v_proj.weight`` [K·Dh, d]            T      ``layers_{i}/attention/value/kernel``
``L.self_attn.o_proj.weight`` [d, H·Dh]            T      ``layers_{i}/attention/out/kernel``
``L.self_attn.{q,k,v}_proj.bias`` (1)              —      ``…/attention/{query,key,value}/bias``
``L.self_attn.o_proj.bias`` [d] (2)                —      ``layers_{i}/attention/out/bias``
``L.self_attn.q_norm.weight`` [Dh] (3)             —      ``…/attention/query_norm/scale``
``L.self_attn.k_norm.weight`` [Dh] (3)             —      ``…/attention/key_norm/scale``
``L.post_attention_layernorm.weight`` [d]          —      ``layers_{i}/pre_mlp_norm/scale``
``L.mlp.gate_proj.weight`` [f, d]                  T      ``layers_{i}/mlp/wi_0/kernel``
``L.mlp.up_proj.weight`` [f, d]                    T      ``layers_{i}/mlp/wi_1/kernel``
``L.mlp.down_proj.weight`` [d, f]                  T      ``layers_{i}/mlp/wo/kernel``
``model.norm.weight`` [d]                          —      ``final_norm/scale``
``lm_head.weight`` [V, d] (untied only)            T      ``logits_dense/kernel``
MoE layers, transformers 5.x (fused):
``L.mlp.gate.weight`` [E, d]                       T      ``layers_{i}/mlp/router/w/kernel``
``L.mlp.experts.gate_up_proj`` [E, 2f, d]          split  ``…/expert/wi_0/kernel`` = Tₑ(rows :f),
                                                          ``…/expert/wi_1/kernel`` = Tₑ(rows f:)
``L.mlp.experts.down_proj`` [E, d, f]              Tₑ     ``layers_{i}/mlp/expert/wo/kernel``
MoE layers, Mixtral safetensors on disk (legacy, accepted by ``from_hf``):
``L.block_sparse_moe.gate.weight`` [E, d]          T      ``layers_{i}/mlp/router/w/kernel``
``L.block_sparse_moe.experts.{j}.w1.weight``       T      ``…/expert/wi_0/kernel[j]`` (gate)
``L.block_sparse_moe.experts.{j}.w3.weight``       T      ``…/expert/wi_1/kernel[j]`` (up)
``L.block_sparse_moe.experts.{j}.w2.weight``       T      ``…/expert/wo/kernel[j]`` (down)
=================================================  =====  ====================================

(1) ``attention_bias`` (Qwen2 always; Llama, Qwen3: config.json ``attention_bias``), (2)
``attention_out_bias`` (Llama, Qwen3: ``attention_bias``; never in Qwen2), (3) ``qk_norm``
(Qwen3 always). Which family a checkpoint is comes from ``config.json``'s ``model_type``
(``config_from_hf``); ``config_to_hf`` writes ``DecoderConfig.model_type`` back. The MoE
layers of a qwen2 / qwen3 model are Qwen2-MoE's / Qwen3-MoE's: the same fused expert and
router names, their own per-expert names (``mlp.experts.{j}.{gate,up,down}_proj``) and
Qwen2-MoE's gated shared expert (``mlp.shared_expert.*``, ``mlp.shared_expert_gate``);
``hf_qwen_moe.py`` has that table.

Rotary layout: HF-format q/k weights are already in the half-split layout that
``layers.apply_rope`` uses (dimension i pairs with i + Dh/2), so they are copied as they are.
Only Meta's original ``consolidated.*.pth`` checkpoints use the interleaved layout (HF's
``convert_llama_weights_to_hf.py`` permutes q/k rows when converting); those are not read here.

Tied embeddings: ``to_hf`` leaves ``lm_head.weight`` out (as ``save_pretrained`` writes it);
``from_hf`` accepts it only if it equals the embedding. Non-persistent buffers
(``…rotary_emb.inv_freq``) are ignored. Everything else must match ``abstract_params(config)``
exactly: missing, unexpected or misshapen tensors raise ``ValueError`` naming them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sparse_upcycle.checkpoints import hf_qwen_moe as qwen_moe
from sparse_upcycle.checkpoints.hf_llama_config import (
    config_from_hf,
    config_to_hf,
    dense_problems,
    mixtral_problems,
    moe_problems,
)
from sparse_upcycle.models.decoder import DecoderConfig, abstract_params

_LAYER = "model.layers.{i}."
# (HF suffix after "model.layers.{i}.", our path inside layers_{i}, transpose)
_LAYER_TABLE = (
    ("input_layernorm.weight", ("pre_attention_norm", "scale"), False),
    ("self_attn.q_proj.weight", ("attention", "query", "kernel"), True),
    ("self_attn.k_proj.weight", ("attention", "key", "kernel"), True),
    ("self_attn.v_proj.weight", ("attention", "value", "kernel"), True),
    ("self_attn.o_proj.weight", ("attention", "out", "kernel"), True),
    ("post_attention_layernorm.weight", ("pre_mlp_norm", "scale"), False),
)
_QKV_BIAS_TABLE = tuple(
    (f"self_attn.{hf}_proj.bias", ("attention", ours, "bias"), False)
    for hf, ours in (("q", "query"), ("k", "key"), ("v", "value"))
)
_OUT_BIAS_TABLE = (("self_attn.o_proj.bias", ("attention", "out", "bias"), False),)
_QK_NORM_TABLE = (
    ("self_attn.q_norm.weight", ("attention", "query_norm", "scale"), False),
    ("self_attn.k_norm.weight", ("attention", "key_norm", "scale"), False),
)
_DENSE_MLP_TABLE = (
    ("mlp.gate_proj.weight", ("mlp", "wi_0", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "wi_1", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "wo", "kernel"), True),
)
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _layer_table(config: DecoderConfig, sparse: bool) -> tuple:
    """The (HF suffix, our path, transpose) rows of one layer under ``config``."""
    return (
        _LAYER_TABLE
        + (_QKV_BIAS_TABLE if config.attention_bias else ())
        + (_OUT_BIAS_TABLE if config.attention_out_bias else ())
        + (_QK_NORM_TABLE if config.qk_norm else ())
        + (() if sparse else _DENSE_MLP_TABLE)
    )


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# --------------------------------------------------------------------------------------------
# Parameters.
# --------------------------------------------------------------------------------------------


def from_hf(state_dict: Mapping[str, Any], config: DecoderConfig) -> dict:
    """An HF Llama/Mixtral/Qwen2/Qwen3/Qwen2-MoE/Qwen3-MoE state dict (numpy arrays, any float
    dtype) -> float32 params in the pure-dict layout of ``decoder.Decoder`` (see the module
    table). MoE layers follow ``config.model_type``: llama -> Mixtral's names, qwen2 / qwen3
    -> the Qwen MoEs' (``hf_qwen_moe.py``)."""
    sd = {k: v for k, v in state_dict.items() if not _IGNORED.match(k)}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in sd:
            raise ValueError(f"HF state dict has no {name!r} (config: {_describe(config)})")
        used.add(name)
        return _f32(sd[name])

    params: dict = {}
    _set(params, ("token_embedder", "embedding"), take("model.embed_tokens.weight"))
    sparse = set(config.sparse_layers)
    for i in range(config.num_hidden_layers):
        prefix, layer = _LAYER.format(i=i), f"layers_{i}"
        table = _layer_table(config, i in sparse)
        for suffix, path, transpose in table:
            w = take(prefix + suffix)
            _set(params, (layer, *path), w.T.copy() if transpose else w)
        if i not in sparse:
            continue
        if config.model_type != "llama":  # Qwen2-MoE / Qwen3-MoE (hf_qwen_moe.py)
            params[layer]["mlp"] = qwen_moe.mlp_from_hf(take, sd.__contains__, prefix, config)
            continue
        if prefix + "mlp.gate.weight" in sd:  # transformers 5.x fused layout
            router = take(prefix + "mlp.gate.weight")
            expert = qwen_moe.fused_experts_from_hf(
                take(prefix + "mlp.experts.gate_up_proj"), take(prefix + "mlp.experts.down_proj")
            )
            wi_0, wi_1, wo = (expert[n]["kernel"] for n in ("wi_0", "wi_1", "wo"))
        else:  # Mixtral's on-disk per-expert layout
            moe = prefix + "block_sparse_moe."
            router = take(moe + "gate.weight")
            experts = range(config.moe.num_experts)
            wi_0 = np.stack([take(f"{moe}experts.{j}.w1.weight").T for j in experts])
            wi_1 = np.stack([take(f"{moe}experts.{j}.w3.weight").T for j in experts])
            wo = np.stack([take(f"{moe}experts.{j}.w2.weight").T for j in experts])
        _set(params, (layer, "mlp", "router", "w", "kernel"), router.T.copy())
        for name, w in (("wi_0", wi_0), ("wi_1", wi_1), ("wo", wo)):
            _set(params, (layer, "mlp", "expert", name, "kernel"), w)
    _set(params, ("final_norm", "scale"), take("model.norm.weight"))
    if config.tie_word_embeddings:
        if "lm_head.weight" in sd:
            used.add("lm_head.weight")
            if not np.array_equal(
                _f32(sd["lm_head.weight"]), _f32(sd["model.embed_tokens.weight"])
            ):
                raise ValueError(
                    "config has tie_word_embeddings=True but lm_head.weight differs from "
                    "model.embed_tokens.weight; use a config with tie_word_embeddings=False"
                )
    else:
        _set(params, ("logits_dense", "kernel"), take("lm_head.weight").T.copy())

    unexpected = sorted(set(sd) - used)
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(
            f"HF state dict has tensors the config does not use: {unexpected[:5]}{more} "
            f"(config: {_describe(config)})"
        )
    _check_shapes(params, abstract_params(config))
    return params


def lazy_from_hf(state_dict: Mapping[str, Any], config: DecoderConfig) -> dict | None:
    """A dense decoder's ``from_hf`` without reading: ``{our flat path: (HF name, transpose)}``,
    every name checked to exist and every tensor of the state dict to have a place, as
    ``from_hf`` checks them (None for a config with MoE layers: ``from_hf`` reads those whole).
    ``HFCheckpoint`` reads a tensor only when asked for it, so a source is never held whole."""
    if config.sparse_layers:
        return None
    names = {k for k in state_dict if not _IGNORED.match(k)}
    out: dict[str, tuple[str, bool]] = {}

    def entry(path: tuple[str, ...], name: str, transpose: bool) -> None:
        if name not in names:
            raise ValueError(f"HF state dict has no {name!r} (config: {_describe(config)})")
        out["/".join(path)] = (name, transpose)

    entry(("token_embedder", "embedding"), "model.embed_tokens.weight", False)
    for i in range(config.num_hidden_layers):
        for suffix, path, transpose in _layer_table(config, False):
            entry((f"layers_{i}", *path), _LAYER.format(i=i) + suffix, transpose)
    entry(("final_norm", "scale"), "model.norm.weight", False)
    used = {name for name, _ in out.values()}
    if config.tie_word_embeddings:
        if "lm_head.weight" in names:
            used.add("lm_head.weight")
            embed, head = (
                _f32(state_dict[n]) for n in ("model.embed_tokens.weight", "lm_head.weight")
            )
            if not np.array_equal(head, embed):
                raise ValueError(
                    "config has tie_word_embeddings=True but lm_head.weight differs from "
                    "model.embed_tokens.weight; use a config with tie_word_embeddings=False"
                )
    else:
        entry(("logits_dense", "kernel"), "lm_head.weight", True)
        used.add("lm_head.weight")
    unexpected = sorted(names - used)
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(
            f"HF state dict has tensors the config does not use: {unexpected[:5]}{more} "
            f"(config: {_describe(config)})"
        )
    return out


def read_lazy(state_dict: Mapping[str, Any], name: str, transpose: bool) -> np.ndarray:
    """One tensor of ``lazy_from_hf``'s plan, as ``from_hf`` would give it (float32)."""
    w = _f32(state_dict[name])
    return w.T if transpose else w  # a view: an HF export transposes it back without a copy


def to_hf(params: Mapping, config: DecoderConfig, *, moe_format: str = "fused") -> dict:
    """Decoder params (pure dict; numpy or jax arrays) -> an HF state dict of float32 numpy
    arrays. MoE layers are written, with the names of the MoE class of ``config.model_type``
    (Mixtral, Qwen2-MoE, Qwen3-MoE), in transformers 5.x's fused layout
    (``moe_format="fused"``) or the per-expert on-disk layout (``"legacy"``)."""
    _check_shapes(params, abstract_params(config))
    return {k: np.asarray(v) for k, v in iter_to_hf(params, config, moe_format=moe_format)}


def iter_to_hf(params: Mapping, config: DecoderConfig, *, moe_format: str = "fused"):
    """``to_hf`` one tensor at a time, ``(hf_name, float32 array)``, reading each parameter
    only when it is needed (``params`` may be a ``tree.LazyTree``); shapes are not checked."""
    if moe_format not in ("fused", "legacy"):
        raise ValueError(f"moe_format must be 'fused' or 'legacy', got {moe_format!r}")
    yield "model.embed_tokens.weight", _f32(params["token_embedder"]["embedding"])
    sparse = set(config.sparse_layers)
    for i in range(config.num_hidden_layers):
        prefix, layer = _LAYER.format(i=i), params[f"layers_{i}"]
        table = _layer_table(config, i in sparse)
        for suffix, path, transpose in table:
            w = _get(layer, path)
            yield prefix + suffix, (qwen_moe.f32_t(w) if transpose else _f32(w))
        if i not in sparse:
            continue
        mlp = layer["mlp"]
        if config.model_type != "llama":  # Qwen2-MoE / Qwen3-MoE (hf_qwen_moe.py)
            yield from qwen_moe.mlp_to_hf(mlp, config, prefix, moe_format=moe_format)
            continue
        if config.moe.num_shared_experts:
            raise ValueError(qwen_moe.shared_problem(config, "Mixtral"))
        router = qwen_moe.f32_t(mlp["router"]["w"]["kernel"])
        if moe_format == "fused":
            yield prefix + "mlp.gate.weight", router
            for name, value in qwen_moe.fused_experts_to_hf(mlp["expert"]):
                yield prefix + "mlp.experts." + name, value
        else:
            moe = prefix + "block_sparse_moe."
            yield moe + "gate.weight", router
            for hf, ours in (("w1", "wi_0"), ("w3", "wi_1"), ("w2", "wo")):
                w = mlp["expert"][ours]["kernel"]
                for j in range(np.shape(w)[0]):
                    yield f"{moe}experts.{j}.{hf}.weight", qwen_moe.f32_t(w[j])
    yield "model.norm.weight", _f32(params["final_norm"]["scale"])
    if not config.tie_word_embeddings:
        yield "lm_head.weight", qwen_moe.f32_t(params["logits_dense"]["kernel"])


def _check_shapes(params: Mapping, expected: Mapping, path: str = "") -> None:
    if set(params) != set(expected):
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        raise ValueError(f"params at {path or '/'}: missing {missing}, unexpected {extra}")
    for key, want in expected.items():
        here = f"{path}/{key}"
        if isinstance(want, Mapping):
            if not isinstance(params[key], Mapping):
                raise ValueError(f"params at {here}: expected a subtree, got an array")
            _check_shapes(params[key], want, here)
        elif tuple(np.shape(params[key])) != tuple(want.shape):
            raise ValueError(
                f"params at {here}: shape {tuple(np.shape(params[key]))}, "
                f"config expects {tuple(want.shape)}"
            )


def _describe(config: DecoderConfig) -> str:
    moe = f", {config.moe.num_experts} experts in layers {list(config.sparse_layers)}"
    return f"{config.num_hidden_layers} layers, tied={config.tie_word_embeddings}" + (
        moe if config.sparse_layers else ""
    )


# The config.json side (``hf_llama_config.py``) is part of this map's face (``models.hf_map``).
__all__ = [
    "config_from_hf",
    "config_to_hf",
    "dense_problems",
    "from_hf",
    "iter_to_hf",
    "lazy_from_hf",
    "mixtral_problems",
    "moe_problems",
    "read_lazy",
    "to_hf",
]
