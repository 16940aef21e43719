"""HF Llama / Mixtral / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE ``config.json`` <->
``DecoderConfig`` (the tensor side is ``hf_llama.py``, which re-exports these functions as the
family's HF map; the Qwen MoE fields and what those classes hold are ``hf_qwen_moe.py``).

Field names and class defaults: transformers ``models/{llama,mixtral,qwen2,qwen3,qwen2_moe,
qwen3_moe}/configuration_*.py`` (5.x); what each family's attention holds: ``modeling_*.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sparse_upcycle.checkpoints import hf_qwen_moe as qwen_moe
from sparse_upcycle.checkpoints.hf_types import check_hf_types
from sparse_upcycle.models.decoder import DEFAULT_MOE, DecoderConfig

# --------------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------------


def _rope(hf: Mapping) -> tuple[float, str]:
    """(rope_theta, rope_type) from a 4.x config (``rope_theta``, ``rope_scaling``) or a 5.x
    one (``rope_parameters``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    default = 1e6 if hf.get("model_type") == "mixtral" else 10000.0  # HF's class defaults
    theta = hf.get("rope_theta", params.get("rope_theta", default))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


# config.json ``model_type`` -> (the dense family ``DecoderConfig.model_type`` records, HF's
# class defaults where they differ between families: rms_norm_eps, max_position_embeddings).
_KINDS = {
    "llama": ("llama", 1e-6, 2048),
    "mixtral": ("llama", 1e-5, 2048),
    "qwen2": ("qwen2", 1e-6, 32768),
    "qwen3": ("qwen3", 1e-6, 32768),
    "qwen2_moe": ("qwen2", 1e-6, 32768),
    "qwen3_moe": ("qwen3", 1e-6, 32768),
}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def config_from_hf(hf_config: Mapping[str, Any]) -> DecoderConfig:
    """A ``DecoderConfig`` from an HF ``config.json`` dict (``model_type`` llama, mixtral,
    qwen2, qwen3, qwen2_moe or qwen3_moe).

    Refuses, with a ValueError naming the field, what this decoder does not implement: RoPE
    scaling (e.g. Llama 3.1's "llama3"), MLP biases, activations other than SiLU, Mixtral's
    sliding window and Qwen's (``use_sliding_window=True``, or ``layer_types`` other than
    "full_attention"; a ``sliding_window`` size is fine while ``use_sliding_window`` is false,
    as HF then ignores it). Attention biases follow HF: Llama's and Qwen3's
    ``attention_bias`` puts them on q/k/v and o, Qwen2 always has them on q/k/v and never on o
    (its attention ignores ``attention_bias``, as its MLP and Qwen3's ignore ``mlp_bias``).
    Qwen3 adds the q/k norms and, without ``head_dim``, HF's class default 128. Mixtral
    becomes an every-layer MoE with top-K dropless routing, ``topk_then_softmax`` (its
    softmax-top-K-renormalise is the same function). Qwen2-MoE / Qwen3-MoE read as their dense
    family (``model_type`` qwen2 / qwen3; Qwen2-MoE's q/k/v biases follow ``qkv_bias``) with
    the MoE blocks of ``hf_qwen_moe.moe_from_hf``.
    """
    kind = hf_config.get("model_type") if isinstance(hf_config, Mapping) else None
    if kind not in _KINDS:
        raise ValueError(f"model_type {kind!r} is not supported; expected one of {list(_KINDS)}")
    window = hf_config.get("sliding_window")
    if kind == "qwen2_moe" and type(window) is int and window == 0:
        # Qwen2MoeConfig.__post_init__ writes 0 for "no window" (use_sliding_window=False)
        hf_config = {**hf_config, "sliding_window": None}
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
            "sliding_window",
            "moe_intermediate_size",
            "decoder_sparse_step",
        ),
        floats=("rope_theta", "rms_norm_eps", "initializer_range", "router_aux_loss_coef"),
        bools=(
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "use_sliding_window",
            "norm_topk_prob",
            "qkv_bias",
        ),
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
    qwen = kind in ("qwen2", "qwen3", *qwen_moe.QWEN_MOE_KINDS)
    if not qwen and hf_config.get("mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported (the decoder's MLPs have no biases)")
    if kind == "mixtral" and hf_config.get("attention_bias", False):
        raise ValueError(
            "attention_bias=True is not supported for Mixtral (its attention has none)"
        )
    if kind == "mixtral" and hf_config.get("sliding_window") is not None:
        raise ValueError("Mixtral sliding_window attention is not implemented; set it to null")
    if qwen:
        _check_full_attention(hf_config)
    family, eps, max_positions = _KINDS[kind]
    heads = hf_config["num_attention_heads"]
    kv_default = 32 if qwen else None  # Qwen2Config/Qwen3Config: 32; None means all heads
    if kind in qwen_moe.QWEN_MOE_KINDS:
        kv_default = qwen_moe.kv_heads_default(kind)
    if kind == "qwen2_moe":  # 5.x's qkv_bias (default True; 4.x: always biases)
        bias = hf_config.get("qkv_bias") is not False
    else:
        bias = kind == "qwen2" or (
            kind != "mixtral" and bool(hf_config.get("attention_bias", False))
        )
    kw = dict(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_hidden_layers=hf_config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf_config.get("num_key_value_heads", kv_default) or heads,
        head_dim=hf_config.get("head_dim")
        or (128 if kind == "qwen3" else hf_config["hidden_size"] // heads),
        rope_theta=theta,
        rms_norm_eps=hf_config.get("rms_norm_eps", eps),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_position_embeddings=hf_config.get("max_position_embeddings", max_positions),
        initializer_range=hf_config.get("initializer_range", 0.02),
        attention_bias=bias,
        attention_out_bias=bias and family != "qwen2",
        qk_norm=family == "qwen3",
        model_type=family,
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
    if kind in qwen_moe.QWEN_MOE_KINDS:
        kw["moe"] = qwen_moe.moe_from_hf(hf_config, kind, DecoderConfig(**kw))
    return DecoderConfig(**kw)


def _check_full_attention(hf: Mapping) -> None:
    """Qwen2/Qwen3: refuse sliding-window layers (transformers ``Qwen2Config.__post_init__``:
    ``use_sliding_window`` turns ``sliding_window`` on for the layers from
    ``max_window_layers`` on, or for those ``layer_types`` names "sliding_attention")."""
    if hf.get("use_sliding_window"):
        raise ValueError(
            "use_sliding_window=True (sliding-window attention) is not implemented; set it to "
            "false for full attention in every layer (the same function up to sliding_window "
            "tokens)"
        )
    types = hf.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ValueError("config.json: layer_types must be a list of strings (or null)")
        other = sorted(set(types) - {"full_attention"})
        if other:
            raise ValueError(
                f"layer_types {other} are not implemented (full_attention only); drop "
                "layer_types or make every entry full_attention"
            )


def mixtral_problems(config: DecoderConfig, *, dropless: bool = False) -> list[str]:
    """Why HF ``MixtralForCausalLM`` would compute something else than this MoE decoder (an
    empty list: it computes the same function at inference).

    Mixtral (transformers ``MixtralSparseMoeBlock`` / ``MixtralTopKRouter``): every layer is
    an MoE layer; p = softmax(x·W_gate); the top-K of p, renormalised to sum 1, weight the
    chosen experts; no capacity, so no token is dropped; no shared experts, no attention
    biases or q/k norms. Our ``topk_then_softmax`` (softmax over the K largest logits) is the
    same function, as is ``softmax_then_topk`` with ``renormalize``. Training-only settings
    (jitter, z-loss, a training capacity factor) do not change the inference function and are
    not checked. ``dropless=True`` accepts an evaluation capacity factor that can drop tokens:
    the export then routes dropless (``hf_qwen_moe.routing_problems``).
    """
    return _mixtral_structure(config) + qwen_moe.routing_problems(
        config, "Mixtral", dropless=dropless
    )


def _mixtral_structure(config: DecoderConfig) -> list[str]:
    """What Mixtral's layers cannot hold (``mixtral_problems`` less the shared routing ones)."""
    c, m = config, config.moe
    problems = []
    if c.attention_bias or c.attention_out_bias or c.qk_norm:
        problems.append(
            "Mixtral's attention has no biases and no q/k norms; this model has "
            + ", ".join(
                f for f in ("attention_bias", "attention_out_bias", "qk_norm") if getattr(c, f)
            )
        )
    sparse, every = c.sparse_layers, tuple(range(c.num_hidden_layers))
    if sparse != every:
        dense = sorted(set(every) - set(sparse))
        problems.append(
            f"Mixtral makes every layer an MoE layer; layers {dense} are dense here "
            "(upcycle with model.moe.layers='all')"
        )
    if m.num_shared_experts:
        problems.append(qwen_moe.shared_problem(c, "Mixtral"))
    if m.ordering != "topk_then_softmax" and not m.renormalize:
        problems.append(
            f"Mixtral renormalises the top-{m.k} weights to sum 1; ordering={m.ordering!r} "
            "without renormalize keeps softmax probabilities that do not (no Mixtral config "
            "reproduces that)"
        )
    return problems


def _moe_structure(config: DecoderConfig, family: str) -> list[str]:
    """What the MoE class of dense ``family`` (``qwen_moe.MOE_TARGETS``) cannot hold."""
    if family == "llama":
        return _mixtral_structure(config)
    return qwen_moe.target_problems(config, family)


def moe_problems(config: DecoderConfig, *, dropless: bool = False) -> list[str]:
    """Why the HF MoE class that ``config_to_hf`` picks for this MoE decoder would compute
    something else (an empty list: it computes the same function at inference). The class
    follows the dense family, ``config.model_type``: llama -> Mixtral (``mixtral_problems``),
    qwen2 -> Qwen2-MoE, qwen3 -> Qwen3-MoE (``hf_qwen_moe.target_problems``); all three route
    alike (``hf_qwen_moe.routing_problems``). When the picked class cannot hold the model's
    structure and another one can, the last problem names it and the ``model_type`` that
    picks it."""
    c = config
    _, _, name = qwen_moe.MOE_TARGETS[c.model_type]
    structure = _moe_structure(c, c.model_type)
    problems = structure + qwen_moe.routing_problems(c, name, dropless=dropless)
    if structure:
        fits = [t for t in qwen_moe.MOE_TARGETS if t != c.model_type and not _moe_structure(c, t)]
        if fits:
            other = qwen_moe.MOE_TARGETS[fits[0]][2]
            problems[len(structure) - 1] += (
                f" (HF {other} would hold it: set model_type={fits[0]!r})"
            )
    return problems


def _attention_problems(config: DecoderConfig, model_type: str) -> list[str]:
    """What HF ``model_type``'s attention lacks to hold this config's (``dense_problems``)."""
    qkv, out = config.attention_bias, config.attention_out_bias
    name = _ARCHITECTURES[model_type].removesuffix("ForCausalLM")
    problems = []
    if model_type == "qwen2":
        if not qkv or out:
            problems.append("HF Qwen2 has biases on q/k/v and none on o")
    elif qkv != out:
        problems.append(f"HF {name} has attention biases on q/k/v and o, or on none")
    if config.qk_norm != (model_type == "qwen3"):
        problems.append(
            f"HF {name} {'always has' if model_type == 'qwen3' else 'has no'} q/k norms"
        )
    return problems


def dense_problems(config: DecoderConfig) -> list[str]:
    """Why the HF family ``config.model_type`` names cannot hold this dense decoder's
    attention (an empty list: it can), each naming the family that could. Llama and Qwen3
    have biases on all four projections or on none (``attention_bias``), Qwen2 on q/k/v and
    never on o; only Qwen3 has q/k norms, and always (transformers
    ``models/{llama,qwen2,qwen3}/modeling_*.py``, ``*Attention.__init__``)."""
    c = config
    problems = _attention_problems(c, c.model_type)
    if not problems:
        return []
    fits = [t for t in _ARCHITECTURES if not _attention_problems(c, t)]
    have = (
        f"attention_bias={c.attention_bias}, attention_out_bias={c.attention_out_bias}, "
        f"qk_norm={c.qk_norm}"
    )
    fix = f"set model_type={fits[0]!r}" if fits else "no HF family has this attention"
    return [*problems[:-1], f"{problems[-1]}; this model has {have} ({fix})"]


def config_to_hf(config: DecoderConfig, *, dropless: bool = False) -> dict[str, Any]:
    """An HF ``config.json`` dict: ``config.model_type`` (llama, qwen2 or qwen3) for a dense
    config (else ValueError listing ``dense_problems``); for an MoE one the MoE class of that
    family, ``mixtral``, ``qwen2_moe`` or ``qwen3_moe``, when it reproduces the model (else
    ValueError listing ``moe_problems``). Mixtral's ``intermediate_size`` is the experts'
    width (``moe.expert_mlp_dim`` for fine-grained experts); the Qwen MoEs keep the dense
    width there and put the experts' in ``moe_intermediate_size``
    (``hf_qwen_moe.moe_config_to_hf``)."""
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
        problems = dense_problems(c)
        if problems:
            raise ValueError(f"no HF {c.model_type} equivalent: " + "; ".join(problems))
        out.update(architectures=[_ARCHITECTURES[c.model_type]], model_type=c.model_type)
        if c.model_type == "llama":
            out.update(attention_bias=c.attention_bias, mlp_bias=False)
        else:  # Qwen2 has no attention_bias field (its q/k/v biases are fixed)
            out.update(use_sliding_window=False, sliding_window=None)
            if c.model_type == "qwen3":
                out["attention_bias"] = c.attention_bias
        return out
    problems = moe_problems(c, dropless=dropless)
    if problems:
        name = qwen_moe.MOE_TARGETS[c.model_type][2]
        raise ValueError(f"no HF {name} equivalent: " + "; ".join(problems))
    if c.model_type != "llama":
        out.update(qwen_moe.moe_config_to_hf(c))
        return out
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
