"""Mesh, logical-axis rules and shardings: rules unit tests, optimizer-state shardings, and
sharded training-step parity with one device on (data, expert, model) = (8,1,1), (2,4,1),
(2,2,2) for dense and MoE models (the 8 fake CPU devices of conftest.py)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_upcycle import losses, opt_sharding, sharding
from sparse_upcycle.layers import logical_param
from sparse_upcycle.models import decoder, t5, vit

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
B, L = 8, 8  # batch 8 splits over any of the meshes; group_size=L gives G=8 routing groups


# --------------------------------------------------------------------------------------------
# Mesh construction.
# --------------------------------------------------------------------------------------------


def test_make_mesh_sizes_and_axis_types():
    def shape(mesh):
        return tuple(mesh.shape[a] for a in ("data", "expert", "model"))

    assert shape(sharding.make_mesh()) == (8, 1, 1)
    assert shape(sharding.make_mesh(expert=4)) == (2, 4, 1)
    assert shape(sharding.make_mesh(2, 2, 2)) == (2, 2, 2)
    assert shape(sharding.make_mesh(data=2, expert=-1)) == (2, 4, 1)
    assert shape(sharding.make_mesh(1, 1, -1)) == (1, 1, 8)
    assert shape(sharding.make_mesh(devices=jax.devices()[:2])) == (2, 1, 1)
    mesh = sharding.make_mesh(2, 4, 1)
    assert mesh.axis_names == ("data", "expert", "model")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "sizes, match",
    [
        ((3, 1, 1), "needs 3 devices"),
        ((2, 2, 1), "needs 4 devices"),
        ((-1, 3, 1), "do not divide the 8 devices"),
        ((-1, -1, 1), "only one mesh axis may be -1"),
        ((0, 8, 1), "positive integer or -1"),
        ((-2, 1, 1), "positive integer or -1"),
        ((8.0, 1, 1), "positive integer or -1"),
    ],
)
def test_make_mesh_refuses_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(*sizes)


# --------------------------------------------------------------------------------------------
# Rules.
# --------------------------------------------------------------------------------------------


def test_rules_table_targets_mesh_axes_and_the_issue_layout():
    for name, rule in sharding.LOGICAL_AXIS_RULES.items():
        targets = (rule,) if isinstance(rule, str) else tuple(rule or ())
        assert set(targets) <= set(sharding.MESH_AXES), name
    rules = sharding.LOGICAL_AXIS_RULES
    assert rules["batch"] == ("data", "expert")
    assert rules["expert"] == "expert"
    assert rules["mlp"] == rules["heads"] == rules["vocab"] == "model"


def _moe_models():
    """Abstract T5, decoder and ViT, each with MoE blocks (every logical name they use)."""
    cfg = t5.config("tiny")
    cfg = dataclasses.replace(
        cfg,
        encoder_moe=dataclasses.replace(cfg.encoder_moe, num_experts=4),
        decoder_moe=dataclasses.replace(cfg.decoder_moe, num_experts=4),
    )
    return {
        "t5": nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(0))),
        "decoder": nnx.eval_shape(
            lambda: decoder.Decoder(decoder.config("llama-moe-8x-top2-tiny"), rngs=nnx.Rngs(0))
        ),
        "vit": nnx.eval_shape(
            lambda: vit.ViT(vit.config("tiny", moe=dict(num_experts=4)), rngs=nnx.Rngs(0))
        ),
    }


def test_every_model_parameter_has_known_logical_axes():
    mesh = sharding.make_mesh(2, 2, 2)
    for name, model in _moe_models().items():
        axes = sharding.logical_axes(model)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # Same paths as the pure parameter dict (T5X / big_vision / HF-mirroring names).
        is_axes = lambda x: isinstance(x, tuple)
        assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(
            jax.tree.map(lambda _: (), params), is_leaf=is_axes
        ), name
        used = {a for leaf in jax.tree.leaves(axes, is_leaf=is_axes) for a in leaf if a}
        assert used <= set(sharding.LOGICAL_AXIS_RULES), (name, used)
        sharding.param_shardings(model, mesh)  # no name is refused
    t5_axes = sharding.logical_axes(_moe_models()["t5"])
    assert t5_axes["encoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"] == (
        "expert",
        "embed",
        "mlp",
    )
    assert t5_axes["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"] == ("embed", "mlp")
    assert t5_axes["token_embedder"]["embedding"] == ("vocab", "embed")


def test_logical_to_spec_maps_through_the_table():
    mesh = sharding.make_mesh(2, 2, 2)
    spec = sharding.logical_to_spec(("expert", "embed", "mlp"), (4, 32, 64), mesh)
    assert spec == P("expert", None, "model")
    assert sharding.logical_to_spec(("batch", "length"), (8, 8), mesh) == P(
        ("data", "expert"), None
    )
    assert sharding.logical_to_spec((None, "vocab")) == P(None, "model")  # no mesh: no checks


def test_unknown_logical_name_raises():
    with pytest.raises(ValueError, match="'bogus'.*not in sharding.LOGICAL_AXIS_RULES"):
        sharding.logical_to_spec(("embed", "bogus"))

    class Odd(nnx.Module):
        def __init__(self):
            init = nnx.initializers.zeros
            self.w = logical_param(init, jax.random.key(0), (4, 4), ("embed", "bogus"))

    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="parameter w: .*'bogus'"):
        sharding.param_shardings(Odd(), mesh)

    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(3))

    with pytest.raises(ValueError, match="parameter w has no logical axes"):
        sharding.param_shardings(Bare(), mesh)


def test_non_divisible_dim_is_replicated():
    mesh = sharding.make_mesh(2, 2, 2)
    assert sharding.logical_to_spec(("vocab", "embed"), (6, 4), mesh) == P("model", None)
    assert sharding.logical_to_spec(("vocab", "embed"), (5, 4), mesh) == P(None, None)
    # batch needs data·expert = 4 rows per shard step; 6 rows are replicated, not a crash
    assert sharding.logical_to_spec(("batch", None), (6, 3), mesh) == P(None, None)
    assert sharding.logical_to_spec(("expert", "mlp"), (3, 64), mesh) == P(None, "model")


def test_duplicate_mesh_axis_is_dropped_from_the_later_dim():
    mesh = sharding.make_mesh(2, 4, 1)
    # batch takes (data, expert); the later expert dim has nothing left: replicated
    assert sharding.logical_to_spec(("batch", "expert"), (8, 4), mesh) == P(
        ("data", "expert"), None
    )
    # expert first: the later batch dim keeps only data
    assert sharding.logical_to_spec(("expert", "batch"), (4, 8), mesh) == P("expert", "data")
    assert sharding.logical_to_spec(("mlp", "vocab"), (8, 8), mesh) == P("model", None)
    assert sharding.logical_to_spec(("batch_no_expert", "expert"), (8, 4), mesh) == P(
        "data", "expert"
    )


def test_mesh_axes_missing_from_the_mesh_are_dropped():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert sharding.logical_to_spec(("batch", "mlp"), (8, 64), mesh) == P("data", None)


def test_batch_sharding():
    mesh = sharding.make_mesh(2, 4, 1)
    s = sharding.batch_sharding(mesh, 3)
    assert s.spec == P(("data", "expert"), None, None) and s.mesh == mesh
    with pytest.raises(ValueError):
        sharding.batch_sharding(mesh, 0)


def test_constrain_is_the_identity_without_a_mesh_and_constrains_with_one():
    x = jnp.ones((8, 4))
    assert sharding.constrain(x, ("batch", None)) is x
    mesh = sharding.make_mesh(2, 4, 1)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", None)))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "expert"), None)), 2)


def test_param_shardings_state_and_pure_dict_agree_and_shard_tree_places_values():
    model = _moe_models()["t5"]
    mesh = sharding.make_mesh(2, 2, 2)
    from_state = nnx.to_pure_dict(sharding.param_shardings(nnx.state(model, nnx.Param), mesh))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    from_dict = sharding.param_shardings(params, mesh, axes=sharding.logical_axes(model))
    assert jax.tree.map(lambda s: s.spec, from_state) == jax.tree.map(lambda s: s.spec, from_dict)
    expert = from_dict["decoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"]
    assert expert.spec == P("expert", "model", None)
    with pytest.raises(ValueError, match="axes do not match params"):
        sharding.param_shardings(params, mesh, axes={"token_embedder": {"embedding": ("vocab",)}})

    host = jax.tree.map(
        lambda s: np.arange(np.prod(s.shape), dtype=np.float32).reshape(s.shape), params
    )
    placed = sharding.shard_tree(host, from_dict)
    leaf = placed["token_embedder"]["embedding"]
    assert leaf.sharding.spec == P("model", None)
    np.testing.assert_array_equal(np.asarray(leaf), host["token_embedder"]["embedding"])


# --------------------------------------------------------------------------------------------
# Optimizer state.
# --------------------------------------------------------------------------------------------


def _at(tree, *keys):
    for k in keys:
        tree = tree[k]
    return tree


def _spec_at(tree, *keys):
    return _at(tree, *keys).spec


@pytest.mark.parametrize("opt_name", ["adamw", "adafactor"])
def test_opt_state_shardings_follow_the_params(opt_name):
    cfg = t5.config("tiny", num_encoder_layers=1, num_decoder_layers=1)
    cfg = dataclasses.replace(
        cfg, encoder_moe=dataclasses.replace(cfg.encoder_moe, num_experts=4, layers=(0,))
    )
    graphdef, params = nnx.split(t5.T5(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    mesh = sharding.make_mesh(2, 2, 2)
    p_sh = sharding.param_shardings(params, mesh)
    # min_dim_size_to_factor=8: the tiny model's matrices are factored (default 128 is not).
    opt = (
        optax.adamw(1e-2)
        if opt_name == "adamw"
        else optax.adafactor(1e-2, min_dim_size_to_factor=8)
    )
    abstract = jax.eval_shape(opt.init, params)
    o_sh = opt_sharding.opt_state_shardings(abstract, p_sh, mesh, params_abstract=params)
    expert = ("encoder", "layers_0", "mlp", "expert", "wi_0", "kernel")  # [4, 32, 64]
    assert _spec_at(nnx.to_pure_dict(p_sh), *expert) == P("expert", None, "model")
    state = o_sh[0]
    assert state.count.spec == P()
    if opt_name == "adamw":
        for moment in (state.mu, state.nu):
            specs = jax.tree.map(lambda s: s.spec, nnx.to_pure_dict(moment))
            assert specs == jax.tree.map(lambda s: s.spec, nnx.to_pure_dict(p_sh))
    else:
        # optax factors the two largest dims (32, 64): v_row drops one, v_col the other.
        rows = nnx.to_pure_dict(state.v_row)
        cols = nnx.to_pure_dict(state.v_col)
        shapes = nnx.to_pure_dict(abstract[0].v_row)
        assert _at(shapes, *expert).shape == (4, 32)
        assert _spec_at(rows, *expert) == P("expert", None)
        assert _spec_at(cols, *expert) == P("expert", "model")
        # embedding [128, 32]: v_row drops the vocab dim, v_col keeps it (split over model)
        assert _spec_at(rows, "token_embedder", "embedding") == P(None)
        assert _spec_at(cols, "token_embedder", "embedding") == P("model")
        v = nnx.to_pure_dict(state.v)  # unfactored: (1,) placeholders, vectors as the param
        assert _spec_at(v, *expert) == P()
    # Without params_abstract: Adam moments still get the param sharding (same rank).
    no_shapes = opt_sharding.opt_state_shardings(abstract, p_sh, mesh)
    if opt_name == "adamw":
        assert _spec_at(nnx.to_pure_dict(no_shapes[0].mu), *expert) == P("expert", None, "model")

    # The shardings are usable: a sharded update equals the unsharded one.
    grads = jax.tree.map(lambda p: jnp.cos(p), params)

    def update(grads, opt_state, params):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    ref = jax.jit(update)(grads, opt.init(params), params)
    with jax.set_mesh(mesh):
        sharded_update = jax.jit(
            update, in_shardings=(p_sh, o_sh, p_sh), out_shardings=(p_sh, o_sh)
        )
        opt_state = sharding.shard_tree(opt.init(params), o_sh)
        out = sharded_update(
            sharding.shard_tree(grads, p_sh), opt_state, sharding.shard_tree(params, p_sh)
        )
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Sharded training step == one device.
# --------------------------------------------------------------------------------------------


def _t5_moe():
    cfg = t5.config("tiny", num_encoder_layers=1, num_decoder_layers=1)
    moe = dict(num_experts=4, layers=(0,), group_size=L)
    # Encoder: expert choice (capacity 2); decoder: top-2 with capacity (slot dispatch).
    return dataclasses.replace(
        cfg,
        encoder_moe=dataclasses.replace(cfg.encoder_moe, **moe),
        decoder_moe=dataclasses.replace(cfg.decoder_moe, **moe),
    )


# name -> (model, MoE expert kernel path or None)
MODELS = {
    "decoder_dense": lambda: decoder.Decoder(
        decoder.config("tiny", num_hidden_layers=2), rngs=nnx.Rngs(0)
    ),
    "t5_moe": lambda: t5.T5(_t5_moe(), rngs=nnx.Rngs(0)),
    # Mixtral-style dropless top-2 over 8 experts: the sorted (ragged) path under sharding.
    "decoder_moe_dropless": lambda: decoder.Decoder(
        decoder.config("llama-moe-8x-top2-tiny", moe=dict(group_size=L)), rngs=nnx.Rngs(0)
    ),
}
EXPERT_KERNEL = {
    "t5_moe": ("encoder", "layers_0", "mlp", "expert", "wi_0", "kernel"),
    "decoder_moe_dropless": ("layers_1", "mlp", "expert", "wi_0", "kernel"),
}


def _batch(name):
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 128, (B, L)).astype(np.int32)
    targets[1, 5:] = 0  # some padding: masks must shard along with the tokens
    targets[6, 3:] = 0
    if name.startswith("t5"):
        enc = rng.integers(2, 128, (B, L)).astype(np.int32)
        enc[2, 6:] = 0
        inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))  # shift right, start token 0
        return enc, inputs, targets
    inputs = rng.integers(2, 128, (B, L)).astype(np.int32)
    return inputs, targets


def _loss_fn(graphdef, name):
    def loss_fn(params, *batch):
        model = nnx.merge(graphdef, params)
        targets = batch[-1]
        weights = targets > 0
        if name.startswith("t5"):
            enc, dec, _ = batch
            logits, aux = model(enc, dec, decoder_mask=weights, train=True)
        else:
            logits, aux = model(batch[0], token_mask=weights, train=True)
        total, _, denom = losses.cross_entropy_loss(logits, targets, weights, z_loss=1e-4)
        loss = total / denom
        if aux:  # the MoE auxiliary losses, with the MoeConfig default weights
            loss = loss + 0.01 * aux["load_balancing_loss"] + 0.001 * aux["z_loss"]
        return loss

    return loss_fn


@functools.cache
def _setup(name):
    graphdef, params = nnx.split(MODELS[name](), nnx.Param)
    batch = _batch(name)
    value_and_grad = jax.value_and_grad(_loss_fn(graphdef, name))
    reference = jax.jit(value_and_grad)(params, *batch)  # one device, no mesh
    return params, batch, value_and_grad, reference


def _assert_close(got, want, what):
    """Relative to the largest |value| of the leaf (1e-5, fp32)."""
    got, want = np.asarray(got), np.asarray(want)
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max())
    assert err <= 1e-5 * scale, (what, err, scale)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(MODELS))
def test_sharded_loss_and_grads_match_one_device(name, mesh_shape):
    params, batch, value_and_grad, (ref_loss, ref_grads) = _setup(name)
    mesh = sharding.make_mesh(*mesh_shape)
    p_sh = sharding.param_shardings(params, mesh)
    b_sh = sharding.batch_sharding(mesh, 2)
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):  # activates the MoE layers' sharding constraints
        step = jax.jit(
            value_and_grad,
            in_shardings=(p_sh, *[b_sh] * len(batch)),
            out_shardings=(replicated, p_sh),
        )
        sharded_params = sharding.shard_tree(params, p_sh)
        sharded_batch = [sharding.shard_tree(x, b_sh) for x in batch]
        compiled = step.lower(sharded_params, *sharded_batch).compile()
        loss, grads = compiled(sharded_params, *sharded_batch)

    _assert_close(loss, ref_loss, "loss")
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        _assert_close(g, flat_ref[path], jax.tree_util.keystr(path))
        assert float(np.abs(np.asarray(flat_ref[path])).max()) > 0, path  # all leaves count

    # Not trivially replicated: the inputs and the gradients really are split.
    assert sharded_batch[0].sharding.spec == P(("data", "expert"), None)
    embedding = sharded_params["token_embedder"]["embedding"][...]
    if mesh_shape[2] > 1:
        assert embedding.sharding.spec == P("model", None)
        assert grads["token_embedder"]["embedding"][...].sharding.spec == P("model", None)
    if name in EXPERT_KERNEL:
        kernel = sharded_params
        for key in EXPERT_KERNEL[name]:
            kernel = kernel[key]
        spec = kernel[...].sharding.spec
        if mesh_shape[1] > 1:
            assert spec[0] == "expert"
        if name == "t5_moe" and mesh_shape[1] > 1:
            # Slot dispatch under expert parallelism: tokens travel to their experts' devices
            # by all-to-all (the [G, E, C, d] constraint in moe.py), not by gathering all.
            assert "all-to-all" in compiled.as_text()
        if mesh_shape[2] > 1:
            assert spec[2] == "model"
