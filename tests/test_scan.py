"""``model.scan_layers``: the scanned stack is the unrolled one (loss and every gradient within
1e-5, in training mode with dropout and router jitter on), keeps the parameter tree, traces
each kind of block once, and cuts non-repeating stacks into runs.

The reference is the same model with ``scan_layers=False`` (the Python loop over blocks whose
parity with Hugging Face / T5X / big_vision the model tests check). Stacks are 4 blocks deep so
the paper's every-other layout repeats a (dense, MoE) pair twice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_remat import NOISE, TINY, _batch

from sparse_upcycle import models
from sparse_upcycle.config import ConfigError, load_config
from sparse_upcycle.models import scan
from sparse_upcycle.task import make_loss_fn, resolve_model

TOL = 1e-5
DEPTH = {
    "t5": [
        "--config.model.overrides.num_encoder_layers=4",
        "--config.model.overrides.num_decoder_layers=4",
    ],
    "vit": ["--config.model.overrides.depth=4"],
    "decoder": ["--config.model.overrides.num_hidden_layers=4"],
}


def _spec(family: str, kind: str, flags: list[str]):
    config = load_config(f"{TINY}:{family}", [*NOISE[family], *DEPTH[family], *flags])
    spec = resolve_model(config)
    if kind == "dense":
        spec = dataclasses.replace(spec, config=spec.dense_config, recipe=None)
    return spec, config


def _loss_and_grads(family: str, kind: str, flags: list[str]):
    spec, config = _spec(family, kind, flags)
    model = models.get(family).Model(spec.config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    loss_fn = make_loss_fn(spec, graphdef, state, config.get("loss", {}))
    params = nnx.to_pure_dict(state)
    batch = jax.tree.map(jnp.asarray, _batch(family, spec.config))

    def loss(p):
        value, metrics = loss_fn(p, batch, jax.random.key(7), True)
        return value, metrics

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(value), jax.tree.map(np.asarray, grads), params, jax.tree.map(np.asarray, metrics)


@pytest.fixture(scope="module")
def results():
    cache = {}

    def get(family, kind, *flags):
        if (family, kind, flags) not in cache:
            cache[family, kind, flags] = _loss_and_grads(family, kind, list(flags))
        return cache[family, kind, flags]

    return get


def _check_same(reference, other) -> None:
    loss0, grads0, params0, metrics0 = reference
    loss, grads, params, metrics = other
    assert np.isfinite(loss0)
    assert jax.tree.structure(params) == jax.tree.structure(params0)  # paths: the source's
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, params0)
    assert abs(loss - loss0) <= TOL * max(1.0, abs(loss0)), (loss, loss0)
    for key, value in metrics0.items():  # router metrics averaged over the MoE layers
        np.testing.assert_allclose(metrics[key], value, rtol=TOL, atol=TOL, err_msg=key)
    flat0 = dict(jax.tree_util.tree_leaves_with_path(grads0))
    # Per leaf, the L2 error relative to the leaf's norm, floored at 1e-3 of the largest leaf
    # norm (leaves that are zero in exact arithmetic hold rounding noise; see test_remat.py).
    floor = 1e-3 * max(float(np.linalg.norm(g)) for g in flat0.values())
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = flat0[path]
        err = float(np.linalg.norm(g - ref))
        assert err <= TOL * max(float(np.linalg.norm(ref)), floor), (
            jax.tree_util.keystr(path),
            err,
        )


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("family", ["t5", "vit", "decoder"])
def test_scanned_equals_unrolled(results, family, kind):
    reference = results(family, kind)
    scanned = results(family, kind, "--config.model.scan_layers=True")
    _check_same(reference, scanned)
    if kind == "moe":  # routing is exercised: the routers get gradients
        assert max(np.abs(g).max() for p, g in _router_grads(scanned[1])) > 0


def _router_grads(grads):
    return [
        (p, g)
        for p, g in jax.tree_util.tree_leaves_with_path(grads)
        if "router" in jax.tree_util.keystr(p)
    ]


def test_scan_with_remat_equals_unrolled(results):
    """Remat applies per block inside the scan (the decoder's MoE stack, full policy)."""
    flags = ("--config.model.scan_layers=True", "--config.model.remat=full")
    _check_same(results("decoder", "moe"), results("decoder", "moe", *flags))


def test_non_repeating_stack_runs_as_runs_of_alike_blocks(results):
    """MoE in the last 2 of 4 blocks has no shorter repeating unit: scanned as 2 dense + 2 MoE."""
    layers = "--config.model.moe.layers=last_n:2"
    _check_same(
        results("vit", "moe", layers),
        results("vit", "moe", layers, "--config.model.scan_layers=True"),
    )


def test_segments():
    d, m = "dense", "moe"
    assert scan.segments([d, m] * 3) == [(0, 2, 3)]
    assert scan.segments([m] * 5) == [(0, 1, 5)]
    assert scan.segments([d, d, m, m]) == [(0, 1, 2), (2, 1, 2)]
    assert scan.segments([d, m, d, d]) == [(0, 1, 1), (1, 1, 1), (2, 1, 2)]
    assert scan.segments([d, m]) == [(0, 1, 1), (1, 1, 1)]  # no unit shorter than the stack
    assert scan.segments([d]) == [(0, 1, 1)] and scan.segments([]) == []


def _count(text: str, op: str) -> int:
    return text.count(op)


def test_each_kind_of_block_is_traced_once():
    """The lowered gradient of the scanned 8-block every-other ViT holds two while loops (the
    forward scan and its transpose) and a
    quarter of the unrolled program's matmuls (a (dense, MoE) pair instead of 4 pairs)."""
    dots = {}
    for flag in ("False", "True"):
        flags = ["--config.model.overrides.depth=8", f"--config.model.scan_layers={flag}"]
        config = load_config(f"{TINY}:vit", flags)
        spec = resolve_model(config)
        model = models.get("vit").Model(spec.config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            out = nnx.merge(graphdef, state)(jnp.zeros((2, 28, 28, 1)), train=True)
            return jnp.sum(out[0])

        text = jax.jit(jax.grad(loss)).lower(state).as_text()
        dots[flag] = _count(text, "stablehlo.dot_general")
        assert _count(text, "stablehlo.while") == (2 if flag == "True" else 0)
    # Outside the blocks: patch embedding and head (forward and backward) in both programs.
    assert dots["True"] < 0.4 * dots["False"], dots


def test_config_field():
    for family in ("t5", "vit", "decoder"):
        cfg = models.get(family).config("tiny", scan_layers=True)
        assert cfg.scan_layers and cfg == models.get(family).config("tiny")  # equality ignores it
    with pytest.raises(ConfigError, match=r"model\.scan_layers must be a bool") as e:
        resolve_model(load_config(f"{TINY}:vit", ["--config.model.scan_layers=3"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model\.overrides\.scan_layers: set model\.scan_layers"):
        resolve_model(load_config(f"{TINY}:vit", ["--config.model.overrides.scan_layers=True"]))
