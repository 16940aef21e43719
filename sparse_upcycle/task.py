"""What is trained and how it is scored: the model a config describes (dense, or the MoE of
its ``upcycle`` recipe) and its loss over pure-dict parameters.

Loss = cross-entropy (T5X semantics, + ``loss.z_loss``) + ``aux_loss_weight`` · mean over MoE
layers of the load-balancing loss + ``router_z_loss_weight`` · mean of the router z-losses
(Fedus et al. 2022, Switch Transformers §2.2; Zoph et al. 2022, ST-MoE §3.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle import losses, models
from sparse_upcycle.config import ConfigError, check_names
from sparse_upcycle.model_blocks import model_configs
from sparse_upcycle.upcycle.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str
    config: Any  # the family's Config
    recipe: Any  # upcycle Recipe, or None for a dense model
    dense_config: Any


def recipe_from(config) -> Recipe:
    """The ``upcycle`` block of an experiment config as a ``Recipe`` (ConfigError if bad)."""
    block = dict(config.get("upcycle", {}))
    check_names(block, [f.name for f in dataclasses.fields(Recipe)], "upcycle")
    try:
        return Recipe(**block)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"upcycle recipe: {e}") from None


def resolve_models(config, source=None):
    """(family, dense config, MoE config, recipe) for an experiment config and its source
    checkpoint (whose ``config`` is the base when ``model.name == "checkpoint"``)."""
    recipe = recipe_from(config)
    base = source.config if source is not None else None
    method = recipe.method_impl
    family, dense, moe = model_configs(
        config.model,
        recipe.total_experts,
        base,
        method.granularity(recipe),
        method.shared_experts(recipe),
    )
    try:
        method.check_model(recipe, models.moe_blocks(moe))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return family, dense, moe, recipe


def resolve_model(config, source=None) -> ModelSpec:
    """The model to train: the MoE of the ``upcycle`` recipe when the config has one, else the
    model of ``config.model`` (dense, or an MoE checkpoint's own MoE: ``source_experts``)."""
    if "upcycle" in config:
        family, dense, moe, recipe = resolve_models(config, source)
        return ModelSpec(family, moe, recipe, dense)
    base = source.config if source is not None else None
    n = source_experts(config, base)
    family, dense, moe = model_configs(config.model, n, base)
    return ModelSpec(family, moe if n else dense, None, dense)


def source_experts(config, base) -> int:
    """The experts per MoE layer of the checkpoint a config without ``upcycle`` continues
    (``model.name = "checkpoint"`` with an MoE source, e.g. an HF Qwen2-MoE directory: the
    model keeps its MoE blocks); 0 for a dense source or a named model."""
    if base is None or config.model.get("name") != "checkpoint":
        return 0
    return max((b.num_experts for b in models.moe_blocks(base).values()), default=0)


def model_class(family: str):
    return models.get(family).Model


def _aux_weights(spec: ModelSpec) -> tuple[float, float]:
    blocks = list(models.moe_blocks(spec.config).values())
    if not blocks:
        return 0.0, 0.0
    weights = {(b.aux_loss_weight, b.router_z_loss_weight) for b in blocks}
    if len(weights) > 1:
        raise ConfigError(
            "the encoder and decoder MoE blocks must share aux_loss_weight and "
            "router_z_loss_weight (the loss averages the router losses over all MoE layers)"
        )
    return weights.pop()


def moe_layer_names(spec: ModelSpec) -> list[str]:
    """Names of the MoE layers, in the order of the model's ``expert_load`` rows."""
    return models.get(spec.family).moe_layer_names(spec.config)


SELECTION_BIAS = ("router", "selection_bias")  # moe.RouterWeights' auxiliary-loss-free bias


@dataclasses.dataclass(frozen=True)
class BiasUpdate:
    """One MoE layer's auxiliary-loss-free bias: where it is in the parameters, which row of
    ``metrics["router/expert_load"]`` is its layer's load, and the rate γ."""

    path: tuple[str, ...]
    row: int
    rate: float


def bias_updates(spec: ModelSpec, abstract_params) -> tuple[BiasUpdate, ...]:
    """The selection biases the train step moves (``routing.selection_bias_update``), one per
    MoE layer with ``moe.expert_bias``. The MoE blocks that keep one must share
    ``bias_update_rate``."""
    blocks = [b for b in models.moe_blocks(spec.config).values() if b.expert_bias]
    if not blocks:
        return ()
    rates = {b.bias_update_rate for b in blocks}
    if len(rates) > 1:
        raise ConfigError(
            f"the MoE blocks with expert_bias must share bias_update_rate; got {sorted(rates)}"
        )
    rate = rates.pop()
    leaves = [
        path
        for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
        if tuple(getattr(k, "key", k) for k in path[-2:]) == SELECTION_BIAS
    ]
    leaves = [tuple(str(getattr(k, "key", k)) for k in path) for path in leaves]
    out = []
    for row, name in enumerate(moe_layer_names(spec)):
        parts = tuple(name.split("/"))
        mine = [
            p
            for p in leaves
            if any(p[i : i + len(parts)] == parts for i in range(len(p) - len(parts) + 1))
        ]
        if len(mine) == 1:
            out.append(BiasUpdate(mine[0], row, float(rate)))
        elif len(mine) > 1:
            raise ValueError(f"MoE layer {name!r} matches several selection biases: {mine}")
    return tuple(out)


def make_features_fn(spec: ModelSpec, graphdef, abstract_state) -> Callable | None:
    """``features_fn(params, images) -> [B, D]`` (the family's ``features``: pre-logits), or
    None for a family without one."""
    features = getattr(models.get(spec.family), "features", None)
    if features is None:
        return None

    def features_fn(params, images):
        state = jax.tree.map(lambda x: x, abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return features(nnx.merge(graphdef, state), images)

    return features_fn


def make_loss_fn(spec: ModelSpec, graphdef, abstract_state, loss_cfg) -> Callable:
    """``loss_fn(params, batch, rng, train) -> (loss, metrics)`` over pure-dict params."""
    aux_w, router_z_w = _aux_weights(spec)
    forward = models.get(spec.family).forward

    def loss_fn(params, batch, rng, train: bool):
        state = jax.tree.map(lambda x: x, abstract_state)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
        logits, targets, weights, aux = forward(model, batch, train, rng)
        loss_sum, z_sum, weight_sum = losses.cross_entropy_loss(
            logits,
            targets,
            weights,
            z_loss=loss_cfg.get("z_loss", 0.0),
            label_smoothing=loss_cfg.get("label_smoothing", 0.0),
        )
        denom = jnp.maximum(weight_sum, 1.0)
        ce = loss_sum / denom
        correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
        metrics = {
            "cross_entropy": ce - z_sum / denom,
            "z_loss": z_sum / denom,
            "accuracy": correct / denom,
            "loss_sum": loss_sum - z_sum,
            "correct_sum": correct,
            "weight_sum": weight_sum,
        }
        loss = ce
        if aux:
            loss = loss + aux_w * aux["load_balancing_loss"] + router_z_w * aux["z_loss"]
            metrics.update({f"router/{k}": v for k, v in aux.items()})
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn
