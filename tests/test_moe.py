"""MoE layer: index dispatch vs the one-hot reference, function preservation, dtypes, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_upcycle import moe, routing, sharding
from sparse_upcycle.models.moe_config import MoeConfig

D, F, E = 16, 24, 4
AUTO = jax.sharding.AxisType.Auto

ROUTERS = {
    "expert_choice": routing.ExpertChoiceRouter(E, capacity_factor=1.0),
    "expert_choice_norm": routing.ExpertChoiceRouter(E, 2.0, normalize_combine_weights=True),
    "top2_capacity": routing.TopKRouter(E, k=2, capacity_factor=0.75),
    "top1_bpr": routing.TopKRouter(E, k=1, capacity_factor=1.0, batch_prioritized=True),
    "top2_dropless": routing.TopKRouter(E, k=2, capacity_factor=None, ordering="topk_then_softmax"),
}


@pytest.mark.parametrize(
    "loads",
    [
        (7, 0, 9, 2),  # 18 rows routed, 2 past the total; experts 0 and 2 past C = 5
        (0, 20, 0, 0),  # every row on one expert: 15 overflow rows
        (5, 5, 5, 5),  # balanced: no overflow block at all
    ],
)
@pytest.mark.parametrize("block", [1, 3, 64])
def test_blocked_grouped_matmul_matches_ragged_dot(block, loads):
    """The CPU path (C = ceil(N/E) rows per expert batched, the rest in blocks over the used
    blocks only) computes what ragged_dot computes, values and gradients, including empty
    experts, overflow and rows past the total (padding assignments)."""
    experts = moe.ExpertMlp(E, D, F, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(experts)
    x = jax.random.normal(jax.random.key(0), (20, D))
    sizes = jnp.array(loads, jnp.int32)
    routed = sum(loads)

    def run(impl):
        def loss(state, x):
            y = nnx.merge(graphdef, state).grouped(x, sizes, impl, block)
            return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)

    (_, y_ref), g_ref = run("ragged_dot")
    (_, y_blk), g_blk = run("blocked")
    if routed < 20:
        assert float(jnp.abs(y_ref[routed:]).max()) == 0.0
        assert float(jnp.abs(y_blk[routed:]).max()) == 0.0
    assert bool((jnp.abs(y_ref[:routed]).max(axis=1) > 0).all())
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
    x = jax.random.normal(jax.random.key(1), (4, 8, D))
    # Groups: full, 5 real, 1 real, all padding.
    mask = jnp.ones((4, 8), bool).at[1, 5:].set(False).at[2, 1:].set(False).at[3].set(False)
    l_ref, (g_ref, gx_ref) = _loss_and_grads(_layer(router, "onehot", activations), x, mask)
    impls = ("ragged", "index") if router.capacity(8) is None else ("auto",)
    for impl in impls:
        fast = _layer(router, impl, activations)
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
    """T = 2·5 = 10 tokens in groups of 8: a full group and a tail of 2 real tokens padded to 8.
    The tail keeps the capacity of S=8 (ceil(0.75·8·2/4) = 3), not that of its own 2 tokens
    (ceil(0.75·2·2/4) = 1): its output is the layer's output on the tail padded and masked."""
    layer = _layer(ROUTERS["top2_capacity"])
    assert (layer.routing_policy.capacity(8), layer.routing_policy.capacity(2)) == (3, 1)
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    assert layer.groups(10) == (2, 8)
    y, _ = layer(x)
    tokens = x.reshape(10, D)
    first, _ = layer(tokens[None, :8])
    np.testing.assert_allclose(y.reshape(10, D)[:8], first[0], rtol=1e-6)
    padded, _ = layer(jnp.pad(tokens[8:], ((0, 6), (0, 0)))[None], jnp.arange(8)[None] < 2)
    np.testing.assert_allclose(y.reshape(10, D)[8:], padded[0, :2], rtol=1e-6)
    alone, _ = layer(tokens[None, 8:])  # a group of its own (S=2, capacity 1) routes otherwise
    assert float(jnp.abs(alone[0] - y.reshape(10, D)[8:]).max()) > 1e-4


