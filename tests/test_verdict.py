"""One verdict on function preservation: the formula (capacity at the configured group size)
agrees with what the routers actually do, and upcycle / verify / export give the same answer."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle import cli, routing
from sparse_upcycle.checkpoints.t5x import write_t5x
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.models import t5
from sparse_upcycle.models.moe_config import MoeConfig
from sparse_upcycle.upcycle.recipe import Recipe
from sparse_upcycle.upcycle.verdict import dense_function_verdict

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def _weight_sums(block: MoeConfig, logits_SE: np.ndarray) -> np.ndarray:
    """Each token's total combine weight when ``block``'s evaluation router routes one group."""
    router = block.make_router(block.eval_capacity_factor, causal=False)
    decision = router.route(jnp.asarray(logits_SE[None], jnp.float32))
    return np.asarray(routing.dense_combine_weights(decision)).sum(-1)[0]


def _routes_every_token_fully(block: MoeConfig) -> bool:
    """Observed, not derived: on random scores and on all-equal scores (every token and every
    expert tie, the worst case for capacity: all tokens want the same experts), does every
    token get total weight 1?"""
    s, e = block.group_size, block.num_experts
    rng = np.random.default_rng(0)
    trials = [np.zeros((s, e)), rng.normal(size=(s, e)) * 3, rng.normal(size=(s, e)) * 0.01]
    return all(np.allclose(_weight_sums(block, x), 1.0, atol=1e-5) for x in trials)


GRID = [
    MoeConfig(
        num_experts=e,
        router="expert_choice",
        group_size=s,
        eval_capacity_factor=c,
        capacity_multiple=m,
        normalize_combine_weights=n,
    )
    for e, s, c, m, n in itertools.product((4,), (12, 16), (1.0, 2.0, 3.5, 4.0), (1, 8), (0, 1))
] + [
    MoeConfig(
        num_experts=e,
        router="top_k",
        k=k,
        group_size=s,
        eval_capacity_factor=c,
        capacity_multiple=m,
        ordering=o,
        renormalize=r,
    )
    for e, k, s, c, m, o, r in itertools.product(
        (4,),
        (1, 2),
        (12,),
        (None, 1.0, 2.0, 4.0),
        (1, 8),
        ("softmax_then_topk", "topk_then_softmax"),
        (False, True),
    )
]


@pytest.mark.parametrize("block", GRID, ids=lambda b: f"{b.router}")
def test_routing_verdict_matches_the_routers(block):
    problem = block.eval_routing_problem()
    assert (problem is None) == _routes_every_token_fully(block), problem


def test_capacity_rounding_can_make_a_small_factor_preserve():
    # ceil(2·12/4) = 6 slots, rounded up to a multiple of 8 -> 8 < 12: drops; at S = 8 the
    # same factor gives 4 -> 8 = S: every expert takes every token.
    drops = MoeConfig(4, router="expert_choice", eval_capacity_factor=2.0, group_size=12,
                      capacity_multiple=8)  # fmt: skip
    full = MoeConfig(4, router="expert_choice", eval_capacity_factor=2.0, group_size=8,
                     capacity_multiple=8)  # fmt: skip
    assert drops.capacity(train=False) == 8 and "8 slots" in drops.eval_routing_problem()
    assert full.capacity(train=False) == 8 and full.eval_routing_problem() is None
    assert _routes_every_token_fully(full) and not _routes_every_token_fully(drops)


def test_recipe_and_routing_both_count():
    cfg = t5.config("tiny")
    full = MoeConfig(4, router="expert_choice", eval_capacity_factor=4.0, group_size=64)
    model = t5.config("tiny", encoder_moe=full, decoder_moe=MoeConfig(0))
    assert dense_function_verdict(Recipe(num_experts=4), model).preserves
    noisy = dense_function_verdict(Recipe(num_experts=4, noise_std=0.1), model)
    assert not noisy.preserves and "noise_std=0.1" in noisy.reasons[0]
    half = MoeConfig(4, router="expert_choice", eval_capacity_factor=2.0, group_size=64)
    paper = dense_function_verdict(Recipe(num_experts=4), t5.config("tiny", encoder_moe=half))
    assert not paper.preserves and paper.reasons[0].startswith("encoder_moe: expert_choice")
    assert dense_function_verdict(Recipe(num_experts=4), cfg).preserves  # dense: nothing to say


def _tiny_t5x(tmp_path):
    src = str(tmp_path / "checkpoint_100")
    model = t5.T5(t5.config("tiny"), rngs=nnx.Rngs(0))
    write_t5x(
        src,
        flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))),
        step=100,
    )
    return src


@pytest.mark.parametrize(
    "config, preserves",
    [("upcycle_tiny.py:t5", True), ("t5_base_upcycle.py:tiny", False)],
    ids=["exact", "paper_routing"],
)
def test_upcycle_and_verify_say_the_same(tmp_path, capsys, config, preserves):
    """The paper's T5 routing (expert choice C=2 < E in the encoder) drops tokens: upcycle
    used to print True while verify said false."""
    src, dst = _tiny_t5x(tmp_path), str(tmp_path / "moe")
    config = os.path.join(CONFIGS, config)
    assert cli.main(["upcycle", "--config", config, "--src", src, "--dst", dst]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.endswith(f"meant to preserve the dense function: {preserves}") == preserves
    info = json.load(open(os.path.join(dst, "recipe.json")))
    assert info["preserves_dense_function"] is preserves
    assert cli.main(["verify", "--config", config, "--dense", src, "--moe", dst]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["meant_to_preserve"] is preserves
    assert result["not_meant_because"] == info["preservation"]
    if not preserves:
        assert "encoder_moe: expert_choice routing at evaluation has" in printed
        assert any(r.startswith("encoder_moe") for r in info["preservation"])
