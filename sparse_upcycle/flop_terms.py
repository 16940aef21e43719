"""The terms of the analytic FLOP count (formulas and conventions: ``flops.py``'s docstring).

Each model family's ``forward_flops`` (``models/<family>.py``) adds these up over its layers;
``flops.forward_flops`` dispatches to the family through the model registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sparse_upcycle.routing import routing_groups

BREAKDOWN_KEYS = (
    "attention_projections",
    "attention_scores_values",
    "dense_mlp",
    "expert_mlp",
    "shared_expert_mlp",
    "router",
    "embedding",
    "logits",
)


def zeros() -> dict[str, int]:
    return dict.fromkeys(BREAKDOWN_KEYS, 0)


def attention(
    d: int, heads: int, kv_heads: int, head_dim: int, n_query: int, n_kv: int, attended: int
) -> tuple[int, int]:
    """(projection FLOPs, score+value FLOPs) of one attention layer: ``n_query`` query tokens
    each attending over ``attended`` keys; ``n_kv`` tokens are projected to keys and values."""
    proj = 2 * d * heads * head_dim * n_query * 2  # query and out
    proj += 2 * d * kv_heads * head_dim * n_kv * 2  # key and value
    scores = 2 * 2 * heads * head_dim * attended * n_query
    return proj, scores


def add_attention(out: dict[str, int], terms: tuple[int, int]) -> None:
    out["attention_projections"] += terms[0]
    out["attention_scores_values"] += terms[1]


def mlp(d: int, f: int, n_in: int) -> int:
    """Forward FLOPs of one MLP application to one token (or expert slot)."""
    return 2 * n_in * d * f + 2 * f * d


def moe_slots(moe, num_tokens: int, *, train: bool = True) -> tuple[int, int]:
    """(expert slots computed, router token positions) of one MoE layer (``MoeConfig``) over
    ``num_tokens``.

    Slots are ``G·E·C`` for capacity routing and ``num_tokens·K`` for dropless top-K, with C
    from ``MoeConfig.capacity`` at the group size S of ``routing.routing_groups``; router
    positions are ``G·S`` (padding of the last group included)."""
    g, s = routing_groups(num_tokens, moe.group_size, moe.group_multiple)
    cap = moe.capacity(train, group_size=s)
    slots = num_tokens * moe.k if cap is None else g * moe.num_experts * cap
    return slots, g * s


def mlp_stack(
    out: dict[str, int],
    moe,
    num_layers: int,
    d: int,
    f: int,
    n_in: int,
    num_tokens: int,
    train: bool,
) -> None:
    """Adds the MLP blocks of a stack of ``num_layers`` blocks (``moe`` says which are MoE)."""
    sparse = set(moe.sparse_layers(num_layers))
    dense_layers = num_layers - len(sparse)
    out["dense_mlp"] += dense_layers * num_tokens * mlp(d, f, n_in)
    if sparse:
        slots, routed = moe_slots(moe, num_tokens, train=train)
        f_e = moe.expert_mlp_dim or f
        out["expert_mlp"] += len(sparse) * slots * mlp(d, f_e, n_in)
        out["router"] += len(sparse) * routed * 2 * d * moe.num_experts
        f_s = moe.shared_mlp_dim(f)
        if f_s:  # shared experts (and their gate) on every token
            out["shared_expert_mlp"] += len(sparse) * num_tokens * mlp(d, f_s, n_in)
            if moe.shared_expert_gate:
                out["router"] += len(sparse) * num_tokens * 2 * d


def shape(value: Any) -> tuple[int, ...]:
    """A shape from an array, a ShapeDtypeStruct or a tuple."""
    return tuple(int(n) for n in getattr(value, "shape", value))


def pick(batch: Mapping[str, Any], keys: Sequence[str], family: str) -> tuple[int, ...]:
    """The shape of the first of ``keys`` present in ``batch``."""
    for key in keys:
        if key in batch:
            return shape(batch[key])
    raise ValueError(f"{family} batch needs one of the keys {list(keys)}; got {sorted(batch)}")
