"""What a training run trains and how, before any array exists: the model of a config (dense,
or the MoE of its ``upcycle`` recipe), its loss, the optimizer and the shardings of the train
state on a mesh (``build_training``), and the pure train step (``make_train_step``).
``train.py`` runs them; ``scripts/bench_loop.py`` times the step alone.

``model.param_dtype`` (``float32`` default | ``bfloat16``) is the dtype the state holds the
parameters in: ``abstract_params`` carry it (so ``plan`` sizes them, and a resume restores
them, in it), and initial parameters (random or from ``init_from``) are cast to it, except
the auxiliary-loss-free selection biases (``moe.expert_bias``), which stay float32. The
models build float32 parameters and cast weights to the activation dtype where they use them;
the optimizer computes in float32 (``optim_dtype``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_upcycle import opt_sharding, optim, routing, sharding
from sparse_upcycle.config import ConfigError
from sparse_upcycle.model_blocks import param_dtype
from sparse_upcycle.optim_dtype import cast_floating
from sparse_upcycle.task import (
    BiasUpdate,
    ModelSpec,
    bias_updates,
    make_features_fn,
    make_loss_fn,
    model_class,
    resolve_model,
)


@dataclasses.dataclass(frozen=True)
class Training:
    """What a run trains and how, without any arrays: the model, its loss, the optimizer, and
    the shardings of the train state ``{"params", "opt_state", "step"}`` on ``mesh``."""

    mesh: Mesh
    spec: ModelSpec
    abstract_params: dict
    abstract_opt: Any
    param_sh: dict
    state_sh: dict
    replicated: NamedSharding
    loss_fn: Callable
    tx: optax.GradientTransformation
    schedule: Callable
    bias_updates: tuple[BiasUpdate, ...] = ()
    features_fn: Callable | None = None  # (params, images) -> pre-logits; image families

    def init_state(self, seed: int) -> dict:
        """A random train state (the model's own initialisers), placed with ``state_sh``."""
        cls = model_class(self.spec.family)

        def init():
            model = cls(self.spec.config, rngs=nnx.Rngs(seed))
            params = cast_like(nnx.to_pure_dict(nnx.state(model, nnx.Param)), self.abstract_params)
            return {"params": params, "opt_state": self.tx.init(params), "step": jnp.int32(0)}

        return jax.jit(init, out_shardings=self.state_sh)()


def build_training(config: ml_collections.ConfigDict, source, mesh: Mesh) -> Training:
    """The model of ``config`` (dense, or the MoE of its recipe), its loss and optimizer, with
    the schedule offset by the dense step count when the recipe keeps it (``step=keep``)."""
    spec = resolve_model(config, source)
    cls = model_class(spec.family)
    abstract_model = nnx.eval_shape(lambda: cls(spec.config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
    # the state's dtype; loss_fn's abstract_state only gives the structure to fill
    abstract_params = cast_floating(nnx.to_pure_dict(abstract_state), param_dtype(config.model))
    biases = bias_updates(spec, abstract_params)
    for b in biases:  # γ = 1e-3 steps vanish in bfloat16 once |b| > 1/4: kept in float32
        leaf = _leaf(abstract_params, b.path)
        abstract_params = _with_leaf(
            abstract_params, b.path, jax.ShapeDtypeStruct(leaf.shape, jnp.float32)
        )
    axes = sharding.logical_axes(abstract_model)
    param_sh = sharding.param_shardings(abstract_params, mesh, axes)
    loss_fn = make_loss_fn(spec, graphdef, abstract_state, config.get("loss", {}))
    init_step = 0  # the dense step count, when the recipe keeps it (step=keep)
    if source is not None and source.is_upcycled and source.step:
        init_step = int(source.step)  # written by `upcycle` with step=keep
    elif source is not None and spec.recipe is not None and spec.recipe.step == "keep":
        init_step = int(source.step or 0)  # online upcycling with step=keep
    opt_cfg = ml_collections.ConfigDict(config.optimizer.to_dict())
    if init_step:
        opt_cfg.step_offset = opt_cfg.get("step_offset", 0) + init_step
    try:
        tx, schedule = optim.make_optimizer(opt_cfg)
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from None
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = opt_sharding.opt_state_shardings(abstract_opt, param_sh, mesh, abstract_params)
    replicated = NamedSharding(mesh, P())
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
    return Training(
        mesh,
        spec,
        abstract_params,
        abstract_opt,
        param_sh,
        state_sh,
        replicated,
        loss_fn,
        tx,
        schedule,
        biases,
        make_features_fn(spec, graphdef, abstract_state),
    )


def cast_like(params: dict, abstract: dict) -> dict:
    """``params`` in the dtypes of ``abstract`` (the state's ``abstract_params``)."""
    return jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract)


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse, before Orbax's restore does with its own advice, a resume whose config builds
    another model than the latest checkpoint in ``workdir`` holds: a changed number of experts
    (``upcycle.num_experts``), or any parameter of another shape or name. Nothing to check
    without a checkpoint, or when the model needs its initial checkpoint to be built."""
    import os
    import re

    from sparse_upcycle import models
    from sparse_upcycle.checkpoints.errors import CheckpointError
    from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint

    root = os.path.join(workdir, "checkpoints")
    steps = (
        [int(n) for n in os.listdir(root) if re.fullmatch(r"\d+", n)] if os.path.isdir(root) else []
    )
    if not steps:
        return
    where = os.path.join(root, str(max(steps)))
    try:
        stored = OrbaxCheckpoint(os.path.join(where, "state"))
        shapes = {k: stored.shape(k) for k in stored.keys()}
        spec = resolve_model(config, None)
        target = models.target_shapes(spec.family, spec.config)
    except (CheckpointError, ConfigError, ValueError, TypeError, KeyError):
        return  # the run itself reports these (or the model needs init_from to be built)

    def experts(table) -> int:
        counts = {s[0] for k, s in table.items() if f"/{optim.EXPERT_KEY}/" in f"/{k}/"}
        return max(counts, default=0)

    have, want = experts(shapes), experts({k: v[0] for k, v in target.items()})
    if have != want:
        setting = "upcycle.num_experts" if "upcycle" in config else "the config's upcycle block"
        raise ConfigError(
            f"{where} holds {have} experts per MoE layer, the config gives {want} "
            f"({setting}); resume with the settings it was trained with, or use a new --workdir"
        )
    for key in sorted(set(target) | set(shapes)):
        if key not in shapes or key not in target or shapes[key] != target[key][0]:
            got = shapes.get(key, "nothing")
            expected = target[key][0] if key in target else "nothing"
            raise ConfigError(
                f"{where} holds {got} for {key}, the config's model has {expected}; resume "
                "with the config it was trained with, or use a new --workdir"
            )


def make_train_step(
    loss_fn, tx: optax.GradientTransformation, schedule, bias_updates: tuple[BiasUpdate, ...] = ()
):
    """``step(state, batch, seed) -> (state, metrics)``: one optimizer update of ``state``
    (``{"params", "opt_state", "step"}``), its randomness ``fold_in(key(seed), step)``. The seed
    (an int32 scalar) is an argument, not a constant of the program, so runs that differ only
    in their seed compile to the same program (and share the persistent compilation cache).

    Gradients are taken w.r.t. the stored parameters (bfloat16 ones under
    ``model.param_dtype=bfloat16``); ``tx`` (``optim.make_optimizer``) computes the update in
    float32 and ``optax.apply_updates`` adds it in float32, rounding the sum to the parameter
    dtype once.

    ``bias_updates`` (``Training.bias_updates``): the auxiliary-loss-free selection biases. Each
    is set to ``routing.selection_bias_update`` of its value before the step, with the step's
    expert load; the optimizer's update of it (zero: no gradient reaches it) is discarded."""

    def train_step(state, batch, seed):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state["params"], batch, rng, True)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        for b in bias_updates:
            old = _leaf(state["params"], b.path)
            load = metrics["router/expert_load"][b.row]
            params = _with_leaf(params, b.path, routing.selection_bias_update(old, load, b.rate))
        metrics["grad_norm"] = optax.tree.norm(cast_floating(grads, jnp.float32))
        metrics["learning_rate"] = schedule(state["step"])
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new, metrics

    return train_step


EVAL_SUMS = ("loss_sum", "correct_sum", "weight_sum")


def make_eval_step(loss_fn):
    """``step(params, batch) -> {loss_sum, correct_sum, weight_sum}`` (no dropout, no rng)."""

    def eval_step(params, batch):
        _, metrics = loss_fn(params, batch, None, False)
        return {k: metrics[k] for k in EVAL_SUMS}

    return eval_step


def mean_scores(outs: list[dict]) -> tuple[float, float]:
    """(loss, accuracy) per weighted target over the eval steps' outputs, fetched at once."""
    fetched = jax.device_get(outs)
    sums = {k: sum(float(o[k]) for o in fetched) for k in EVAL_SUMS}
    w = max(sums["weight_sum"], 1.0)
    return sums["loss_sum"] / w, sums["correct_sum"] / w


def _leaf(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _with_leaf(tree: Any, path: tuple[str, ...], value) -> dict:
    """A copy of the nested dict ``tree`` with the leaf at ``path`` replaced (others shared)."""
    head, *rest = path
    return {**tree, head: _with_leaf(tree[head], tuple(rest), value) if rest else value}
