"""HF Llama / Mixtral state dicts <-> ``models/decoder.py`` parameters, in pure numpy.

Sources for the formats: HF transformers ``models/llama/modeling_llama.py`` and
``models/mixtral/modeling_mixtral.py`` (5.x), ``conversion_mapping.py`` (Mixtral's on-disk
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

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sparse_upcycle.models.decoder import DEFAULT_MOE, DecoderConfig, abstract_params

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
_DENSE_MLP_TABLE = (
    ("mlp.gate_proj.weight", ("mlp", "wi_0", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "wi_1", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "wo", "kernel"), True),
)
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


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


def _t_last2(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


# --------------------------------------------------------------------------------------------
# Parameters.
# --------------------------------------------------------------------------------------------


def from_hf(state_dict: Mapping[str, Any], config: DecoderConfig) -> dict:
    """An HF Llama/Mixtral state dict (numpy arrays, any float dtype) -> float32 params in
    the pure-dict layout of ``decoder.Decoder`` (see the module table)."""
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
        table = _LAYER_TABLE + (() if i in sparse else _DENSE_MLP_TABLE)
        for suffix, path, transpose in table:
            w = take(prefix + suffix)
            _set(params, (layer, *path), w.T.copy() if transpose else w)
        if i not in sparse:
            continue
        if prefix + "mlp.gate.weight" in sd:  # transformers 5.x fused layout
            router = take(prefix + "mlp.gate.weight")
            gate_up = take(prefix + "mlp.experts.gate_up_proj")  # [E, 2f, d]
            f = gate_up.shape[1] // 2
            wi_0, wi_1 = _t_last2(gate_up[:, :f]), _t_last2(gate_up[:, f:])
            wo = _t_last2(take(prefix + "mlp.experts.down_proj"))  # [E, d, f] -> [E, f, d]
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


def to_hf(params: Mapping, config: DecoderConfig, *, moe_format: str = "fused") -> dict:
    """Decoder params (pure dict; numpy or jax arrays) -> an HF state dict of float32 numpy
    arrays. MoE layers are written in transformers 5.x's fused layout (``moe_format="fused"``)
    or Mixtral's per-expert on-disk layout (``"legacy"``)."""
    _check_shapes(params, abstract_params(config))
    return dict(iter_to_hf(params, config, moe_format=moe_format))


def iter_to_hf(params: Mapping, config: DecoderConfig, *, moe_format: str = "fused"):
    """``to_hf`` one tensor at a time, ``(hf_name, float32 array)``, reading each parameter
    only when it is needed (``params`` may be a ``tree.LazyTree``); shapes are not checked."""
    if moe_format not in ("fused", "legacy"):
        raise ValueError(f"moe_format must be 'fused' or 'legacy', got {moe_format!r}")
    yield "model.embed_tokens.weight", _f32(params["token_embedder"]["embedding"])
    sparse = set(config.sparse_layers)
    for i in range(config.num_hidden_layers):
        prefix, layer = _LAYER.format(i=i), params[f"layers_{i}"]
        table = _LAYER_TABLE + (() if i in sparse else _DENSE_MLP_TABLE)
        for suffix, path, transpose in table:
            w = _f32(_get(layer, path))
            yield prefix + suffix, (w.T.copy() if transpose else w)
        if i not in sparse:
            continue
        mlp = layer["mlp"]
        router = _f32(mlp["router"]["w"]["kernel"]).T.copy()
        if moe_format == "fused":
            yield prefix + "mlp.gate.weight", router
            wi_0, wi_1 = (_f32(mlp["expert"][n]["kernel"]) for n in ("wi_0", "wi_1"))
            yield (
                prefix + "mlp.experts.gate_up_proj",
                np.concatenate([_t_last2(wi_0), _t_last2(wi_1)], axis=1),
            )
            del wi_0, wi_1
            yield prefix + "mlp.experts.down_proj", _t_last2(_f32(mlp["expert"]["wo"]["kernel"]))
        else:
            moe = prefix + "block_sparse_moe."
            yield moe + "gate.weight", router
            for hf, ours in (("w1", "wi_0"), ("w3", "wi_1"), ("w2", "wo")):
                w = _f32(mlp["expert"][ours]["kernel"])
                for j in range(w.shape[0]):
                    yield f"{moe}experts.{j}.{hf}.weight", w[j].T.copy()
    yield "model.norm.weight", _f32(params["final_norm"]["scale"])
    if not config.tie_word_embeddings:
        yield "lm_head.weight", _f32(params["logits_dense"]["kernel"]).T.copy()


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


# --------------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------------


def check_hf_types(
    hf: Any,
    *,
    ints: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
    bools: tuple[str, ...] = (),
    strs: tuple[str, ...] = (),
    dicts: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
) -> None:
    """Refuse, naming the field, a ``config.json`` value of the wrong JSON type (a string or a
    float where a positive int belongs, a list where an object belongs); an absent field or
    ``null`` is left to the reader's default. Shared by the HF maps of every family."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")

    def bad(name: str, expected: str):
        value = hf[name]
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return ValueError(
            f"config.json: {name} must be {expected}, got {shown} ({type(value).__name__})"
        )

    for name in required:  # absent: the reader names it; null: no value where one must be
        if name in hf and hf[name] is None:
            raise ValueError(f"config.json: {name} must be set, got null")
    present = [n for n in (*ints, *floats, *bools, *strs, *dicts) if hf.get(n) is not None]
    for name in present:
        value = hf[name]
        if name in ints and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise bad(name, "a positive integer")
        if name in floats and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value)
        ):
            raise bad(name, "a finite number")
        if name in bools and not isinstance(value, bool):
            raise bad(name, "true or false")
        if name in strs and not isinstance(value, str):
            raise bad(name, "a string")
        if name in dicts and not isinstance(value, Mapping):
            raise bad(name, "a JSON object (or null)")


def _rope(hf: Mapping) -> tuple[float, str]:
    """(rope_theta, rope_type) from a 4.x config (``rope_theta``, ``rope_scaling``) or a 5.x
    one (``rope_parameters``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    default = 1e6 if hf.get("model_type") == "mixtral" else 10000.0  # HF's class defaults
    theta = hf.get("rope_theta", params.get("rope_theta", default))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def config_from_hf(hf_config: Mapping[str, Any]) -> DecoderConfig:
    """A ``DecoderConfig`` from an HF ``config.json`` dict (``model_type`` llama or mixtral).

    Refuses, with a ValueError naming the field, what this decoder does not implement: RoPE
    scaling (e.g. Llama 3.1's "llama3"), attention/MLP biases, activations other than SiLU and
    Mixtral's sliding window. Mixtral becomes an every-layer MoE with top-K dropless routing,
    ``topk_then_softmax`` (its softmax-top-K-renormalise is the same function).
    """
    kind = hf_config.get("model_type") if isinstance(hf_config, Mapping) else None
    if kind not in ("llama", "mixtral"):
        raise ValueError(f"model_type {kind!r} is not supported; expected 'llama' or 'mixtral'")
    check_hf_types(
        hf_config,
        ints=(
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "num_local_experts",
            "num_experts_per_tok",
        ),
        floats=("rope_theta", "rms_norm_eps", "initializer_range", "router_aux_loss_coef"),
        bools=("tie_word_embeddings", "attention_bias", "mlp_bias"),
        strs=("hidden_act",),
        dicts=("rope_scaling", "rope_parameters"),
        required=(
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ),
    )
    for block in ("rope_scaling", "rope_parameters"):
        if isinstance(hf_config.get(block), Mapping):
            check_hf_types(hf_config[block], floats=("rope_theta", "factor"))
            for key in ("rope_type", "type"):
                if hf_config[block].get(key) is not None and not isinstance(
                    hf_config[block][key], str
                ):
                    raise ValueError(f"config.json: {block}.{key} must be a string")
    theta, rope_type = _rope(hf_config)
    if rope_type != "default":
        raise ValueError(
            f"rope scaling {rope_type!r} is not implemented (plain RoPE only); "
            "drop rope_scaling from the config to run without it"
        )
    if hf_config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act {hf_config['hidden_act']!r} is not supported (silu only)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag, False):
            raise ValueError(f"{flag}=True is not supported (the decoder has no biases)")
    if kind == "mixtral" and hf_config.get("sliding_window") is not None:
        raise ValueError("Mixtral sliding_window attention is not implemented; set it to null")
    heads = hf_config["num_attention_heads"]
    kw = dict(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_hidden_layers=hf_config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        rope_theta=theta,
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6 if kind == "llama" else 1e-5),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        initializer_range=hf_config.get("initializer_range", 0.02),
    )
    if kind == "mixtral":
        kw["moe"] = dataclasses.replace(
            DEFAULT_MOE,
            num_experts=hf_config.get("num_local_experts", 8),
            k=hf_config.get("num_experts_per_tok", 2),
            layers=tuple(range(hf_config["num_hidden_layers"])),
            aux_loss_weight=hf_config.get("router_aux_loss_coef", 0.001),
            router_z_loss_weight=0.0,  # Mixtral trains without a z-loss
            router_init_std=hf_config.get("initializer_range", 0.02),
        )
    return DecoderConfig(**kw)