@pytest.mark.parametrize("name", ["expert_choice_norm", "top2_capacity", "top2_dropless"])
def test_bfloat16_activations_keep_router_in_float32(name):
    layer = _layer(ROUTERS[name], dtype=jnp.bfloat16)
    ref = _layer(ROUTERS[name])
    x = jax.random.normal(jax.random.key(4), (2, 8, D))
    y, metrics = jax.jit(lambda x: layer(x))(x)
    y32, metrics32 = ref(x)
    assert y.dtype == jnp.bfloat16
    # The router saw the fp32 input in fp32 math: the same decision as the fp32 layer (routing
    # on bf16-rounded tokens would move these by ~1e-3).
    for a, b in zip(jax.tree.leaves(metrics), jax.tree.leaves(metrics32), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.05, atol=0.05)
    (_, (grads, _)) = _loss_and_grads(layer, x)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_router_jitter_only_with_rng_and_experts_see_clean_tokens():
    router = routing.TopKRouter(E, k=2, capacity_factor=None, renormalize=True)
    layer = _layer(router, jitter_eps=0.5)
    wi_0, wi_1, wo = _copy_dense_into_experts(layer, np.random.default_rng(0))
    x = np.random.default_rng(5).normal(size=(2, 8, D)).astype(np.float32)
    (_, ma), (_, mb), (c, mc) = layer(x), layer(x), layer(x, rng=jax.random.key(0))
    np.testing.assert_array_equal(ma.z_loss, mb.z_loss)
    assert float(jnp.abs(ma.z_loss - mc.z_loss)) > 0  # the noise changed the router's input
    # Identical experts + renormalized weights: the output is the dense MLP of the clean x.
    np.testing.assert_allclose(c, _dense_mlp_numpy(x, wi_0, wi_1, wo), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["expert_choice_norm", "top2_capacity", "top2_dropless"])
def test_nan_in_padding_does_not_reach_gradients(name):
    x = jax.random.normal(jax.random.key(8), (2, 8, D)).at[1, 3:].set(jnp.nan)
    mask = jnp.ones((2, 8), bool).at[1, 3:].set(False)
    loss, (grads, gx) = _loss_and_grads(_layer(ROUTERS[name]), x, mask)
    assert bool(jnp.isfinite(loss))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert bool(jnp.isfinite(gx[mask]).all())


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
    router = moe.RouterWeights(256, 32, router_init_std=0.02, rngs=nnx.Rngs(0))
    kernel = np.asarray(router.w.kernel[...])
    assert 0.019 < kernel.std() < 0.021 and abs(kernel.mean()) < 1e-3


