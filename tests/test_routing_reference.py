"""Independent numpy reference for the routers in ``sparse_upcycle.routing``.

The reference below was written from the written routing formulas only (expert
choice, top-K token choice, capacity rounding, priority order, metrics), not
from the implementation, and the JAX routers are compared against it.
"""

import functools
import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_upcycle import routing

RTOL, ATOL = 1e-5, 1e-6
METRICS = (
    "load_balancing_loss",
    "z_loss",
    "expert_load",
    "dropped_fraction",
    "entropy",
    "top1_prob",
)


# ----------------------------------------------------------------------------- reference
def ref_capacity(x, multiple, group_size):
    cap = math.ceil(x)
    cap = -(-cap // multiple) * multiple
    return min(cap, group_size)


def _softmax(x):
    x = x.astype(np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _common_metrics(logits, probs, m):
    x = logits[m].astype(np.float64)
    mx = x.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(x - mx).sum(-1, keepdims=True)))[:, 0]
    p = probs[m].astype(np.float64)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return {
        "z_loss": np.mean(lse**2),
        "entropy": np.mean(-plogp.sum(-1)),
        "top1_prob": np.mean(p.max(-1)),
    }


def _mean_metrics(per_group):
    return {k: np.mean([d[k] for d in per_group], axis=0) for k in per_group[0]}


def ref_expert_choice(logits, mask, c, multiple, normalize):
    G, S, E = logits.shape
    probs = _softmax(logits)
    cap = ref_capacity(c * S / E, multiple, S)
    dense = np.zeros((G, S, E), np.float32)
    per_group = []
    for g in range(G):
        counts = np.zeros(E)
        for e in range(E):
            key = np.where(mask[g], probs[g, :, e], -np.inf)
            for s in np.argsort(-key, kind="stable")[:cap]:
                if mask[g, s]:
                    dense[g, s, e] = probs[g, s, e]
                    counts[e] += 1
        reached = (dense[g] > 0).any(-1)
        d = _common_metrics(logits[g], probs[g], mask[g])
        d.update(
            load_balancing_loss=0.0,
            expert_load=counts / counts.sum(),
            dropped_fraction=np.mean(~reached[mask[g]]),
        )
        per_group.append(d)
    if normalize:
        denom = dense.sum(-1, keepdims=True)
        dense = np.where(denom > 0, dense / np.where(denom > 0, denom, 1), 0).astype(
            np.float32
        )
    return dense, _mean_metrics(per_group), cap


def ref_topk(logits, mask, k, c, multiple, ordering, renormalize, bpr):
    G, S, E = logits.shape
    probs = _softmax(logits)
    cap = None if c is None else ref_capacity(c * S * k / E, multiple, S)
    dense = np.zeros((G, S, E), np.float32)
    per_group = []
    for g in range(G):
        choice = np.zeros((S, k), int)
        weight = np.zeros((S, k), np.float32)
        for s in range(S):
            key = probs[g, s] if ordering == "softmax_then_topk" else logits[g, s]
            choice[s] = np.argsort(-key, kind="stable")[
                :k
            ]  # ties -> lower expert index
            if ordering == "softmax_then_topk":
                weight[s] = probs[g, s, choice[s]]
            else:
                weight[s] = _softmax(logits[g, s, choice[s]])
            if renormalize:
                weight[s] = weight[s] / weight[s].sum()
        real = np.flatnonzero(mask[g])
        if bpr:  # descending top-1 prob, ties -> lower position
            real = real[np.argsort(-probs[g, real].max(-1), kind="stable")]
        counts, dropped = np.zeros(E), 0
        for j in range(k):  # k-major
            for s in real:
                e = choice[s, j]
                if cap is None or counts[e] < cap:
                    counts[e] += 1
                    dense[g, s, e] = weight[s, j]
                else:
                    dropped += 1
        n = mask[g].sum()
        f = np.zeros(E)
        for s in np.flatnonzero(mask[g]):
            f[choice[s]] += 1.0 / n
        big_p = probs[g][mask[g]].astype(np.float64).mean(0)
        d = _common_metrics(logits[g], probs[g], mask[g])
        d.update(
            load_balancing_loss=E * np.sum(f * big_p),
            expert_load=counts / counts.sum(),
            dropped_fraction=dropped / (n * k),
        )
        per_group.append(d)
    return dense, _mean_metrics(per_group), cap


