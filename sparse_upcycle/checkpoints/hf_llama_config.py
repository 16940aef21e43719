"""HF Llama / Mixtral / Qwen2 / Qwen3 ``config.json`` <-> ``DecoderConfig`` (the tensor side
is ``hf_llama.py``, which re-exports these functions as the family's HF map).

Field names and class defaults: transformers ``models/{llama,mixtral,qwen2,qwen3}/
configuration_*.py`` (5.x); what each family's attention holds: ``modeling_*.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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
}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def config_from_hf(hf_config: Mapping[str, Any]) -> DecoderConfig:
    """A ``DecoderConfig`` from an HF ``config.json`` dict (``model_type`` llama, mixtral,
    qwen2 or qwen3).

    Refuses, with a ValueError naming the field, what this decoder does not implement: RoPE
    scaling (e.g. Llama 3.1's "llama3"), MLP biases, activations other than SiLU, Mixtral's
    sliding window and Qwen's (``use_sliding_window=True``, or ``layer_types`` other than
    "full_attention"; a ``sliding_window`` size is fine while ``use_sliding_window`` is false,
    as HF then ignores it). Attention biases follow HF: Llama's and Qwen3's
    ``attention_bias`` puts them on q/k/v and o, Qwen2 always has them on q/k/v and never on o
    (its attention ignores ``attention_bias``, as its MLP and Qwen3's ignore ``mlp_bias``).
    Qwen3 adds the q/k norms and, without ``head_dim``, HF's class default 128. Mixtral
    becomes an every-layer MoE with top-K dropless routing, ``topk_then_softmax`` (its
    softmax-top-K-renormalise is the same function).
    """
    kind = hf_config.get("model_type") if isinstance(hf_config, Mapping) else None
    if kind not in _KINDS:
        raise ValueError(f"model_type {kind!r} is not supported; expected one of {list(_KINDS)}")
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
        ),
        floats=("rope_theta", "rms_norm_eps", "initializer_range", "router_aux_loss_coef"),
        bools=("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"),
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
    qwen = kind in ("qwen2", "qwen3")
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
    bias = kind == "qwen2" or (kind != "mixtral" and bool(hf_config.get("attention_bias", False)))
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
        attention_out_bias=bias and kind != "qwen2",
        qk_norm=kind == "qwen3",
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
    chosen experts; no capacity, so no token is dropped. Our ``topk_then_softmax`` (softmax
    over the K largest logits) is the same function, as is ``softmax_then_topk`` with
    ``renormalize``. Training-only settings (jitter, z-loss, a training capacity factor) do
    not change the inference function and are not checked. ``dropless=True`` accepts an
    evaluation capacity factor that can drop tokens: the export then routes dropless.
    """
    c, m = config, config.moe
    problems = []
    if c.attention_bias or c.attention_out_bias or c.qk_norm:
        problems.append(
            "Mixtral's attention has no biases and no q/k norms; this model has "
            + ", ".join(
                f for f in ("attention_bias", "attention_out_bias", "qk_norm") if getattr(c, f)
            )
            + f" (its dense source is HF {c.model_type!r}; no MoE export for it here)"
        )
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
    config (else ValueError listing ``dense_problems``), ``mixtral`` for an MoE one that
    Mixtral reproduces (else ValueError listing ``mixtral_problems``). Mixtral's
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
