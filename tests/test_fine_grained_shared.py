"""``fine_grained_shared``: fine-grained routed experts + shared experts from one dense MLP.

The reference is the dense SwiGLU MLP computed in numpy; the MoE is our layer holding the
method's experts. Exactness is claimed (and checked at fp32 1e-5) for: ``topk_then_softmax``
with any router, ``softmax_then_topk`` with renormalisation with any router, sigmoid scores
with renormalisation, ``softmax_then_topk`` without renormalisation at a uniform router; with
or without Qwen2-MoE's shared-expert gate. Where it is impossible (``softmax_then_topk``
unnormalised behind a random router, or Drop-Upcycling's re-initialisation) the verdict says
so and the function does change.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle import cli
from sparse_upcycle.models.moe_config import MoeConfig
from sparse_upcycle.upcycle import methods
from sparse_upcycle.upcycle.recipe import Recipe

D, F = 16, 32
CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "upcycle_tiny.py")


def _silu(x):
    return x / (1 + np.exp(-x))


def _dense(x, mlp):
    return (_silu(x @ mlp["wi_0"]) * (x @ mlp["wi_1"])) @ mlp["wo"]


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    return {
        "wi_0": rng.normal(0, 0.3, (D, F)).astype(np.float32),
        "wi_1": rng.normal(0, 0.3, (D, F)).astype(np.float32),
        "wo": rng.normal(0, 0.3, (F, D)).astype(np.float32),
    }


def _moe(mlp, recipe: Recipe, *, gate: bool, score="softmax", seed=0):
    """Our MoE layer with the method's experts, shared experts, (zero) gate and router."""
    g, s = recipe.granularity, recipe.shared_experts
    cfg = MoeConfig(
        num_experts=recipe.num_experts,
        router="top_k",
        k=recipe.k,
        ordering=recipe.ordering,
        renormalize=recipe.renormalize,
        score_function=score,
        capacity_factor=None,
        eval_capacity_factor=None,
        expert_mlp_dim=F // g,
        num_shared_experts=s,
        shared_expert_mlp_dim=F // g,
        shared_expert_gate=gate,
    )
    layer = cfg.make_layer(D, F, ("silu", "linear"), causal=True, rngs=nnx.Rngs(0))
    method = methods.get(recipe.method)
    routed = method.experts(mlp, methods.T5X_GATED, recipe, 0)
    params = {
        "router": {"w": {"kernel": method.router((D, recipe.num_experts), 0, recipe, _rng(seed))}},
        "expert": {n: {"kernel": routed[n]} for n in ("wi_0", "wi_1", "wo")},
    }
    if s:
        shared = method.shared(mlp, methods.T5X_GATED, recipe, 0, gate)
        params["shared_expert"] = {n: {"kernel": shared[n]} for n in ("wi_0", "wi_1", "wo")}
    if gate:
        params["shared_expert_gate"] = {"kernel": np.zeros((D, 1), np.float32)}
    state = nnx.state(layer, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(layer, state)
    return layer


def _rng(seed):
    return np.random.default_rng(seed)


def _recipe(**kw):
    base = dict(
        method="fine_grained_shared",
        num_experts=4,
        shared_experts=2,
        granularity=4,
        k=2,
        ordering="topk_then_softmax",
        scaling="exact",
        router_init_std=1.0,  # large: routing really varies between tokens
    )
    return Recipe(**{**base, **kw})


def _delta(layer, mlp):
    x = np.random.default_rng(1).normal(0, 1, (3, 11, D)).astype(np.float32)
    y, _ = layer(jnp.asarray(x), train=False)
    return float(np.abs(np.asarray(y) - _dense(x.astype(np.float64), mlp)).max())


EXACT = {
    "topk_then_softmax": ({}, "softmax"),
    "softmax_then_topk_renormalized": (
        dict(ordering="softmax_then_topk", renormalize=True),
        "softmax",
    ),
    "sigmoid_renormalized": (dict(ordering="softmax_then_topk", renormalize=True), "sigmoid"),
    "softmax_then_topk_uniform_router": (
        dict(ordering="softmax_then_topk", router_init_std=0.0),
        "softmax",
    ),
    "no_shared_E8S0G2T2": (dict(num_experts=8, shared_experts=0, granularity=2), "softmax"),
    "E12S1G4T3": (dict(num_experts=12, shared_experts=1, k=3), "softmax"),
}


@pytest.mark.parametrize("gate", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("case", list(EXACT))
def test_the_moe_computes_the_dense_mlp(mlp, case, gate):
    kw, score = EXACT[case]
    recipe = _recipe(**kw)
    if gate and not recipe.shared_experts:
        pytest.skip("no shared experts to gate")
    assert methods.get(recipe.method).preserves_dense_function(recipe) is None
    assert _delta(_moe(mlp, recipe, gate=gate, score=score), mlp) < 1e-5


def test_where_exactness_is_impossible_it_is_said_and_true(mlp):
    unnormalized = _recipe(ordering="softmax_then_topk")
    reason = methods.get(unnormalized.method).preserves_dense_function(unnormalized)
    assert "uniform router" in reason
    assert _delta(_moe(mlp, unnormalized, gate=False), mlp) > 1e-3
    dropped = _recipe(reinit_ratio=0.5)
    assert "re-initialises" in methods.get(dropped.method).preserves_dense_function(dropped)
    assert _delta(_moe(mlp, dropped, gate=False), mlp) > 1e-3
    paper = _recipe(scaling="paper")  # a^(1/3) per matrix: SiLU is not homogeneous
    assert "scaling" in methods.get(paper.method).preserves_dense_function(paper)
    assert _delta(_moe(mlp, paper, gate=False), mlp) > 1e-4


def test_layout_name_and_refusals(mlp):
    recipe = _recipe(num_experts=8)
    assert recipe.name == "E8S2G4T2" and recipe.total_experts == 8
    routed = methods.get(recipe.method).experts(mlp, methods.T5X_GATED, recipe, 0)
    shared = methods.get(recipe.method).shared(mlp, methods.T5X_GATED, recipe, 0, False)
    fs = F // 4
    # Shared: shards 0..S-1 as they are; routed expert j: shard S + j mod (G-S), scaled by R.
    np.testing.assert_array_equal(shared["wi_0"], mlp["wi_0"][:, : 2 * fs])
    np.testing.assert_array_equal(shared["wo"], mlp["wo"][: 2 * fs])
    for j in range(8):
        lo = (2 + j % 2) * fs
        np.testing.assert_array_equal(routed["wi_1"][j], mlp["wi_1"][:, lo : lo + fs])
        np.testing.assert_allclose(routed["wo"][j], 2.0 * mlp["wo"][lo : lo + fs], rtol=1e-6)
    router = methods.get(recipe.method).router((D, 8), 0, recipe, _rng(0))
    np.testing.assert_array_equal(router[:, 0::2], router[:, 1::2])  # runs of G-S = 2
    with pytest.raises(ValueError, match="multiples of granularity - shared_experts = 2"):
        _recipe(k=3)
    with pytest.raises(ValueError, match="0 <= shared_experts < granularity"):
        _recipe(shared_experts=4)
    with pytest.raises(ValueError, match="builds no shared experts"):
        methods.get("copy").shared(mlp, methods.T5X_GATED, Recipe(), 0, False)


def test_drop_upcycling_composes_on_the_routed_experts_only(mlp):
    recipe = _recipe(reinit_ratio=0.5, seed=3)
    method = methods.get(recipe.method)
    plain = method.experts(mlp, methods.T5X_GATED, _recipe(seed=3), 0)
    routed = method.experts(mlp, methods.T5X_GATED, recipe, 0)
    shared = method.shared(mlp, methods.T5X_GATED, recipe, 0, False)
    np.testing.assert_array_equal(shared["wi_0"], mlp["wi_0"][:, : 2 * (F // 4)])
    for e in range(recipe.num_experts):
        changed = np.flatnonzero((routed["wi_0"][e] != plain["wi_0"][e]).any(axis=0))
        assert len(changed) == (F // 4) // 2  # ⌊r·f/G⌋ units of each routed expert
        rows = np.flatnonzero((routed["wo"][e] != plain["wo"][e]).any(axis=1))
        np.testing.assert_array_equal(rows, changed)  # one unit set for inputs and output


def test_upcycle_and_verify_a_qwen2_with_gated_shared_experts(tmp_path, capsys):
    """The CLI path from an HF Qwen2 directory: rules fill shared experts, a zero gate and the
    routed runs; ``verify`` finds the dense logits (fp32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    src = str(tmp_path / "qwen2")
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(src)
    args = [
        "--config.model.name=checkpoint",
        "--config.upcycle.method=fine_grained_shared",
        "--config.upcycle.num_experts=4",
        "--config.upcycle.shared_experts=2",
        "--config.upcycle.granularity=4",
        "--config.upcycle.k=2",
        "--config.upcycle.ordering=softmax_then_topk",
        "--config.upcycle.renormalize=True",
        "--config.upcycle.scaling=exact",
        "--config.upcycle.router_init_std=1.0",
        "--config.model.moe.ordering=softmax_then_topk",
        "--config.model.moe.shared_expert_gate=True",
    ]
    dst = str(tmp_path / "moe")
    upcycle = ["upcycle", "--config", f"{CONFIG}:decoder", "--src", src, "--dst", dst]
    assert cli.main([*upcycle, *args]) == 0
    info = json.load(open(os.path.join(dst, "recipe.json")))
    assert info["recipe_name"] == "E4S2G4T2" and info["preserves_dense_function"]
    assert info["model"]["moe"]["num_shared_experts"] == 2
    capsys.readouterr()
    verify = ["verify", "--config", f"{CONFIG}:decoder", "--dense", src, "--moe", dst]
    assert cli.main([*verify, *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["meant_to_preserve"] and result["ok"] and result["max_abs_delta"] < 1e-4
    assert cli.main(["inspect", dst]) == 0
    report = capsys.readouterr().out
    assert "shared experts: 2 of width 16, on every token behind a sigmoid gate" in report
    assert "softmax scores, softmax_then_topk, renormalize=True, aux_loss" in report
    # Active parameters count the shared experts (every token) and K/E of the routed ones.
    assert "layers_1/mlp/shared_expert/wo/kernel" in report
    # The model's routing must be the one the scaling assumes: one line, exit 2.
    code = cli.main(
        [*upcycle[:-1], str(tmp_path / "x"), *args, "--config.model.moe.renormalize=False"]
    )
    assert code == 2 and "fine_grained_shared scaling assumes" in capsys.readouterr().err