# ----------------------------------------------------------------------------- harness
def _inputs(seed, G, S, E, masked, full_pad_group=False):
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.normal(size=(G, S, E))).astype(np.float32)
    mask = rng.random((G, S)) > 0.3 if masked else np.ones((G, S), bool)
    mask[:, 0] = True
    if full_pad_group:
        mask[-1] = False
    return logits, mask


def _route(router, logits, mask, masked):
    dec = router.route(
        jnp.asarray(logits), token_mask=jnp.asarray(mask) if masked else None
    )
    dense = np.asarray(routing.dense_combine_weights(dec))
    metrics = {name: np.asarray(getattr(dec.metrics, name)) for name in METRICS}
    return dense, metrics


EC_CASES = [
    (norm, c, mult, masked)
    for norm in (False, True)
    for c, mult, masked in [
        (0.5, 1, True),
        (1.0, 4, False),
        (2.0, 1, True),
        (100.0, 1, True),
    ]
]
TOPK_CASES = [
    (o, rn, k, c, mult, bpr, masked)
    for o, rn, k in itertools.product(
        ("softmax_then_topk", "topk_then_softmax"), (False, True), (1, 2)
    )
    for c, mult, bpr, masked in [
        (0.5, 1, False, False),
        (1.0, 1, False, True),
        (None, 1, False, True),
        (1.0, 4, False, False),
        (0.5, 1, True, True),
        (1.0, 1, True, False),
    ]
]
SHAPE = (2, 24, 8)


@functools.cache
def run_ec(norm, c, mult, masked, full_pad_group=False, seed=None):
    if seed is None:
        seed = EC_CASES.index((norm, c, mult, masked))
    logits, mask = _inputs(seed, *SHAPE, masked or full_pad_group, full_pad_group)
    r = routing.ExpertChoiceRouter(
        num_experts=SHAPE[2],
        capacity_factor=c,
        capacity_multiple=mult,
        normalize_combine_weights=norm,
    )
    return (
        r,
        mask,
        _route(r, logits, mask, masked or full_pad_group),
        ref_expert_choice(logits, mask, c, mult, norm),
    )


@functools.cache
def run_topk(
    ordering, renorm, k, c, mult, bpr, masked, full_pad_group=False, seed=None
):
    if seed is None:
        seed = 100 + TOPK_CASES.index((ordering, renorm, k, c, mult, bpr, masked))
    logits, mask = _inputs(seed, *SHAPE, masked or full_pad_group, full_pad_group)
    r = routing.TopKRouter(
        num_experts=SHAPE[2],
        k=k,
        capacity_factor=c,
        capacity_multiple=mult,
        ordering=ordering,
        renormalize=renorm,
        batch_prioritized=bpr,
        causal=False,
    )
    ref = ref_topk(logits, mask, k, c, mult, ordering, renorm, bpr)
    return r, mask, _route(r, logits, mask, masked or full_pad_group), ref


def _check_metrics(ours, ref):
    for name in METRICS:
        np.testing.assert_allclose(
            ours[name], ref[name], rtol=RTOL, atol=ATOL, err_msg=name
        )


