"""Surgery rules end to end on a real model: dense ViT params -> MoE ViT params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle.checkpoints.tree import flatten, unflatten
from sparse_upcycle.models import vit
from sparse_upcycle.upcycle.recipe import Recipe
from sparse_upcycle.upcycle.rules import plan, upcycle_tree

E = 4


def _model(config, flat=None):
    model = vit.ViT(config, rngs=nnx.Rngs(1))
    if flat is not None:
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, unflatten(flat)))
        nnx.update(model, state)
    return model


def _target(config):
    return {p: (s.shape, s.dtype) for p, s in flatten(vit.abstract_params(config)).items()}


def _configs():
    dense = vit.config("tiny", depth=4, head_zeroinit=False)
    # Expert choice with capacity = S and normalized weights: every token reaches every
    # expert with weights summing to one, so copies of the dense MLP preserve the function.
    moe = vit.config(
        "tiny",
        depth=4,
        head_zeroinit=False,
        moe=dict(
            num_experts=E,
            capacity_factor=float(E),
            eval_capacity_factor=float(E),
            router_init_std=1.0,
        ),
    )
    return dense, moe


def test_copy_upcycled_vit_computes_the_dense_function():
    dense_cfg, moe_cfg = _configs()
    dense_model = _model(dense_cfg)
    dense = flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(dense_model, nnx.Param))))
    recipe = Recipe(method="copy", num_experts=E, router_init_std=1.0, seed=3)
    moe_flat = dict(upcycle_tree(dense, dense.__getitem__, _target(moe_cfg), recipe))
    assert moe_flat["Transformer/encoderblock_1/MlpBlock_0/expert/Dense_0/kernel"].shape[0] == E
    np.testing.assert_array_equal(
        moe_flat["Transformer/encoderblock_1/MlpBlock_0/expert/Dense_0/bias"][2],
        dense["Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias"],
    )
    images = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    want, _ = dense_model(images)
    got, aux = _model(moe_cfg, moe_flat)(images)
    assert float(aux["entropy"]) > 0.1  # the fresh router is not uniform
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Deterministic given the recipe; the seed matters.
    again = dict(upcycle_tree(dense, dense.__getitem__, _target(moe_cfg), recipe))
    other = dict(
        upcycle_tree(
            dense, dense.__getitem__, _target(moe_cfg), Recipe(method="copy", num_experts=E, seed=4)
        )
    )
    key = "Transformer/encoderblock_1/MlpBlock_0/router/w/kernel"
    np.testing.assert_array_equal(again[key], moe_flat[key])
    assert not np.allclose(other[key], moe_flat[key])


def test_plan_refuses_mismatched_configs_before_reading():
    dense_cfg, moe_cfg = _configs()
    dense = flatten(vit.abstract_params(dense_cfg))
    deeper = flatten(vit.abstract_params(vit.config("tiny", depth=5)))
    with pytest.raises(ValueError, match="has no 'Transformer/encoderblock_4"):
        plan(dense, flatten(vit.abstract_params(vit.config("tiny", depth=5))))
    with pytest.raises(ValueError, match="no place for"):
        plan(deeper, _target(moe_cfg))
    steps = plan(dense, _target(moe_cfg))
    assert {rule for _, rule, _ in steps} == {"copy", "router", "expert"}


def test_shape_mismatch_is_reported():
    dense_cfg, moe_cfg = _configs()
    wide = vit.config("tiny", depth=4, mlp_dim=96)
    dense = flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(_model(wide), nnx.Param))))
    with pytest.raises(ValueError, match="model config expects"):
        dict(upcycle_tree(dense, dense.__getitem__, _target(moe_cfg), Recipe(num_experts=E)))
