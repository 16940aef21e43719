"""HF Qwen2-MoE / Qwen3-MoE sparse layers and MoE ``config.json`` fields <-> the decoder's MoE
blocks (``models/decoder.py`` with ``moe.py`` layers), in pure numpy.

Sources for the formats: HF transformers 5.x ``models/qwen2_moe/{modeling,configuration}_
qwen2_moe.py`` and ``models/qwen3_moe/{modeling,configuration}_qwen3_moe.py``
(``*SparseMoeBlock``, ``*TopKRouter``, ``*Experts``, ``*DecoderLayer``) and
``conversion_mapping.py`` (the per-expert on-disk names that 5.x fuses when loading). The rest
of the model (embeddings, attention, norms, dense MLP layers, head) is the dense Qwen2 / Qwen3
map of ``hf_llama.py``; this module holds only what differs.

Tensors of a sparse layer (``L.`` = ``model.layers.{i}.``, ``T`` a 2-D transpose, ``Tₑ`` a
transpose of the last two axes of an [E, ·, ·] array; f = ``moe_intermediate_size``, f_s =
``shared_expert_intermediate_size``):

==================================================  =====  ===================================
HF                                                  op     ours (``layers_{i}/mlp/…``)
==================================================  =====  ===================================
``L.mlp.gate.weight`` [E, d]                        T      ``router/w/kernel`` [d, E]
``L.mlp.experts.gate_up_proj`` [E, 2f, d] (5.x)     split  ``expert/wi_0/kernel`` = Tₑ(rows :f),
                                                           ``expert/wi_1/kernel`` = Tₑ(rows f:)
``L.mlp.experts.down_proj`` [E, d, f] (5.x)         Tₑ     ``expert/wo/kernel`` [E, f, d]
``L.mlp.experts.{j}.gate_proj.weight`` [f, d] (1)   T      ``expert/wi_0/kernel[j]``
``L.mlp.experts.{j}.up_proj.weight`` [f, d] (1)     T      ``expert/wi_1/kernel[j]``
``L.mlp.experts.{j}.down_proj.weight`` [d, f] (1)   T      ``expert/wo/kernel[j]``
``L.mlp.shared_expert.gate_proj.weight`` [f_s, d]   T      ``shared_expert/wi_0/kernel`` (2)
``L.mlp.shared_expert.up_proj.weight`` [f_s, d]     T      ``shared_expert/wi_1/kernel`` (2)
``L.mlp.shared_expert.down_proj.weight`` [d, f_s]   T      ``shared_expert/wo/kernel`` (2)
``L.mlp.shared_expert_gate.weight`` [1, d]          T      ``shared_expert_gate/kernel`` (2)
==================================================  =====  ===================================

(1) the per-expert layout of checkpoints on disk (``--moe-layout per_expert``; transformers
4.x reads it, 5.x fuses it when loading); ``from_hf`` reads either. (2) Qwen2-MoE only: its
``Qwen2MoeSparseMoeBlock`` always has one shared expert MLP of width f_s behind
``sigmoid(x·g)``. Our ``num_shared_experts`` experts of width w are one fused MLP of width
f_s = n·w (``moe.py``), so they map one to one. A model without shared experts is written
with f_s = 0 (zero-size shared-expert tensors, which contribute exactly 0, and a zero gate),
and such a checkpoint reads back without shared experts (its gate is then unused).

Config fields: a layer i is sparse in HF iff ``i not in mlp_only_layers``, ``num_experts > 0``
and ``(i + 1) % decoder_sparse_step == 0``; ``sparse_layers_to_hf`` writes our set with the
fewest ``mlp_only_layers`` (``every_other`` is step 2, ``all`` step 1, both with ``[]``).
Routing (``*TopKRouter``): p = softmax(x·W_gate) in float32 over all E experts, the top-K of p,
divided by their sum when ``norm_topk_prob``; no capacity (dropless). That is our
``softmax_then_topk`` with ``renormalize = norm_topk_prob``, and ``topk_then_softmax`` is the
renormalised function too. Dense layers keep ``intermediate_size``, routed experts are
``moe_intermediate_size`` wide (``moe.expert_mlp_dim``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from sparse_upcycle.checkpoints.chunked import Chunked
from sparse_upcycle.models.decoder import DEFAULT_MOE, DecoderConfig
from sparse_upcycle.models.moe_config import MoeConfig

# config.json model_type -> the dense family ``DecoderConfig.model_type`` records.
QWEN_MOE_KINDS = {"qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
# ``DecoderConfig.model_type`` -> (HF model_type, architecture, name in messages) of an MoE.
MOE_TARGETS = {
    "llama": ("mixtral", "MixtralForCausalLM", "Mixtral"),
    "qwen2": ("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2-MoE"),
    "qwen3": ("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3-MoE"),
}
# HF's class defaults (Qwen2MoeConfig, Qwen3MoeConfig) of the fields read here.
_DEFAULTS = {
    "qwen2_moe": dict(
        num_key_value_heads=16,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
    ),
    "qwen3_moe": dict(
        num_key_value_heads=4,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        shared_expert_intermediate_size=0,  # Qwen3-MoE has no shared expert
    ),
}
_SHARED = ("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")


# --------------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------------


def kv_heads_default(kind: str) -> int:
    """HF's class default ``num_key_value_heads`` of ``kind`` (16 Qwen2-MoE, 4 Qwen3-MoE)."""
    return _DEFAULTS[kind]["num_key_value_heads"]


