"""MoE layer: index dispatch vs the one-hot reference, function preservation, dtypes, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_upcycle import moe, routing

D, F, E = 16, 24, 4

ROUTERS = {
    "expert_choice": routing.ExpertChoiceRouter(E, capacity_factor=1.0),
    "expert_choice_norm": routing.ExpertChoiceRouter(E, 2.0, normalize_combine_weights=True),
    "top2_capacity": routing.TopKRouter(E, k=2, capacity_factor=0.75),
    "top1_bpr": routing.TopKRouter(E, k=1, capacity_factor=1.0, batch_prioritized=True),
    "top2_dropless": routing.TopKRouter(E, k=2, capacity_factor=None, ordering="topk_then_softmax"),
    "top2_dropless_ragged": routing.TopKRouter(E, k=2, capacity_factor=None),
}


@pytest.mark.parametrize("block", [1, 3, 64])
def test_blocked_grouped_matmul_matches_ragged_dot(block):
    """The CPU block-sparse path computes what ragged_dot computes, values and gradients,
    including empty experts and rows past the total (padding assignments)."""
    experts = moe.ExpertMlp(E, D, F, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(experts)
    x = jax.random.normal(jax.random.key(0), (20, D))
    sizes = jnp.array([7, 0, 9, 2], jnp.int32)  # 18 rows routed, 2 past the total

    def run(impl):
        def loss(state, x):
            y = nnx.merge(graphdef, state).grouped(x, sizes, impl, block)
            return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)

    (_, y_ref), g_ref = run("ragged_dot")
    (_, y_blk), g_blk = run("blocked")
    assert float(jnp.abs(y_ref[18:]).max()) == 0.0 and float(jnp.abs(y_ref[:18]).min()) >= 0
    np.testing.assert_allclose(y_blk, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_blk), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _layer(
    router,
    dispatch="index",
    activations=("gelu", "linear"),
    group_size=8,
    router_init_std=1.0,
    **kw,
):
    # router_init_std=1: confident, uneven routing so that capacity overflow really happens.
    return moe.MoeMlp(
        D,
        F,
        router,
        activations=activations,
        group_size=group_size,
        router_init_std=router_init_std,
        dispatch=dispatch,
        rngs=nnx.Rngs(0),
        **kw,
    )


def _loss_and_grads(layer, x, mask=None):
    graphdef, state = nnx.split(layer)
    cot = jax.random.normal(jax.random.key(7), x.shape)

    def loss(state, x):
        y, metrics = nnx.merge(graphdef, state)(x, mask)
        return jnp.sum(y * cot) + metrics.load_balancing_loss + metrics.z_loss

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)


@pytest.mark.parametrize("activations", [("gelu", "linear"), ("relu",)])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_index_dispatch_matches_onehot_reference(name, activations):
    router = ROUTERS[name]
    x = jax.random.normal(jax.random.key(1), (3, 8, D))
    mask = jnp.ones((3, 8), bool).at[1, 5:].set(False)
    l_ref, (g_ref, gx_ref) = _loss_and_grads(_layer(router, "onehot", activations), x, mask)
    impls = ("ragged_dot", "blocked") if router.capacity(8) is None else ("auto",)
    for impl in impls:
        fast = _layer(router, "index", activations, grouped_matmul=impl)
        loss, (grads, gx) = _loss_and_grads(fast, x, mask)
        np.testing.assert_allclose(loss, l_ref, rtol=1e-5)
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Not vacuous: capacity routers dropped something and gradients reach the router.
    y, metrics = fast(x, mask)
    if name in ("expert_choice", "top2_capacity", "top1_bpr"):
        assert float(metrics.dropped_fraction) > 0
    assert float(jnp.abs(grads["router"]["w"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(y).max()) > 0


def _dense_mlp_numpy(x, wi_0, wi_1, wo):
    """T5 v1.1 gated-GELU MLP written directly in numpy (tanh-approximate GELU)."""
    h0 = x @ wi_0
    gelu = 0.5 * h0 * (1 + np.tanh(np.sqrt(2 / np.pi) * (h0 + 0.044715 * h0**3)))
    return (gelu * (x @ wi_1)) @ wo


def _copy_dense_into_experts(layer, rng):
    wi_0, wi_1, wo = (
        rng.normal(size=s).astype(np.float32) / np.sqrt(s[0]) for s in [(D, F), (D, F), (F, D)]
    )
    for name, w in [("wi_0", wi_0), ("wi_1", wi_1), ("wo", wo)]:
        getattr(layer.expert, name).kernel[...] = jnp.asarray(np.broadcast_to(w, (E, *w.shape)))
    return wi_0, wi_1, wo


@pytest.mark.parametrize(
    "router",
    [
        routing.TopKRouter(E, k=2, capacity_factor=None, renormalize=True),
        routing.TopKRouter(E, k=2, capacity_factor=None, ordering="topk_then_softmax"),
        # capacity = ceil(2·S·2/E) = S: nothing can be dropped.
        routing.TopKRouter(E, k=2, capacity_factor=2.0, renormalize=True),
        # capacity = ceil(E·S/E) = S: every expert takes every token.
        routing.ExpertChoiceRouter(E, capacity_factor=E, normalize_combine_weights=True),
    ],
    ids=["top2_dropless", "top2_topk_softmax", "top2_capacity_S", "expert_choice_capacity_S"],
)
def test_identical_experts_preserve_the_dense_mlp(router):
    """The basis of upcycling: E copies of a dense MLP + a routing that sums weights to 1."""
    layer = _layer(router)
    wi_0, wi_1, wo = _copy_dense_into_experts(layer, np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(2, 8, D)).astype(np.float32)
    y, metrics = layer(jnp.asarray(x))
    assert float(metrics.dropped_fraction) == 0.0
    np.testing.assert_allclose(y, _dense_mlp_numpy(x, wi_0, wi_1, wo), rtol=1e-5, atol=1e-5)


def test_drops_break_function_preservation():
    """Sanity check of the test above: with capacity drops the layer is no longer the dense MLP."""
    layer = _layer(routing.TopKRouter(E, k=2, capacity_factor=0.5, renormalize=True))
    wi_0, wi_1, wo = _copy_dense_into_experts(layer, np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(2, 8, D)).astype(np.float32)
    y, metrics = layer(jnp.asarray(x))
    assert float(metrics.dropped_fraction) > 0
    assert np.abs(np.asarray(y) - _dense_mlp_numpy(x, wi_0, wi_1, wo)).max() > 1e-3


def test_ragged_token_count_pads_last_group():
    """T = 2·7 = 14 tokens in groups of 8: one full group and a padded one. Each real token's
    output equals what the layer gives for its own group alone."""
    layer = _layer(ROUTERS["top2_capacity"])
    x = jax.random.normal(jax.random.key(2), (2, 7, D))
    assert layer.groups(14) == (2, 8)
    y, _ = layer(x)
    tokens = x.reshape(14, D)
    first, _ = layer(tokens[None, :8])
    second, _ = layer(tokens[None, 8:])  # 6 tokens: its own group of 6 would have capacity 3 ...
    np.testing.assert_allclose(y.reshape(14, D)[:8], first[0], rtol=1e-6)
    # ... whereas as the padded tail it keeps the capacity of S=8 (ceil(0.75·8·2/4) = 3 as well).
    padded, _ = layer(jnp.pad(tokens[8:], ((0, 2), (0, 0)))[None], jnp.arange(8)[None] < 6)
    np.testing.assert_allclose(y.reshape(14, D)[8:], padded[0, :6], rtol=1e-6)
    assert second.shape == (1, 6, D)


def test_padding_tokens_are_not_routed():
    layer = _layer(ROUTERS["expert_choice"])
    x = jax.random.normal(jax.random.key(3), (1, 8, D))
    mask = jnp.arange(8)[None] < 5
    y, _ = layer(x, mask)
    assert float(jnp.abs(y[0, 5:]).max()) == 0.0
    # Padding content cannot change real tokens' outputs.
    y2, _ = layer(x.at[0, 5:].set(100.0), mask)
    np.testing.assert_allclose(y[0, :5], y2[0, :5], rtol=1e-6)


@pytest.mark.parametrize("name", ["expert_choice_norm", "top2_capacity", "top2_dropless"])
def test_bfloat16_activations_keep_router_in_float32(name):
    layer = _layer(ROUTERS[name], dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(4), (2, 8, D))
    y, metrics = jax.jit(lambda x: layer(x))(x)
    assert y.dtype == jnp.bfloat16
    assert metrics.z_loss.dtype == jnp.float32
    # Same routing as fp32 (the router sees the bf16-rounded tokens, in fp32 math).
    ref = _layer(ROUTERS[name])
    y32, _ = ref(x.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.05, atol=0.05)
    (_, (grads, _)) = _loss_and_grads(layer, x)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_router_jitter_only_with_rng():
    layer = _layer(ROUTERS["top2_capacity"], jitter_eps=0.5)
    x = jax.random.normal(jax.random.key(5), (2, 8, D))
    a, _ = layer(x)
    b, _ = layer(x)
    c, _ = layer(x, rng=jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 0


@pytest.mark.parametrize("name", ["expert_choice_norm", "top2_capacity", "top2_dropless"])
def test_sharded_inputs_match_single_device(name):
    """Batch sharded over 8 devices, one routing group per sequence (groups stay local)."""
    layer = _layer(ROUTERS[name])
    x = jax.random.normal(jax.random.key(6), (8, 8, D))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    graphdef, state = nnx.split(layer)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    y_sharded = fn(state, xs)
    assert y_sharded.sharding.num_devices == 8
    np.testing.assert_allclose(y_sharded, fn(state, x), rtol=1e-5, atol=1e-6)


def test_parameter_paths_and_logical_axes():
    layer = _layer(ROUTERS["top2_capacity"])
    shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer)))
    assert shapes == {
        "router": {"w": {"kernel": (D, E)}},
        "expert": {
            "wi_0": {"kernel": (E, D, F)},
            "wi_1": {"kernel": (E, D, F)},
            "wo": {"kernel": (E, F, D)},
        },
    }
    assert layer.expert.wi_0.kernel.get_metadata()["out_sharding"] == ("expert", "embed", "mlp")
    assert (
        np.std(
            np.asarray(_layer(ROUTERS["top2_capacity"], router_init_std=0.02).router.w.kernel[...])
        )
        < 0.05
    )