def _check_capacity(r, mask, dense, ref_cap):
    assert r.capacity(mask.shape[1]) == ref_cap
    assert np.all(dense[~mask] == 0), "padding tokens must receive zero weight"
    if ref_cap is not None:
        assert (dense != 0).sum(axis=1).max() <= ref_cap


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("kind", "kwargs", "group_size", "expected"),
    [
        ("ec", {"num_experts": 32, "capacity_factor": 2.0}, 4096, 256),
        ("topk", {"num_experts": 32, "k": 2, "capacity_factor": 1.25}, 4096, 320),
        (
            "ec",
            {"num_experts": 4, "capacity_factor": 1.0, "capacity_multiple": 4},
            10,
            4,
        ),  # ceil(2.5)=3 -> 4
        (
            "ec",
            {"num_experts": 2, "capacity_factor": 1.5, "capacity_multiple": 4},
            6,
            6,
        ),  # 5 -> 8 -> clip 6
        ("ec", {"num_experts": 4, "capacity_factor": 100.0}, 8, 8),  # clip to S
        (
            "topk",
            {"num_experts": 8, "k": 2, "capacity_factor": 0.5, "capacity_multiple": 4},
            24,
            4,
        ),  # 3 -> 4
        (
            "topk",
            {"num_experts": 8, "k": 1, "capacity_factor": 1.0, "capacity_multiple": 8},
            72,
            16,
        ),  # 9 -> 16
        ("topk", {"num_experts": 8, "k": 2, "capacity_factor": None}, 24, None),
    ],
)
def test_capacity_values(kind, kwargs, group_size, expected):
    cls = routing.ExpertChoiceRouter if kind == "ec" else routing.TopKRouter
    assert cls(**kwargs).capacity(group_size) == expected


@pytest.mark.parametrize(("norm", "c", "mult", "masked"), EC_CASES)
def test_expert_choice_dense(norm, c, mult, masked):
    r, mask, (dense, _), (ref_dense, _, ref_cap) = run_ec(norm, c, mult, masked)
    np.testing.assert_allclose(dense, ref_dense, rtol=RTOL, atol=ATOL)
    _check_capacity(r, mask, dense, ref_cap)


@pytest.mark.parametrize(("norm", "c", "mult", "masked"), EC_CASES)
def test_expert_choice_metrics(norm, c, mult, masked):
    _, _, (_, metrics), (_, ref_metrics, _) = run_ec(norm, c, mult, masked)
    _check_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("norm", [False, True])
def test_expert_choice_full_capacity_takes_every_real_token(norm):
    _, mask, (dense, metrics), (_, _, cap) = run_ec(norm, 100.0, 1, True)
    assert cap == SHAPE[1]
    assert np.all((dense > 0) == mask[..., None])
    if norm:
        np.testing.assert_allclose(dense.sum(-1)[mask], 1.0, rtol=RTOL, atol=ATOL)
    assert float(metrics["dropped_fraction"]) == 0.0


@pytest.mark.parametrize(
    ("ordering", "renorm", "k", "c", "mult", "bpr", "masked"), TOPK_CASES
)
def test_topk_dense(ordering, renorm, k, c, mult, bpr, masked):
    r, mask, (dense, _), (ref_dense, _, ref_cap) = run_topk(
        ordering, renorm, k, c, mult, bpr, masked
    )
    np.testing.assert_allclose(dense, ref_dense, rtol=RTOL, atol=ATOL)
    _check_capacity(r, mask, dense, ref_cap)


@pytest.mark.parametrize(
    ("ordering", "renorm", "k", "c", "mult", "bpr", "masked"), TOPK_CASES
)
def test_topk_metrics(ordering, renorm, k, c, mult, bpr, masked):
    _, _, (_, metrics), (_, ref_metrics, _) = run_topk(
        ordering, renorm, k, c, mult, bpr, masked
    )
    _check_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("kind", ["ec", "topk_then_softmax", "softmax_then_topk"])
def test_fully_padded_group_gets_zero_weight(kind):
    if kind == "ec":
        r, mask, (dense, _), (ref_dense, _, cap) = run_ec(
            False, 1.0, 1, False, full_pad_group=True, seed=5
        )
    else:
        r, mask, (dense, _), (ref_dense, _, cap) = run_topk(
            kind, False, 2, 1.0, 1, True, False, True, seed=7
        )
    assert not mask[-1].any()
    assert np.all(dense[-1] == 0)
    np.testing.assert_allclose(dense, ref_dense, rtol=RTOL, atol=ATOL)
    _check_capacity(r, mask, dense, cap)