def sparse_layers_from_hf(num_layers: int, step: int, mlp_only: list[int]) -> tuple[int, ...]:
    """The sparse layers of HF's rule (``Qwen2MoeDecoderLayer.__init__``)."""
    dense = set(mlp_only)
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def sparse_layers_to_hf(sparse: tuple[int, ...], num_layers: int) -> tuple[int, list[int]]:
    """(``decoder_sparse_step``, ``mlp_only_layers``) whose sparse layers are ``sparse``: of
    the steps whose layers hold ``sparse``, the one that needs the fewest ``mlp_only_layers``
    (the smaller step on a tie), so every other layer is step 2 and every layer step 1."""
    want = set(sparse)
    best: tuple[int, list[int]] = (1, sorted(set(range(num_layers)) - want))
    for step in range(2, num_layers + 1):
        layers = {i for i in range(num_layers) if (i + 1) % step == 0}
        if want <= layers and len(layers - want) < len(best[1]):
            best = (step, sorted(layers - want))
    return best


def _layers_spec(sparse: tuple[int, ...], num_layers: int) -> str | tuple[int, ...]:
    """``MoeConfig.layers`` for a sparse set: the named patterns where they fit."""
    if sparse == tuple(range(num_layers)):
        return "all"
    if sparse == tuple(range(1, num_layers, 2)):
        return "every_other"
    return sparse


