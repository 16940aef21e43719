"""``model.remat``: every policy gives the loss and gradients of no remat, keeps the parameter
tree, is refused when misspelt, and shrinks the temporaries ``plan`` finds.

The reference is the same model without ``jax.checkpoint`` (``remat="none"``). Dropout and
router jitter are on, in training mode, so a rematerialised block that drew other keys than
the forward pass (or than ``none``) would change the gradients far beyond the tolerance."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle import models, plan
from sparse_upcycle.config import ConfigError, load_config
from sparse_upcycle.models import remat
from sparse_upcycle.task import make_loss_fn, resolve_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "upcycle_tiny.py")
# fp32: recomputation may fuse differently from the forward pass (rounding only).
TOL = 1e-6

# Dropout in the dense blocks (the decoder has none) and router jitter in the MoE ones.
NOISE = {
    "t5": [
        "--config.model.overrides.dropout_rate=0.1",
        "--config.model.encoder_moe.jitter_eps=0.1",
        "--config.model.decoder_moe.jitter_eps=0.1",
    ],
    "vit": ["--config.model.overrides.dropout=0.1", "--config.model.moe.jitter_eps=0.1"],
    "decoder": ["--config.model.moe.jitter_eps=0.1"],
}


def _batch(family: str, cfg) -> dict:
    rng = np.random.default_rng(0)
    if family == "vit":
        h, w = cfg.image_size
        return {
            "image": rng.normal(size=(4, h, w, cfg.num_channels)).astype(np.float32),
            "label": rng.integers(0, cfg.num_classes, 4),
        }
    if family == "t5":
        return {
            "encoder_input_tokens": rng.integers(1, cfg.vocab_size, (2, 16)),
            "decoder_input_tokens": rng.integers(1, cfg.vocab_size, (2, 8)),
            "decoder_target_tokens": rng.integers(1, cfg.vocab_size, (2, 8)),
            "decoder_loss_weights": np.ones((2, 8), np.float32),
        }
    tokens = rng.integers(1, cfg.vocab_size, (2, 17))
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((2, 16))}


def _spec(family: str, policy: str, kind: str):
    config = load_config(f"{TINY}:{family}", [*NOISE[family], f"--config.model.remat={policy}"])
    spec = resolve_model(config)
    if kind == "dense":
        spec = dataclasses.replace(spec, config=spec.dense_config, recipe=None)
    return spec, config


def _loss_and_grads(family: str, policy: str, kind: str):
    spec, config = _spec(family, policy, kind)
    assert spec.config.remat == policy
    model = models.get(family).Model(spec.config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    loss_fn = make_loss_fn(spec, graphdef, state, config.get("loss", {}))
    params = nnx.to_pure_dict(state)
    batch = jax.tree.map(jnp.asarray, _batch(family, spec.config))
    grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.key(7), True)[0]))
    loss, grads = grad_fn(params)
    return float(loss), jax.tree.map(np.asarray, grads), graphdef, params


@pytest.fixture(scope="module")
def results():
    cache = {}

    def get(family, kind, policy):
        if (family, kind, policy) not in cache:
            cache[family, kind, policy] = _loss_and_grads(family, policy, kind)
        return cache[family, kind, policy]

    return get


def _check_same(family: str, kind: str, policy: str, results) -> None:
    loss0, grads0, _, params0 = results(family, kind, "none")
    loss, grads, _, params = results(family, kind, policy)
    assert np.isfinite(loss0)
    # The parameter tree (paths, shapes) does not depend on the policy.
    assert jax.tree.structure(params) == jax.tree.structure(params0)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, params0)
    assert abs(loss - loss0) <= TOL * max(1.0, abs(loss0)), (policy, loss, loss0)
    flat0 = dict(jax.tree_util.tree_leaves_with_path(grads0))
    # Each leaf: the L2 norm of the difference relative to the leaf's norm (the largest
    # entry's relative error reaches 1.02e-6: recomputation fuses and rounds differently),
    # floored at 1e-3 of the largest leaf norm of the model: some leaves are zero in exact
    # arithmetic (attention key biases: softmax is shift-invariant) and hold ~1e-13 of noise.
    floor = 1e-3 * max(float(np.linalg.norm(g)) for g in flat0.values())
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = flat0[path]
        scale = max(float(np.linalg.norm(ref)), floor)
        err = float(np.linalg.norm(g - ref))
        assert err <= TOL * scale, (policy, jax.tree_util.keystr(path), err, scale)


# The MoE configs of upcycle_tiny.py have a dense block 0 and an MoE block 1 in every stack, so
# each run covers both kinds of block; "dense" is the same config without experts.
@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("family", ["t5", "vit", "decoder"])
def test_full_remat_same_loss_and_gradients(results, family, kind):
    _check_same(family, kind, "full", results)


@pytest.mark.slow  # 12 more compilations of the tiny models' train gradients
@pytest.mark.parametrize("policy", ["dots_saveable", "minimal"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("family", ["t5", "vit", "decoder"])
def test_policies_same_loss_and_gradients(results, family, kind, policy):
    _check_same(family, kind, policy, results)


def test_moe_gradients_reach_the_router(results):
    """The MoE runs route (router weights get gradients) under remat, with jitter on."""
    _, grads, _, _ = results("vit", "moe", "full")
    router = grads["Transformer"]["encoderblock_1"]["MlpBlock_0"]["router"]["w"]["kernel"]
    assert np.abs(router).max() > 0


def test_blocks_are_checkpointed():
    """One ``checkpoint`` (remat) per block in the jaxpr of the gradient, none for "none"."""
    for policy, expected in (("none", 0), ("full", 2)):
        spec, _ = _spec("vit", policy, "moe")
        model = models.get("vit").Model(spec.config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            model = nnx.merge(graphdef, state)
            return jnp.sum(model(jnp.zeros((2, 28, 28, 1)), train=True, rng=jax.random.key(0))[0])

        jaxpr = jax.make_jaxpr(jax.grad(loss))(state)
        names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
        assert sum(n in ("remat2", "checkpoint") for n in names) == expected, names


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.remat=fulll", "model.remat must be one of none, full, dots_saveable"),
        ("--config.model.overrides.remat=full", "model.overrides.remat: set model.remat instead"),
    ],
)
def test_bad_value_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as e:
        resolve_model(load_config(f"{TINY}:vit", [override]))
    assert "\n" not in str(e.value)


def test_config_checks_the_policy():
    for family in ("t5", "vit", "decoder"):
        with pytest.raises(ValueError, match="model.remat must be one of"):
            models.get(family).config("tiny", remat="everything")
    assert remat.REMAT == ("none", "full", "dots_saveable", "minimal")
    # remat changes memory, not the function: config equality ignores it.
    assert models.vit.config("tiny", remat="full") == models.vit.config("tiny")


def test_plan_temporaries_shrink():
    """A 12-block ViT of tiny width: full remat needs at most half the temporaries of none
    (plan compiles the real train step, keeping the barriers XLA:CPU would drop). One device:
    the per-device batch is the whole batch of 32 images, and the compile is the cheapest."""
    spec = os.path.join(ROOT, "configs", "vit_b16_dense_continue.py") + ":tiny"
    temps = {}
    for policy in ("none", "full"):
        config = load_config(
            spec, ["--config.model.overrides.depth=12", f"--config.model.remat={policy}"]
        )
        temps[policy] = plan.plan(config, 1, 2**34, name=spec)["per_device"]["temporaries"]
    assert 0 < temps["full"] <= 0.5 * temps["none"], temps
