"""Upcycling methods, checked against dense MLPs and MoE outputs computed in numpy here."""

import numpy as np
import pytest

from sparse_upcycle import routing
from sparse_upcycle.upcycle import methods

D, F = 6, 8


def _dense(rng, names=methods.T5X_GATED):
    mlp = {n: rng.normal(size=(D, F)) for n in names.inputs}
    mlp[names.output] = rng.normal(size=(F, D))
    return mlp


def _silu(x):
    return x / (1 + np.exp(-x))


def _mlp(x, mlp, e=None):
    pick = (lambda w: w) if e is None else (lambda w: w[e])
    if "wi_0" in mlp:
        h = _silu(x @ pick(mlp["wi_0"])) * (x @ pick(mlp["wi_1"]))
    else:
        h = np.maximum(x @ pick(mlp["wi"]), 0)
    return h @ pick(mlp["wo"])


def _numpy_topk_moe(x, experts, logits, k, ordering):
    """Reference top-K MoE written here: softmax/top-K per token, weighted expert outputs."""
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        z = logits[t]
        top = np.argsort(-z, kind="stable")[:k]
        if ordering == "softmax_then_topk":
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            w = p[top]
        else:
            w = np.exp(z[top] - z[top].max()) / np.exp(z[top] - z[top].max()).sum()
        for j, e in zip(top, range(k), strict=True):
            out[t] += w[e] * _mlp(x[t : t + 1], experts, j)[0]
    return out


def test_copy_experts_and_noise_are_deterministic():
    mlp = _dense(np.random.default_rng(0))
    experts = methods.copy_experts(mlp, 4)
    for name, w in mlp.items():
        assert experts[name].shape == (4, *w.shape)
        np.testing.assert_array_equal(experts[name], np.broadcast_to(w, (4, *w.shape)))
    a = methods.copy_experts(mlp, 4, noise_std=0.1, seed=3, layer=1)
    b = methods.copy_experts(mlp, 4, noise_std=0.1, seed=3, layer=1)
    c = methods.copy_experts(mlp, 4, noise_std=0.1, seed=3, layer=2)
    np.testing.assert_array_equal(a["wo"], b["wo"])
    assert not np.allclose(a["wo"], c["wo"])
    assert 0.05 < np.std(a["wo"] - experts["wo"]) < 0.15


@pytest.mark.parametrize("ordering", methods.ORDERINGS)
@pytest.mark.parametrize(("ex", "g", "k"), [(8, 1, 2), (4, 2, 2), (2, 4, 4), (3, 2, 4)])
def test_virtual_group_exact_scaling_preserves_dense_at_uniform_router(ex, g, k, ordering):
    rng = np.random.default_rng(1)
    mlp = _dense(rng)
    experts = methods.virtual_group_experts(mlp, ex, g, k, ordering=ordering, scaling="exact")
    assert experts["wi_0"].shape == (ex * g, D, F // g) and experts["wo"].shape == (
        ex * g,
        F // g,
        D,
    )
    x = rng.normal(size=(5, D))
    logits = x @ methods.virtual_group_router(np.zeros((D, ex)), g)  # uniform router
    moe = _numpy_topk_moe(x, experts, logits, k, ordering)
    np.testing.assert_allclose(moe, _mlp(x, mlp), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ordering", methods.ORDERINGS)
def test_virtual_group_paper_scaling_is_exact_for_relu(ordering):
    rng = np.random.default_rng(2)
    mlp = _dense(rng, methods.T5X_PLAIN)
    experts = methods.virtual_group_experts(mlp, 4, 2, 2, methods.T5X_PLAIN, ordering=ordering)
    x = rng.normal(size=(5, D))
    logits = x @ methods.virtual_group_router(np.zeros((D, 4)), 2)
    np.testing.assert_allclose(
        _numpy_topk_moe(x, experts, logits, 2, ordering), _mlp(x, mlp), rtol=1e-10, atol=1e-10
    )
    assert methods.virtual_group_scale(4, 2, 2, "softmax_then_topk") == 8.0
    assert methods.recipe_name(8, 1, 2) == "E8G1T2"


def test_virtual_group_router_picks_whole_groups():
    rng = np.random.default_rng(3)
    router = methods.virtual_group_router(rng.normal(size=(D, 4)), 2)
    logits = rng.normal(size=(1, 16, D)) @ router
    decision = routing.TopKRouter(8, k=4, capacity_factor=None).route(logits.astype(np.float32))
    picked = np.asarray(routing.dense_combine_weights(decision))[0] > 0  # [S, E]
    np.testing.assert_array_equal(picked[:, 0::2], picked[:, 1::2])


def test_virtual_group_refuses_bad_shapes():
    mlp = _dense(np.random.default_rng(0))
    with pytest.raises(ValueError, match="K % G"):
        methods.virtual_group_experts(mlp, 4, 2, 3)
    with pytest.raises(ValueError, match="divisible by G"):
        methods.virtual_group_experts(mlp, 2, 3, 3)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_drop_upcycling_reinitialises_a_shared_unit_set(ratio):
    rng = np.random.default_rng(4)
    mlp = {
        "wi_0": rng.normal(2.0, 3.0, size=(64, 128)),
        "wi_1": rng.normal(size=(64, 128)),
        "wo": rng.normal(size=(128, 64)),
    }
    experts = methods.drop_upcycle_experts(mlp, 3, ratio, seed=7, layer=1)
    again = methods.drop_upcycle_experts(mlp, 3, ratio, seed=7, layer=1)
    n_drop = int(np.floor(ratio * 128))
    sets = []
    for e in range(3):
        changed = [
            np.flatnonzero((experts["wi_0"][e] != mlp["wi_0"]).any(0)),
            np.flatnonzero((experts["wi_1"][e] != mlp["wi_1"]).any(0)),
            np.flatnonzero((experts["wo"][e] != mlp["wo"]).any(1)),
        ]
        for c in changed:
            np.testing.assert_array_equal(c, changed[0])  # one set for all three matrices
        assert len(changed[0]) == n_drop
        sets.append(tuple(changed[0]))
        np.testing.assert_array_equal(experts["wo"][e], again["wo"][e])
    if 0 < ratio < 1:
        assert len(set(sets)) == 3  # each expert drops its own units
        dropped = experts["wi_0"][0][:, list(sets[0])]
        assert abs(dropped.mean() - 2.0) < 0.3 and abs(dropped.std() - 3.0) < 0.3
