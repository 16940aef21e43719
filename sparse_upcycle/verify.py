"""``sparse-upcycle verify | inspect``: checking an upcycled checkpoint against its dense source
(the MoE's and the dense model's logits on one deterministic batch, and the function-
preservation verdict), and a human-readable report of any checkpoint this tool reads."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from sparse_upcycle import models
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.layout import (
    config_from_dict,
)
from sparse_upcycle.checkpoints.open import load_upcycled, open_checkpoint, open_dense
from sparse_upcycle.models import build_model
from sparse_upcycle.task import resolve_models
from sparse_upcycle.upcycle.verdict import dense_function_verdict, identical_sources

# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


def verify(config, dense_path: str, moe_path: str, fmt: str = "auto", tol: float = 1e-5) -> dict:
    source = open_dense(dense_path, fmt)
    info, moe_params = load_upcycled(moe_path)
    family, dense_cfg, moe_cfg, recipe = resolve_models(config, source)
    # The function is compared in float32 whatever activation dtype the config trains in:
    # bfloat16's rounding alone moves logits by ~1e-2, far above any tolerance that proves it.
    dense_cfg, moe_cfg = (models.in_float32(c) for c in (dense_cfg, moe_cfg))
    dense_params = {k: source.read(k) for k in source.keys()}
    _check_fits(dense_params, models.target_shapes(family, dense_cfg), dense_path, "dense")
    _check_fits(moe_params, models.target_shapes(family, moe_cfg), moe_path, "MoE")
    dense = build_model(family, dense_cfg, dense_params)
    moe = build_model(family, moe_cfg, moe_params)
    batch = models.get(family).example_inputs(dense_cfg, 0)
    want, _ = dense(*batch, train=False)
    got, aux = moe(*batch, train=False)
    delta = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    verdict = dense_function_verdict(recipe, moe_cfg, identical_sources(info.get("sources")))
    meant = verdict.preserves
    scale = float(np.max(np.abs(np.asarray(want))))
    dropped = float(aux.get("dropped_fraction", 0.0)) if aux else 0.0
    if not (np.isfinite(delta).all() and math.isfinite(scale)):
        return _non_finite_result(source, moe_params, want, got, meant, verdict, tol, dropped)
    return {
        "max_abs_delta": float(delta.max()),
        "mean_abs_delta": float(delta.mean()),
        "max_abs_dense_logit": scale,
        "meant_to_preserve": meant,
        "not_meant_because": list(verdict.reasons),
        "tolerance": tol * max(1.0, scale),
        "ok": (not meant) or float(delta.max()) <= tol * max(1.0, scale),
        "dropped_fraction": dropped,
    }


def _check_fits(params: dict, target: dict, path: str, what: str) -> None:
    """Refuse, naming the tensor, a checkpoint that is not the model of the config: a tensor
    it lacks, one the model does not have, or one of another shape."""
    missing = sorted(set(target) - set(params))
    extra = sorted(set(params) - set(target))
    if missing or extra:
        which = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the model lacks"
        more = len(missing) + len(extra) - 1
        raise CheckpointError(
            f"{path}: the {what} checkpoint {which}"
            + (f" (+{more} more)" if more else "")
            + "; verify with the config it was upcycled with"
        )
    for key in sorted(target):
        if tuple(np.shape(params[key])) != target[key][0]:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(np.shape(params[key]))}, the {what} model of "
                f"the config expects {target[key][0]}"
            )


def non_finite_tensors(keys, read) -> list[str]:
    """The tensors (of ``keys``, read with ``read``) holding a NaN or an infinity."""
    return [k for k in keys if not np.isfinite(np.asarray(read(k), np.float64)).all()]


def _non_finite_result(source, moe_params, want, got, meant, verdict, tol, dropped) -> dict:
    """verify's result when a model's logits are not finite: valid JSON (null, not NaN), the
    tensors to blame, and an explicit verdict (not verified: exit 1 when meant to preserve)."""
    dense_bad = non_finite_tensors(source.keys(), source.read)
    moe_bad = non_finite_tensors(sorted(moe_params), moe_params.__getitem__)
    which = [n for n, x in (("dense", want), ("MoE", got)) if not np.isfinite(np.asarray(x)).all()]
    reason = (
        f"the {' and '.join(which)} logits are not finite (NaN/inf)"
        + (
            f"; non-finite source tensors: {', '.join(dense_bad[:5])}"
            + (f" (+{len(dense_bad) - 5} more)" if len(dense_bad) > 5 else "")
            if dense_bad
            else ""
        )
        + (f"; non-finite MoE tensors: {len(moe_bad)}" if moe_bad else "")
    )
    out = {
        "max_abs_delta": None,
        "mean_abs_delta": None,
        "max_abs_dense_logit": None,
        "meant_to_preserve": meant,
        "not_meant_because": list(verdict.reasons),
        "tolerance": None,
        "ok": not meant,
        "verdict": "not verified: " + reason,
        "non_finite_tensors": dense_bad,
        "dropped_fraction": dropped,
    }
    if dropped and (dense_bad or moe_bad):
        out["dropped_because"] = (
            "the router's scores are NaN/inf, so no token is routed: the fraction comes from "
            "the non-finite weights, not from the capacity"
        )
    return out


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def inspect(path: str, fmt: str = "auto") -> str:
    """A human-readable report: format, tree, parameter counts, recipe, capacities."""
    ckpt = open_checkpoint(path, fmt)
    recipe_info = ckpt.info if ckpt.is_upcycled else None
    fmt_name = "orbax (sparse_upcycle upcycle output)" if ckpt.is_upcycled else ckpt.format
    shapes = {k: (ckpt.shape(k), ckpt.dtype(k)) for k in ckpt.keys()}
    lines = [f"path:    {os.path.abspath(path)}", f"format:  {fmt_name}", "tensors:"]
    width = max((len(k) for k in shapes), default=0)
    for key in sorted(shapes):
        shape, dtype = shapes[key]
        lines.append(f"  {key:<{width}}  {str(tuple(shape)):<22} {np.dtype(dtype).name}")
    total = sum(math.prod(s) for s, _ in shapes.values())
    expert = {k: math.prod(s) for k, (s, _) in shapes.items() if "/expert/" in k}
    lines.append(f"parameters: {total:,} total")
    if expert:
        k_active, note = _active_experts(recipe_info)
        active = (
            total
            - sum(expert.values())
            + sum(n * k_active // shapes[k][0][0] for k, n in expert.items())
        )
        lines.append(f"            {active:,} active per token ({note})")
    if recipe_info:
        lines.append("recipe:  " + json.dumps(recipe_info["recipe"]))
        lines.extend(_capacity_lines(recipe_info))
    return "\n".join(lines)


def _moe_blocks(info) -> dict:
    """The MoE blocks (``MoeConfig`` by field name) of an ``upcycle`` output's model."""
    try:
        return models.moe_blocks(config_from_dict(info["family"], info["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"recipe.json: model: {e}") from None


def _active_experts(info) -> tuple[int, str]:
    blocks = list(_moe_blocks(info).values()) if info else []
    if not blocks:
        return 1, "assuming 1 expert per token"
    moe = blocks[-1]  # T5: the decoder's (top-K) block
    if moe.router == "top_k":
        return int(moe.k), f"top-{moe.k}"
    c = float(moe.capacity_factor or 1)  # expert choice: on average C experts per token
    return max(1, round(c)), f"expert choice: C={c:g} experts per token on average"


def _capacity_lines(info) -> list[str]:
    out = [
        "capacity per MoE layer (expert choice ceil(C·S/E), top-K ceil(C·S·K/E); S = group size):"
    ]
    for key, moe in _moe_blocks(info).items():
        for train in (True, False):
            cap = moe.capacity(train)  # the one capacity formula (MoeConfig.capacity)
            c = moe.capacity_factor if train else moe.eval_capacity_factor
            out.append(
                f"  {key} ({moe.router}, {'train' if train else 'eval'}): C={c}, "
                f"S={moe.group_size}, E={moe.num_experts} -> {'dropless' if cap is None else cap}"
            )
        if moe.router == "top_k":
            bias = f", expert_bias (rate {moe.bias_update_rate:g})" if moe.expert_bias else ""
            out.append(
                f"  {key} routing: {moe.score_function} scores, {moe.ordering}, "
                f"renormalize={moe.renormalize}, {moe.load_balancing_type}{bias}"
            )
        if moe.num_shared_experts:
            width = moe.shared_expert_mlp_dim or moe.expert_mlp_dim or "the dense MLP's"
            gate = " behind a sigmoid gate" if moe.shared_expert_gate else ""
            out.append(
                f"  {key} shared experts: {moe.num_shared_experts} of width {width}, on every "
                f"token{gate}"
            )
    return out