def _count(hf: Mapping, name: str, default: int, *, minimum: int) -> int:
    value = hf.get(name)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.json: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def moe_from_hf(hf: Mapping[str, Any], kind: str, dense: DecoderConfig) -> MoeConfig:
    """The ``MoeConfig`` of a Qwen2-MoE / Qwen3-MoE ``config.json`` (``kind``) whose dense
    fields read as ``dense``: top-K dropless ``softmax_then_topk`` with ``renormalize =
    norm_topk_prob`` (HF's formulation), the sparse layers of ``decoder_sparse_step`` and
    ``mlp_only_layers``, ``expert_mlp_dim = moe_intermediate_size`` (None when it is the dense
    width) and, for Qwen2-MoE with ``shared_expert_intermediate_size`` f_s > 0, gated shared
    experts: f_s / f of width f when f divides f_s (Qwen1.5-MoE-A2.7B: 4 × 1408), else one
    of width f_s. Without a sparse layer the model is dense (``DEFAULT_MOE``)."""
    defaults = _DEFAULTS[kind]
    n = dense.num_hidden_layers
    experts = hf.get("num_experts")
    if experts is None:  # transformers 5.x writes Qwen3-MoE's as num_local_experts
        experts = hf.get("num_local_experts")
    experts = _count({"num_experts": experts}, "num_experts", defaults["num_experts"], minimum=0)
    k = _count(hf, "num_experts_per_tok", defaults["num_experts_per_tok"], minimum=1)
    width = _count(hf, "moe_intermediate_size", defaults["moe_intermediate_size"], minimum=1)
    step = _count(hf, "decoder_sparse_step", 1, minimum=1)
    shared = 0
    if kind == "qwen2_moe":
        shared = _count(
            hf,
            "shared_expert_intermediate_size",
            defaults["shared_expert_intermediate_size"],
            minimum=0,
        )
    mlp_only = hf.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in mlp_only
    ):
        raise ValueError("config.json: mlp_only_layers must be a list of layer indices")
    norm = hf.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ValueError(f"config.json: norm_topk_prob must be true or false, got {norm!r}")
    sparse = sparse_layers_from_hf(n, step, mlp_only) if experts else ()
    if not sparse:
        return DEFAULT_MOE
    coef = hf.get("router_aux_loss_coef")
    if k > experts:
        raise ValueError(f"num_experts_per_tok={k} exceeds num_experts={experts}")
    fields: dict[str, Any] = dict(
        num_experts=experts,
        k=k,
        layers=_layers_spec(sparse, n),
        ordering="softmax_then_topk",
        renormalize=norm,
        capacity_factor=None,
        eval_capacity_factor=None,
        expert_mlp_dim=None if width == dense.intermediate_size else width,
        aux_loss_weight=0.001 if coef is None else coef,
        router_z_loss_weight=0.0,  # HF's Qwen MoE losses have no z-loss
        router_init_std=dense.initializer_range,
    )
    if shared:
        count, each = (shared // width, width) if shared % width == 0 else (1, shared)
        fields.update(num_shared_experts=count, shared_expert_mlp_dim=each, shared_expert_gate=True)
    return dataclasses.replace(DEFAULT_MOE, **fields)


def norm_topk_prob(moe: MoeConfig) -> bool:
    """HF's ``norm_topk_prob`` for our top-K routing: the K weights sum to one
    (``renormalize``, or ``topk_then_softmax``: the softmax of the K chosen logits)."""
    return bool(moe.renormalize or moe.ordering == "topk_then_softmax")


def moe_config_to_hf(config: DecoderConfig) -> dict[str, Any]:
    """The ``config.json`` fields of the Qwen2-MoE / Qwen3-MoE (``config.model_type`` qwen2 /
    qwen3) that holds this MoE decoder; call only when ``target_problems`` and
    ``routing_problems`` found nothing."""
    c, m = config, config.moe
    kind, architecture, _ = MOE_TARGETS[c.model_type]
    step, mlp_only = sparse_layers_to_hf(c.sparse_layers, c.num_hidden_layers)
    out: dict[str, Any] = dict(
        architectures=[architecture],
        model_type=kind,
        intermediate_size=c.intermediate_size,
        moe_intermediate_size=m.expert_mlp_dim or c.intermediate_size,
        num_experts=m.num_experts,
        num_experts_per_tok=m.k,
        norm_topk_prob=norm_topk_prob(m),
        decoder_sparse_step=step,
        mlp_only_layers=mlp_only,
        router_aux_loss_coef=m.aux_loss_weight,
        output_router_logits=False,
        use_sliding_window=False,
        sliding_window=None,
    )
    if kind == "qwen2_moe":
        out.update(
            shared_expert_intermediate_size=m.shared_mlp_dim(c.intermediate_size), qkv_bias=True
        )
    else:
        out["attention_bias"] = c.attention_bias
    return out


# --------------------------------------------------------------------------------------------
# What each MoE class can hold.
# --------------------------------------------------------------------------------------------


def _attention(config: DecoderConfig) -> str:
    c = config
    return (
        f"attention_bias={c.attention_bias}, attention_out_bias={c.attention_out_bias}, "
        f"qk_norm={c.qk_norm}"
    )


def target_problems(config: DecoderConfig, model_type: str) -> list[str]:
    """Why HF Qwen2-MoE (``model_type="qwen2"``) or Qwen3-MoE (``"qwen3"``) cannot hold this
    MoE decoder's structure (attention, shared experts); routing is ``routing_problems``.
    Qwen2-MoE: biases on q/k/v, none on o, no q/k norms, one shared expert always behind a
    sigmoid gate; Qwen3-MoE: q/k norms, biases on all four projections or none
    (``attention_bias``), no shared expert (``modeling_qwen{2,3}_moe.py``)."""
    c, m = config, config.moe
    _, _, name = MOE_TARGETS[model_type]
    problems = []
    if model_type == "qwen2":
        if not c.attention_bias or c.attention_out_bias or c.qk_norm:
            problems.append(
                f"HF {name} has biases on q/k/v, none on o and no q/k norms; this model has "
                + _attention(c)
            )
        if m.num_shared_experts and not m.shared_expert_gate:
            problems.append(
                f"HF {name} scales its shared expert by a sigmoid gate, sigmoid(x·g), which "
                f"never equals 1; this model adds its shared experts ({m.num_shared_experts}) "
                "ungated (moe.shared_expert_gate=False; no HF class here holds that)"
            )
    else:
        if c.attention_bias != c.attention_out_bias or not c.qk_norm:
            problems.append(
                f"HF {name} has q/k norms and attention biases on q/k/v and o, or on none; this "
                f"model has {_attention(c)}"
            )
        if m.num_shared_experts:
            problems.append(shared_problem(config, name))
    return problems


def shared_problem(config: DecoderConfig, name: str) -> str:
    """``name`` (Mixtral, Qwen3-MoE) has no shared expert: the message."""
    return (
        f"HF {name} has no shared experts; this model has {config.moe.num_shared_experts} "
        "(moe.num_shared_experts)"
    )


def routing_problems(config: DecoderConfig, name: str, *, dropless: bool = False) -> list[str]:
    """Why the router of HF ``name`` (Mixtral, Qwen2-MoE, Qwen3-MoE: all top-K over softmax
    probabilities, no selection bias, no capacity) would route differently from this MoE at
    inference. Training-only settings (jitter, the losses, a training capacity factor) are
    not checked; ``dropless=True`` accepts an evaluation capacity that can drop tokens (the
    export then routes every token)."""
    m = config.moe
    problems = []
    if m.router != "top_k":
        problems.append(f"{name} routes top-K; this model routes {m.router}")
    if m.score_function != "softmax":
        problems.append(
            f"{name} weights experts by softmax probabilities; this model scores them with "
            f"{m.score_function} (moe.score_function; no HF class here does)"
        )
    if m.expert_bias:
        problems.append(
            f"{name}'s router has no selection bias; this model ranks experts by score + "
            "router/selection_bias (moe.expert_bias; no HF class here does)"
        )
    drops = m.eval_drops()  # the capacity at the configured group size (moe_config.py)
    if drops and not dropless:
        problems.append(
            f"{name} is dropless; in this model {drops}. Pass --dropless to export it routing "
            "every token"
        )
    return problems


# --------------------------------------------------------------------------------------------
# Tensors.
# --------------------------------------------------------------------------------------------


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def f32_t(a: Any) -> np.ndarray:
    """``a`` transposed, as a contiguous float32 array: no copy where ``a`` is itself the
    transposed view of such an array (what an HF reader's lazy tensors are), one transposing
    copy otherwise."""
    return np.ascontiguousarray(np.asarray(a, np.float32).T)


def _t_last2(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def fused_experts_from_hf(gate_up: np.ndarray, down: np.ndarray) -> dict:
    """transformers 5.x's fused experts (``gate_up_proj`` [E, 2f, d], gate rows then up rows;
    ``down_proj`` [E, d, f]) -> our ``expert`` subtree (Mixtral and the Qwen MoEs alike)."""
    f = gate_up.shape[1] // 2
    return {
        "wi_0": {"kernel": _t_last2(gate_up[:, :f])},
        "wi_1": {"kernel": _t_last2(gate_up[:, f:])},
        "wo": {"kernel": _t_last2(down)},
    }


def fused_experts_to_hf(expert: Mapping) -> Iterator[tuple[str, Chunked]]:
    """Our ``expert`` subtree -> (``gate_up_proj``, ``down_proj``) of the fused layout, each
    made one expert at a time (``Chunked``: the writer streams the parts; expert j's
    ``gate_up_proj`` rows are its gate rows then its up rows, written as two parts, never
    concatenated). Experts that are one array seen E times (copies: ``np.broadcast_to``) are
    transposed once."""
    wi_0, wi_1, wo = (expert[n]["kernel"] for n in ("wi_0", "wi_1", "wo"))
    e, d, f = np.shape(wi_0)
    gate_up = lambda: _per_expert(lambda j: (f32_t(wi_0[j]), f32_t(wi_1[j])), wi_0, wi_1)  # noqa: E731
    yield "gate_up_proj", Chunked((e, 2 * f, d), np.float32, gate_up)
    down = lambda: _per_expert(lambda j: (f32_t(wo[j]),), wo)  # noqa: E731
    yield "down_proj", Chunked((e, d, f), np.float32, down)


def _per_expert(make: Callable[[int], tuple], *likes: Any) -> Iterator[np.ndarray]:
    """The parts ``make(j)`` of every expert j, in order; where every one of ``likes`` (the
    arrays the parts are made from) is a stride-0 broadcast over the experts, so that expert
    j is expert j-1's memory, the previous parts again."""
    arrays = [np.asarray(a) for a in likes]
    repeated = all(a.ndim and a.strides[0] == 0 for a in arrays)
    parts: list[np.ndarray] = []
    for j in range(arrays[0].shape[0]):
        if not parts or not repeated:
            parts = [np.asarray(p, np.float32) for p in make(j)]
        yield from parts


def mlp_from_hf(
    take: Callable[[str], np.ndarray],
    has: Callable[[str], bool],
    prefix: str,
    config: DecoderConfig,
) -> dict:
    """Our ``layers_{i}/mlp`` subtree of a Qwen-MoE sparse layer (HF names start with
    ``prefix`` = ``model.layers.{i}.``); ``take`` reads (and marks as used) a float32 tensor,
    ``has`` says whether the state dict holds a name. Fused or per-expert layout."""
    m, p = config.moe, prefix + "mlp."
    mlp: dict = {"router": {"w": {"kernel": f32_t(take(p + "gate.weight"))}}}
    if has(p + "experts.gate_up_proj"):
        mlp["expert"] = fused_experts_from_hf(
            take(p + "experts.gate_up_proj"), take(p + "experts.down_proj")
        )
    else:
        mlp["expert"] = {
            ours: {
                "kernel": np.stack(
                    [f32_t(take(f"{p}experts.{j}.{hf}.weight")) for j in range(m.num_experts)]
                )
            }
            for hf, ours in _SHARED
        }
    if m.num_shared_experts:
        mlp["shared_expert"] = {
            ours: {"kernel": f32_t(take(f"{p}shared_expert.{hf}.weight"))} for hf, ours in _SHARED
        }
        if m.shared_expert_gate:
            mlp["shared_expert_gate"] = {"kernel": f32_t(take(p + "shared_expert_gate.weight"))}
    elif config.model_type == "qwen2":  # Qwen2-MoE of f_s = 0: the empty shared expert
        for hf, _ in _SHARED:
            name = f"{p}shared_expert.{hf}.weight"
            if has(name) and take(name).size:
                raise ValueError(
                    f"{name} has shape {take(name).shape}, but the config has no shared experts"
                )
        if has(p + "shared_expert_gate.weight"):
            take(p + "shared_expert_gate.weight")  # multiplies nothing: not kept
    return mlp


def mlp_to_hf(
    mlp: Mapping, config: DecoderConfig, prefix: str, *, moe_format: str = "fused"
) -> Iterator[tuple[str, np.ndarray | Chunked]]:
    """A Qwen-MoE sparse layer's HF tensors from our ``layers_{i}/mlp`` subtree, fused
    (``moe_format="fused"``) or per expert (``"legacy"``, the on-disk names). Qwen2-MoE
    without shared experts gets the empty one (f_s = 0) and a zero gate; shared experts that
    the target cannot hold raise ValueError (``target_problems`` says so first)."""
    m, p = config.moe, prefix + "mlp."
    d = config.hidden_size
    yield p + "gate.weight", f32_t(mlp["router"]["w"]["kernel"])
    if moe_format == "fused":
        for name, value in fused_experts_to_hf(mlp["expert"]):
            yield p + "experts." + name, value
    else:
        for hf, ours in _SHARED:
            w = mlp["expert"][ours]["kernel"]
            for j in range(np.shape(w)[0]):
                yield f"{p}experts.{j}.{hf}.weight", f32_t(w[j])
    qwen2 = config.model_type == "qwen2"
    if m.num_shared_experts:
        if not qwen2 or not m.shared_expert_gate:
            raise ValueError("; ".join(target_problems(config, config.model_type)))
        for hf, ours in _SHARED:
            yield f"{p}shared_expert.{hf}.weight", f32_t(mlp["shared_expert"][ours]["kernel"])
        yield p + "shared_expert_gate.weight", f32_t(mlp["shared_expert_gate"]["kernel"])
    elif qwen2:
        for hf, _ in _SHARED:
            shape = (d, 0) if hf == "down_proj" else (0, d)
            yield f"{p}shared_expert.{hf}.weight", np.zeros(shape, np.float32)
        yield p + "shared_expert_gate.weight", np.zeros((1, d), np.float32)
