"""Upcycling methods, checked against dense MLPs and MoE outputs computed in numpy here."""

import dataclasses

import numpy as np
import pytest

from sparse_upcycle import routing
from sparse_upcycle.models.moe_config import MoeConfig
from sparse_upcycle.upcycle import methods, recipe, rules, verdict
from sparse_upcycle.upcycle.recipe import Recipe

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


def test_drop_upcycling_per_matrix_draws_a_set_for_each_matrix():
    """``units="per_matrix"`` (the authors' released script): each kernel of an expert loses
    its own ⌊r·f⌋ units, so the three sets differ; ``shared`` is what it was (its first
    matrix's set is the per-matrix default's draw for no kernel)."""
    rng = np.random.default_rng(5)
    mlp = {
        "wi_0": rng.normal(size=(32, 96)),
        "wi_1": rng.normal(size=(32, 96)),
        "wo": rng.normal(size=(96, 32)),
    }
    per = methods.drop_upcycle_experts(mlp, 2, 0.5, seed=3, layer=0, units="per_matrix")
    shared = methods.drop_upcycle_experts(mlp, 2, 0.5, seed=3, layer=0)
    for e in range(2):
        changed = [
            np.flatnonzero((per["wi_0"][e] != mlp["wi_0"]).any(0)),
            np.flatnonzero((per["wi_1"][e] != mlp["wi_1"]).any(0)),
            np.flatnonzero((per["wo"][e] != mlp["wo"]).any(1)),
        ]
        assert [len(c) for c in changed] == [48, 48, 48]
        assert len({tuple(c) for c in changed}) == 3
        same = np.flatnonzero((shared["wo"][e] != mlp["wo"]).any(1))
        assert not any(np.array_equal(same, c) for c in changed)
    plain = {  # a plain MLP with biases: an input bias follows its own kernel's set
        "Dense_0": rng.normal(size=(32, 96)),
        "Dense_0_bias": rng.normal(size=(96,)),
        "Dense_1": rng.normal(size=(96, 32)),
        "Dense_1_bias": rng.normal(size=(32,)),
    }
    out = methods.drop_upcycle_experts(plain, 2, 0.5, methods.BIG_VISION, units="per_matrix")
    for e in range(2):
        kernel = np.flatnonzero((out["Dense_0"][e] != plain["Dense_0"]).any(0))
        np.testing.assert_array_equal(np.flatnonzero(out["Dense_0_bias"][e] == 0.0), kernel)
    with pytest.raises(ValueError, match="upcycle.drop_units must be one of"):
        Recipe(method="drop", drop_units="layer")


# --------------------------------------------------------------------------------------------
# The registry: methods as data
# --------------------------------------------------------------------------------------------


def test_registry_holds_the_three_methods_and_their_settings():
    assert methods.names() == ("copy", "virtual_group", "drop", "fine_grained_shared")
    assert isinstance(methods.get("drop"), methods.Drop)
    with pytest.raises(
        ValueError,
        match=r"must be one of \('copy', 'virtual_group', 'drop', 'fine_grained_shared'\)",
    ):
        methods.get("magic")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.Copy())
    # Every Recipe field is shared or read by some method, and each setting is a Recipe field.
    fields = {f.name for f in dataclasses.fields(Recipe)}
    settings = {s for m in methods.METHODS.values() for s in m.settings}
    assert settings | set(recipe.COMMON_SETTINGS) == fields
    assert settings <= fields
    assert rules.Recipe is Recipe  # the old import path keeps working


def test_recipe_asks_its_method():
    vg = Recipe(method="virtual_group", expansion=4, granularity=2, k=2)
    assert (vg.total_experts, vg.name, methods.get(vg.method).granularity(vg)) == (8, "E4G2T2", 2)
    drop = Recipe(method="drop", num_experts=5)
    assert (drop.total_experts, drop.name, methods.get("drop").granularity(drop)) == (5, "drop", 1)
    assert Recipe().preserves_dense_function and not Recipe(noise_std=0.1).preserves_dense_function
    assert not drop.preserves_dense_function
    assert Recipe(
        method="virtual_group", k=2, ordering="topk_then_softmax", scaling="exact"
    ).preserves_dense_function
    # recipe.json is Recipe.to_dict(): its keys and their order are the fields'.
    assert list(Recipe().to_dict()) == [f.name for f in dataclasses.fields(Recipe)]
    assert Recipe().to_dict()["drop_stats"] == "matrix"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(method="virtual_group", k=3, granularity=2), "K % G == 0; got K=3, G=2"),
        (dict(method="virtual_group", scaling="half"), "scaling must be one of"),
        (dict(method="virtual_group", ordering="random"), "ordering must be one of"),
        (dict(method="drop", drop_ratio=1.5), r"drop_ratio r must be in \[0, 1\]"),
        (dict(method="drop", drop_stats="layer"), "stats must be one of"),
        (dict(method="drop", optimizer="tile"), "needs method=copy"),
        (dict(method="magic"), "recipe method must be one of"),
    ],
)
def test_methods_validate_their_own_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        Recipe(**kw)