@pytest.mark.parametrize("name", ["expert_choice_norm", "top2_capacity", "top2_dropless"])
def test_big_vision_experts_with_bias_match_reference_and_preserve_dense(name):
    """ViT-style experts (Dense_0/Dense_1 with biases): index paths == one-hot reference, and
    copies of one dense MLP (biases included) + a weight-preserving router give the dense MLP."""
    router = ROUTERS[name]
    kw = dict(activations=("gelu_exact",), naming="big_vision", use_bias=True)
    x = jax.random.normal(jax.random.key(9), (2, 8, D))
    impls = ("ragged", "index") if router.capacity(8) is None else ("auto",)
    ref_layer = _layer(router, "onehot", **kw)
    rng = np.random.default_rng(3)
    for module in (ref_layer.expert.Dense_0, ref_layer.expert.Dense_1):  # nonzero biases
        module.bias[...] = jnp.asarray(rng.normal(size=module.bias.shape), jnp.float32)
    l_ref, (g_ref, _) = _loss_and_grads(ref_layer, x)
    for impl in impls:
        layer = _layer(router, impl, **kw)
        nnx.update(layer, nnx.state(ref_layer))
        loss, (grads, _) = _loss_and_grads(layer, x)
        np.testing.assert_allclose(loss, l_ref, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert set(nnx.to_pure_dict(nnx.state(layer))["expert"]) == {"Dense_0", "Dense_1"}

    preserving = {
        "expert_choice_norm": routing.ExpertChoiceRouter(E, E, normalize_combine_weights=True),
        "top2_capacity": routing.TopKRouter(E, k=2, capacity_factor=2.0, renormalize=True),
        "top2_dropless": routing.TopKRouter(E, k=2, capacity_factor=None, renormalize=True),
    }[name]
    layer = _layer(preserving, **kw)
    w0, b0 = rng.normal(size=(D, F)) / 4, rng.normal(size=F)
    w1, b1 = rng.normal(size=(F, D)) / 5, rng.normal(size=D)
    for module, (w, b) in ((layer.expert.Dense_0, (w0, b0)), (layer.expert.Dense_1, (w1, b1))):
        module.kernel[...] = jnp.asarray(np.broadcast_to(w, (E, *w.shape)), jnp.float32)
        module.bias[...] = jnp.asarray(np.broadcast_to(b, (E, *b.shape)), jnp.float32)
    xn = np.asarray(x, np.float64)
    h = xn @ w0 + b0
    erf = np.vectorize(math.erf)
    dense = (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ w1 + b1
    y, _ = layer(x)
    np.testing.assert_allclose(y, dense, rtol=1e-4, atol=1e-4)


def _groups_reference(t, group_size, m):
    """flaxformer's rule, by brute force over every group count: the smallest G with
    G >= T / group_size (rounded up), G % m == 0 and T % G == 0; None if there is none."""
    viable = [g for g in range(1, t + 1) if g * group_size >= t and g % m == 0 and t % g == 0]
    return min(viable, default=None)


def test_routing_groups_default_and_multiple():
    # The default rule: S = min(group_size, T), the last group padded.
    assert routing.routing_groups(10, 8) == (2, 8)
    assert routing.routing_groups(5, 8) == (1, 5)
    # The paper's T5 on 128 chips (T5X: m = E x expert replicas = 128): encoder 256 x 512,
    # decoder 256 x 114 tokens, group size 4096 at most.
    assert routing.routing_groups(256 * 512, 4096, 128) == (128, 1024)
    assert routing.routing_groups(256 * 114, 4096, 128) == (128, 228)
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = int(rng.integers(1, 17))
        t = m * int(rng.integers(1, 60)) + int(rng.integers(0, 2)) * int(rng.integers(0, m))
        gs = int(rng.integers(1, 70))
        g, s = routing.routing_groups(t, gs, m)
        want = _groups_reference(t, gs, m) if m > 1 else None
        if want is None:  # m == 1 or m does not divide T: the default rule
            s_default = min(gs, t)
            assert (g, s) == (math.ceil(t / s_default), s_default), (t, gs, m)
        else:
            assert (g, s) == (want, t // want), (t, gs, m)


def test_group_multiple_splits_a_single_group_over_the_devices():
    """16 tokens with group_size 64: one group, routed whole on every device; with
    ``group_multiple=8`` eight groups of 2, one per device, and the layer equals the same layer
    on one device. The compiled sharded layer then moves tokens with all-to-alls."""
    router = ROUTERS["top2_capacity"]
    whole = _layer(router, group_size=64)
    split = _layer(router, group_size=64, group_multiple=8)
    assert whole.groups(16) == (1, 16) and split.groups(16) == (8, 2)
    with pytest.raises(ValueError, match="group_multiple must be >= 1"):
        _layer(router, group_multiple=0)
    x = jax.random.normal(jax.random.key(6), (8, 2, D))
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def compiled(layer):
        graphdef, state = nnx.split(layer)
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
        want = fn(state, x)
        state = jax.device_put(state, sharding.param_shardings(state, mesh))
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
        with jax.set_mesh(mesh):
            got = fn(state, xs)
            text = fn.lower(state, xs).compile().as_text()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        return text

    assert "all-to-all" not in compiled(whole)  # the one group is gathered onto every device
    assert "all-to-all" in compiled(split)  # tokens go to their experts' devices and back


def test_dispatch_auto_is_chosen_per_platform():
    """``auto`` is the block-sparse index path on CPU and ragged_dot on accelerators; the other
    modes pass through; a typo names the field."""
    assert moe.resolve_dispatch("auto", "cpu") == "index"
    assert moe.resolve_dispatch("auto", "gpu") == "ragged"
    assert moe.resolve_dispatch("auto", "tpu") == "ragged"
    assert moe.resolve_dispatch("onehot", "gpu") == "onehot"
    assert moe.resolve_dispatch("index", "tpu") == "index"
    with pytest.raises(ValueError, match="dispatch must be one of"):
        moe.resolve_dispatch("gather")
    assert _layer(ROUTERS["top2_dropless"], "auto").dispatch == moe.resolve_dispatch("auto")
    with pytest.raises(ValueError, match="moe.dispatch must be one of"):
        MoeConfig(num_experts=4, dispatch="ragged_dot")


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 8, 1)])
@pytest.mark.parametrize("name", ["top2_dropless", "top2_capacity", "expert_choice"])
def test_expert_parallel_equals_one_device_without_gathering_tokens(name, shape):
    """On (data, expert, model) meshes (2,4,1) and (1,8,1): loss and every gradient equal to one
    device at 1e-5, and the compiled step has no all-gather at all (neither the tokens nor the
    router scores: top-k runs on each device's own groups). Dropless top-K exchanges its
    assignments with the experts' devices through all-to-alls (expert_parallel.py)."""
    router = {
        "top2_dropless": routing.TopKRouter(8, k=2, capacity_factor=None),
        "top2_capacity": routing.TopKRouter(8, k=2, capacity_factor=1.0),
        "expert_choice": routing.ExpertChoiceRouter(8, capacity_factor=2.0),
    }[name]
    layer = _layer(router, group_size=4)
    x = jax.random.normal(jax.random.key(1), (8, 4, D))
    mask = jnp.ones((8, 4), bool).at[3, 2:].set(False).at[6].set(False)
    graphdef, state = nnx.split(layer)
    cot = jax.random.normal(jax.random.key(2), x.shape)

    def loss(state, x):
        y, metrics = nnx.merge(graphdef, state)(x, mask)
        return jnp.sum(y * cot) + metrics.load_balancing_loss + metrics.z_loss

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = step(state, x)
    mesh = jax.make_mesh(shape, ("data", "expert", "model"), axis_types=(AUTO,) * 3)
    sharded = jax.device_put(state, sharding.param_shardings(state, mesh))
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    with jax.set_mesh(mesh):
        assert moe.expert_parallel.applicable(8, 8)
        got = step(sharded, xs)
        text = step.lower(sharded, xs).compile().as_text()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "all-gather" not in text
    if router.capacity(4) is None:
        assert text.count("all-to-all") >= 3  # tokens + expert ids out, outputs back