@pytest.mark.parametrize("ordering", ["softmax_then_topk", "topk_then_softmax"])
def test_batch_prioritized_changes_routing(ordering):
    _, _, (plain, _), (ref_plain, _, _) = run_topk(
        ordering, False, 2, 0.5, 1, False, True, seed=3
    )
    _, _, (bpr, _), (ref_bpr, _, _) = run_topk(
        ordering, False, 2, 0.5, 1, True, True, seed=3
    )
    assert not np.allclose(ref_plain, ref_bpr)  # BPR matters in the reference ...
    assert not np.allclose(plain, bpr)  # ... and in the implementation
    np.testing.assert_allclose(bpr, ref_bpr, rtol=RTOL, atol=ATOL)


def test_batch_prioritized_hand_case():
    # Both tokens pick expert 0, capacity = ceil(0.5 * 2 * 1 / 2) = 1.  Token 0 has p=[.6,.4], token 1 p=[.9,.1]:
    # position order keeps token 0, BPR (top-1 prob descending) keeps token 1.
    logits = jnp.log(jnp.array([[[0.6, 0.4], [0.9, 0.1]]], jnp.float32))
    kw = {
        "num_experts": 2,
        "k": 1,
        "capacity_factor": 0.5,
        "capacity_multiple": 1,
        "ordering": "softmax_then_topk",
    }
    plain = np.asarray(
        routing.dense_combine_weights(routing.TopKRouter(**kw).route(logits))
    )
    bpr = np.asarray(
        routing.dense_combine_weights(
            routing.TopKRouter(**kw, batch_prioritized=True).route(logits)
        )
    )
    np.testing.assert_allclose(plain, [[[0.6, 0.0], [0.0, 0.0]]], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(bpr, [[[0.0, 0.0], [0.9, 0.0]]], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("k", "c", "expected"),
    [
        # p0 = softmax([ln3, 0]) = [.75, .25], p1 = softmax([ln1.5, 0]) = [.6, .4]; both top-1 = expert 0.
        # K=1: f = [1, 0], P = [.675, .325] -> LB = 2 * (1 * .675) = 1.35.  capacity ceil(.5*2*1/2)=1 drops token 1.
        (
            1,
            0.5,
            {
                "load_balancing_loss": 1.35,
                "expert_load": [1.0, 0.0],
                "dropped_fraction": 0.5,
            },
        ),
        # K=2: f = [1, 1] -> LB = 2 * (.675 + .325) = 2.0.  Dropless.
        (
            2,
            None,
            {
                "load_balancing_loss": 2.0,
                "expert_load": [0.5, 0.5],
                "dropped_fraction": 0.0,
            },
        ),
    ],
)
def test_metrics_hand_computed(k, c, expected):
    logits = jnp.array([[[math.log(3.0), 0.0], [math.log(1.5), 0.0]]], jnp.float32)
    m = (
        routing.TopKRouter(
            num_experts=2, k=k, capacity_factor=c, ordering="softmax_then_topk"
        )
        .route(logits)
        .metrics
    )
    # z = (ln(4)^2 + ln(2.5)^2) / 2; entropy = mean of H(.75,.25), H(.6,.4); top1 = (.75 + .6) / 2.
    expected = dict(
        expected, z_loss=1.3807003804956401, entropy=0.6176734058140324, top1_prob=0.675
    )
    for name, value in expected.items():
        np.testing.assert_allclose(
            np.asarray(getattr(m, name)), value, rtol=RTOL, atol=ATOL, err_msg=name
        )


def test_expert_choice_has_zero_aux_loss():
    _, _, (_, metrics), _ = run_ec(False, 1.0, 4, False)
    assert float(metrics["load_balancing_loss"]) == 0.0


def test_batch_prioritized_causal_raises():
    with pytest.raises(ValueError):
        routing.TopKRouter(
            num_experts=4, k=2, capacity_factor=1.0, batch_prioritized=True, causal=True
        )