def test_settings_a_method_does_not_read_are_not_its_business():
    Recipe(method="copy", scaling="half", drop_stats="layer", k=3, granularity=2)


def test_virtual_group_checks_the_models_routing():
    vg = Recipe(method="virtual_group", expansion=4, granularity=1, k=2)
    fits = MoeConfig(num_experts=4, router="top_k", k=2)
    methods.get("virtual_group").check_model(vg, {"moe": fits})
    dense_block = MoeConfig(num_experts=4, router="expert_choice", layers="none")
    methods.get("virtual_group").check_model(vg, {"moe": fits, "decoder_moe": dense_block})
    with pytest.raises(
        ValueError,
        match="assumes top-2 softmax_then_topk routing; the model "
        "routes expert_choice k=2 softmax_then_topk",
    ):
        methods.get("virtual_group").check_model(
            vg, {"moe": MoeConfig(num_experts=4, router="expert_choice")}
        )
    methods.get("copy").check_model(Recipe(), {"moe": MoeConfig(num_experts=4, k=1)})


class HalvedCopy(methods.Method):
    """A method defined here: every expert is the dense MLP with its output kernel halved."""

    name = "halved_copy"
    settings = ("num_experts",)

    def experts(self, mlp, names, recipe, layer):
        out = methods.copy_experts(mlp, recipe.num_experts, names)
        out[names.output] = out[names.output] * 0.5
        return out


@pytest.fixture
def halved_copy():
    method = methods.register(HalvedCopy())
    yield method
    methods.unregister(method.name)


def test_a_new_method_is_one_class_and_one_registry_entry(halved_copy):
    rng = np.random.default_rng(5)
    d, f, e = 4, 6, 3
    prefixes = ("encoder/layers_1/mlp", "decoder/layers_3/mlp")
    dense, target = {}, {}
    for prefix in prefixes:
        for name, shape in (("wi_0", (d, f)), ("wi_1", (d, f)), ("wo", (f, d))):
            dense[f"{prefix}/{name}/kernel"] = rng.normal(size=shape).astype(np.float32)
            target[f"{prefix}/expert/{name}/kernel"] = ((e, *shape), np.dtype(np.float32))
        target[f"{prefix}/router/w/kernel"] = ((d, e), np.dtype(np.float32))
    dense["encoder/layers_1/attention/query/kernel"] = rng.normal(size=(d, d)).astype(np.float32)
    target["encoder/layers_1/attention/query/kernel"] = ((d, d), np.dtype(np.float32))

    r = Recipe(method="halved_copy", num_experts=e, seed=11, router_init_std=0.5)
    out = dict(rules.upcycle_tree(dense, dense.__getitem__, target, r))

    assert set(out) == set(target)
    for prefix, layer in zip(prefixes, (1, 100_003), strict=True):
        for name, scale in (("wi_0", 1.0), ("wi_1", 1.0), ("wo", 0.5)):
            want = np.stack([dense[f"{prefix}/{name}/kernel"] * scale] * e)
            np.testing.assert_array_equal(out[f"{prefix}/expert/{name}/kernel"], want)
        router = np.random.default_rng([11, layer, 0, 999]).normal(0.0, 0.5, (d, e))
        np.testing.assert_array_equal(out[f"{prefix}/router/w/kernel"], router.astype(np.float32))
    np.testing.assert_array_equal(
        out["encoder/layers_1/attention/query/kernel"],
        dense["encoder/layers_1/attention/query/kernel"],
    )
    assert (r.name, r.total_experts, r.preserves_dense_function) == ("halved_copy", e, False)
    assert verdict._recipe_problem(r) == "method 'halved_copy' changes the experts' weights"
    with pytest.raises(ValueError, match="needs method=copy"):
        Recipe(method="halved_copy", optimizer="tile")