def mixtral_problems(config: DecoderConfig, *, dropless: bool = False) -> list[str]:
    """Why HF ``MixtralForCausalLM`` would compute something else than this MoE decoder (an
    empty list: it computes the same function at inference).

    Mixtral (transformers ``MixtralSparseMoeBlock`` / ``MixtralTopKRouter``): every layer is
    an MoE layer; p = softmax(x·W_gate); the top-K of p, renormalised to sum 1, weight the
    chosen experts; no capacity, so no token is dropped. Our ``topk_then_softmax`` (softmax
    over the K largest logits) is the same function, as is ``softmax_then_topk`` with
    ``renormalize``. Training-only settings (jitter, z-loss, a training capacity factor) do
    not change the inference function and are not checked. ``dropless=True`` accepts an
    evaluation capacity factor that can drop tokens: the export then routes dropless.
    """
    c, m = config, config.moe
    problems = []
    sparse, every = c.sparse_layers, tuple(range(c.num_hidden_layers))
    if sparse != every:
        dense = sorted(set(every) - set(sparse))
        problems.append(
            f"Mixtral makes every layer an MoE layer; layers {dense} are dense here "
            "(upcycle with model.moe.layers='all')"
        )
    if m.router != "top_k":
        problems.append(f"Mixtral routes top-K; this model routes {m.router}")
    if m.ordering != "topk_then_softmax" and not m.renormalize:
        problems.append(
            f"Mixtral renormalises the top-{m.k} weights to sum 1; ordering={m.ordering!r} "
            "without renormalize keeps softmax probabilities that do not (no Mixtral config "
            "reproduces that)"
        )
    drops = m.eval_drops()  # the capacity at the configured group size (moe_config.py)
    if drops and not dropless:
        problems.append(
            f"Mixtral is dropless; in this model {drops}. Pass --dropless to export it routing "
            "every token"
        )
    return problems


def config_to_hf(config: DecoderConfig, *, dropless: bool = False) -> dict[str, Any]:
    """An HF ``config.json`` dict: ``llama`` for a dense config, ``mixtral`` for an MoE one
    that Mixtral reproduces (else ValueError listing ``mixtral_problems``). Mixtral's
    ``intermediate_size`` is the experts' width (``moe.expert_mlp_dim`` for fine-grained
    experts)."""
    c = config
    out: dict[str, Any] = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
    )
    if not c.sparse_layers:
        out.update(attention_bias=False, mlp_bias=False)
        return out
    problems = mixtral_problems(c, dropless=dropless)
    if problems:
        raise ValueError("no HF Mixtral equivalent: " + "; ".join(problems))
    m = c.moe
    out.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        intermediate_size=m.expert_mlp_dim or c.intermediate_size,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.k,
        router_aux_loss_coef=m.aux_loss_weight,
        router_jitter_noise=0.0,
        output_router_logits=False,
        sliding_window=None,
    )
    return out
