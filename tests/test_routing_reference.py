"""Independent numpy reference for the routers in ``sparse_upcycle.routing``.

The reference below was written from the written routing formulas only (expert
choice, top-K token choice, capacity rounding, priority order, metrics), not from
the implementation, and the JAX routers are compared against it. Metrics are over real
tokens only: token means, pooled counts, and the per-group load-balancing loss weighted by
each group's real-token count (see ``routing.RouterMetrics``).
"""

import functools
import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_upcycle import routing

RTOL, ATOL = 1e-5, 1e-6
METRICS = ("load_balancing_loss", "z_loss", "expert_load")
METRICS += ("dropped_fraction", "entropy", "top1_prob")
SHAPE = (2, 24, 8)  # G, S, E
SM, TS = "softmax_then_topk", "topk_then_softmax"


# ---------------------------------------------------------------- reference
def ref_capacity(x, multiple, group_size):
    cap = -(-math.ceil(x) // multiple) * multiple
    return min(cap, group_size)


def _softmax(x):
    x = x.astype(np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _group_metrics(logits, probs, m, lb, counts, dropped, n_assign):
    """Sums of one group's real tokens ``m``, pooled by ``_pool``; None for an empty group."""
    if not m.any():
        return None
    x, p = logits[m].astype(np.float64), probs[m].astype(np.float64)
    mx = x.max(-1)
    lse = mx + np.log(np.exp(x - mx[:, None]).sum(-1))
    plogp = p * np.log(np.where(p > 0, p, 1.0))
    return {
        "n": m.sum(),
        "load_balancing_loss": lb * m.sum(),  # weighted by the group's real tokens
        "z_loss": np.sum(lse**2),
        "expert_load": counts.astype(np.float64),
        "dropped": dropped,
        "n_assign": n_assign,
        "entropy": np.sum(-plogp.sum(-1)),
        "top1_prob": np.sum(p.max(-1)),
    }


def _pool(per_group):
    """Metrics over real tokens: token means, pooled counts, token-weighted per-group loss."""
    per_group = [d for d in per_group if d is not None]
    total = {k: np.sum([d[k] for d in per_group], axis=0) for k in per_group[0]}
    out = {k: total[k] / total["n"] for k in ("load_balancing_loss", "z_loss", "entropy")}
    out["top1_prob"] = total["top1_prob"] / total["n"]
    out["expert_load"] = total["expert_load"] / total["expert_load"].sum()
    out["dropped_fraction"] = total["dropped"] / total["n_assign"]
    return out


def ref_expert_choice(logits, mask, c, multiple, normalize):
    G, S, E = logits.shape
    probs = _softmax(logits)
    cap = ref_capacity(c * S / E, multiple, S)
    dense = np.zeros((G, S, E), np.float32)
    per_group = []
    for g in range(G):
        for e in range(E):
            key = np.where(mask[g], probs[g, :, e], -np.inf)
            for s in np.argsort(-key, kind="stable")[:cap]:  # ties: lower position
                if mask[g, s]:
                    dense[g, s, e] = probs[g, s, e]
        counts = (dense[g] > 0).sum(0)
        unreached = np.sum(~(dense[g] > 0).any(-1)[mask[g]])
        per_group.append(
            _group_metrics(logits[g], probs[g], mask[g], 0.0, counts, unreached, mask[g].sum())
        )
    if normalize:
        denom = dense.sum(-1, keepdims=True)
        dense = np.divide(dense, denom, out=np.zeros_like(dense), where=denom > 0)
    return dense, _pool(per_group), cap


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
            key = probs[g, s] if ordering == SM else logits[g, s]
            choice[s] = np.argsort(-key, kind="stable")[:k]  # ties: lower expert
            if ordering == SM:
                weight[s] = probs[g, s, choice[s]]
            else:
                weight[s] = _softmax(logits[g, s, choice[s]])
            if renormalize:
                weight[s] = weight[s] / weight[s].sum()
        real = np.flatnonzero(mask[g])
        order = real
        if bpr:  # top-1 prob descending, ties: lower position
            order = real[np.argsort(-probs[g, real].max(-1), kind="stable")]
        counts, dropped = np.zeros(E), 0
        for j in range(k):  # k-major
            for s in order:
                e = choice[s, j]
                if cap is None or counts[e] < cap:
                    counts[e] += 1
                    dense[g, s, e] = weight[s, j]
                else:
                    dropped += 1
        n = max(len(real), 1)
        f = np.zeros(E)
        np.add.at(f, choice[real].ravel(), 1.0 / n)
        lb = E * np.sum(f * probs[g, real].astype(np.float64).mean(0)) if len(real) else 0
        metrics = _group_metrics(logits[g], probs[g], mask[g], lb, counts, dropped, n * k)
        per_group.append(metrics)
    return dense, _pool(per_group), cap


# ---------------------------------------------------------------- harness
def _inputs(seed, masked, full_pad_group):
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.normal(size=SHAPE)).astype(np.float32)
    mask = rng.random(SHAPE[:2]) > 0.3 if masked else np.ones(SHAPE[:2], bool)
    mask[:, 0] = True
    if full_pad_group:
        mask[-1] = False
    return logits, mask


def _route(router, logits, mask, masked):
    tm = jnp.asarray(mask) if masked else None
    dec = router.route(jnp.asarray(logits), token_mask=tm)
    dense = np.asarray(routing.dense_combine_weights(dec))
    return dense, {name: np.asarray(getattr(dec.metrics, name)) for name in METRICS}


EC_CASES = [
    (norm, c, mult, masked)
    for norm in (False, True)
    for c, mult, masked in [(0.5, 1, 1), (1.0, 4, 0), (2.0, 1, 1), (100.0, 1, 1)]
]
TOPK_CASES = [  # (ordering, renormalize, k, capacity_factor, multiple, bpr, masked)
    (o, rn, k, *rest)
    for o, rn, k in itertools.product((SM, TS), (False, True), (1, 2))
    for rest in [
        (0.5, 1, 0, 0),
        (1.0, 1, 0, 1),
        (None, 1, 0, 1),
        (1.0, 4, 0, 0),
        (0.5, 1, 1, 1),
        (1.0, 1, 1, 0),
    ]
]


@functools.cache
def run_ec(norm, c, mult, masked, full_pad_group=False, seed=None):
    seed = EC_CASES.index((norm, c, mult, masked)) if seed is None else seed
    logits, mask = _inputs(seed, masked or full_pad_group, full_pad_group)
    r = routing.ExpertChoiceRouter(
        num_experts=SHAPE[2],
        capacity_factor=c,
        capacity_multiple=mult,
        normalize_combine_weights=norm,
    )
    ref = ref_expert_choice(logits, mask, c, mult, norm)
    return r, mask, _route(r, logits, mask, masked or full_pad_group), ref


@functools.cache
def run_topk(o, rn, k, c, mult, bpr, masked, full_pad_group=False, seed=None):
    if seed is None:
        seed = 100 + TOPK_CASES.index((o, rn, k, c, mult, bpr, masked))
    logits, mask = _inputs(seed, masked or full_pad_group, full_pad_group)
    r = routing.TopKRouter(
        num_experts=SHAPE[2],
        k=k,
        capacity_factor=c,
        capacity_multiple=mult,
        ordering=o,
        renormalize=rn,
        batch_prioritized=bool(bpr),
        causal=False,
    )
    ref = ref_topk(logits, mask, k, c, mult, o, rn, bpr)
    return r, mask, _route(r, logits, mask, masked or full_pad_group), ref


def _check_metrics(ours, ref):
    for name in METRICS:
        np.testing.assert_allclose(ours[name], ref[name], RTOL, ATOL, err_msg=name)


def _check_dense(r, mask, dense, ref_dense, ref_cap):
    np.testing.assert_allclose(dense, ref_dense, rtol=RTOL, atol=ATOL)
    assert r.capacity(mask.shape[1]) == ref_cap
    assert np.all(dense[~mask] == 0), "padding tokens must receive zero weight"
    if ref_cap is not None:
        assert (dense != 0).sum(axis=1).max() <= ref_cap, "capacity exceeded"


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("E", "k", "c", "mult", "S", "expected"),
    [
        (32, None, 2.0, 1, 4096, 256),  # expert choice: 2 * 4096 / 32
        (32, 2, 1.25, 1, 4096, 320),  # top-2: 1.25 * 4096 * 2 / 32
        (4, None, 1.0, 4, 10, 4),  # ceil(2.5) = 3 -> 4
        (2, None, 1.5, 4, 6, 6),  # ceil(4.5) = 5 -> 8 -> clipped to S = 6
        (4, None, 100.0, 1, 8, 8),  # clipped to S
        (8, 2, 0.5, 4, 24, 4),  # 3 -> 4
        (8, 1, 1.0, 8, 72, 16),  # 9 -> 16
        (8, 2, None, 1, 24, None),  # dropless
    ],
)
def test_capacity_values(E, k, c, mult, S, expected):
    kw = {"num_experts": E, "capacity_factor": c, "capacity_multiple": mult}
    r = routing.ExpertChoiceRouter(**kw) if k is None else routing.TopKRouter(k=k, **kw)
    assert r.capacity(S) == expected


@pytest.mark.parametrize(("norm", "c", "mult", "masked"), EC_CASES)
def test_expert_choice_dense(norm, c, mult, masked):
    r, mask, (dense, _), (ref_dense, _, ref_cap) = run_ec(norm, c, mult, masked)
    _check_dense(r, mask, dense, ref_dense, ref_cap)


@pytest.mark.parametrize(("norm", "c", "mult", "masked"), EC_CASES)
def test_expert_choice_metrics(norm, c, mult, masked):
    _, _, (_, metrics), (_, ref_metrics, _) = run_ec(norm, c, mult, masked)
    _check_metrics(metrics, ref_metrics)
    assert float(metrics["load_balancing_loss"]) == 0.0


@pytest.mark.parametrize("norm", [False, True])
def test_expert_choice_full_capacity_takes_every_real_token(norm):
    _, mask, (dense, metrics), (_, _, cap) = run_ec(norm, 100.0, 1, 1)
    assert cap == SHAPE[1]
    assert np.all((dense > 0) == mask[..., None])
    np.testing.assert_allclose(dense.sum(-1)[mask], 1.0, rtol=RTOL, atol=ATOL)
    assert float(metrics["dropped_fraction"]) == 0.0


@pytest.mark.parametrize(("o", "rn", "k", "c", "mult", "bpr", "masked"), TOPK_CASES)
def test_topk_dense(o, rn, k, c, mult, bpr, masked):
    r, mask, (dense, _), (ref_dense, _, ref_cap) = run_topk(o, rn, k, c, mult, bpr, masked)
    _check_dense(r, mask, dense, ref_dense, ref_cap)


@pytest.mark.parametrize(("o", "rn", "k", "c", "mult", "bpr", "masked"), TOPK_CASES)
def test_topk_metrics(o, rn, k, c, mult, bpr, masked):
    _, _, (_, metrics), (_, ref_metrics, _) = run_topk(o, rn, k, c, mult, bpr, masked)
    _check_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("kind", ["ec", TS, SM])
def test_fully_padded_group_gets_zero_weight(kind):
    if kind == "ec":
        r, mask, (dense, ours), (ref_dense, ref, cap) = run_ec(False, 1.0, 1, 0, True, seed=5)
    else:
        r, mask, (dense, ours), (ref_dense, ref, cap) = run_topk(kind, 0, 2, 1.0, 1, 1, 0, True, 7)
    assert not mask[-1].any()
    assert np.all(dense[-1] == 0)
    _check_dense(r, mask, dense, ref_dense, cap)
    # An all-padding group neither dilutes the losses nor the load fractions.
    _check_metrics(ours, ref)
    np.testing.assert_allclose(np.sum(ours["expert_load"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("o", [SM, TS])
def test_batch_prioritized_changes_routing(o):
    _, _, (plain, _), (ref_plain, _, _) = run_topk(o, False, 2, 0.5, 1, 0, 1, seed=3)
    _, _, (bpr, _), (ref_bpr, _, _) = run_topk(o, False, 2, 0.5, 1, 1, 1, seed=3)
    assert not np.allclose(ref_plain, ref_bpr)  # BPR matters in the reference ...
    assert not np.allclose(plain, bpr)  # ... and in the implementation
    np.testing.assert_allclose(plain, ref_plain, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(bpr, ref_bpr, rtol=RTOL, atol=ATOL)


def test_batch_prioritized_hand_case():
    # Both tokens pick expert 0, capacity = ceil(0.5 * 2 * 1 / 2) = 1. Token 0 has
    # p=[.6,.4], token 1 p=[.9,.1]: position order keeps token 0, BPR keeps token 1.
    logits = jnp.log(jnp.array([[[0.6, 0.4], [0.9, 0.1]]], jnp.float32))
    kw = {"num_experts": 2, "k": 1, "capacity_factor": 0.5, "ordering": SM}
    for bpr, expected in [(False, [[0.6, 0], [0, 0]]), (True, [[0, 0], [0.9, 0]])]:
        dec = routing.TopKRouter(**kw, batch_prioritized=bpr).route(logits)
        dense = np.asarray(routing.dense_combine_weights(dec))
        np.testing.assert_allclose(dense, [expected], rtol=RTOL, atol=ATOL)


def test_ties_break_to_lower_index():
    logits = jnp.zeros(SHAPE, jnp.float32)  # every prob is exactly 1/8
    # Top-2: every token picks experts (0, 1); capacity 1 * 24 * 2 / 8 = 6 -> tokens
    # 0..5 kept (BPR ties fall back to position order).
    r = routing.TopKRouter(
        num_experts=8, k=2, capacity_factor=1.0, ordering=SM, batch_prioritized=True
    )
    expected = np.zeros(SHAPE, np.float32)
    expected[:, :6, :2] = 0.125
    dense = np.asarray(routing.dense_combine_weights(r.route(logits)))
    np.testing.assert_allclose(dense, expected, rtol=RTOL, atol=ATOL)
    # Expert choice, capacity 24 / 8 = 3: every expert takes tokens 0, 1, 2.
    r = routing.ExpertChoiceRouter(num_experts=8, capacity_factor=1.0)
    expected = np.zeros(SHAPE, np.float32)
    expected[:, :3] = 0.125
    dense = np.asarray(routing.dense_combine_weights(r.route(logits)))
    np.testing.assert_allclose(dense, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("k", "c", "expected"),
    [
        # p0 = softmax([ln3, 0]) = [.75, .25], p1 = softmax([ln1.5, 0]) = [.6, .4].
        # K=1: both pick expert 0, f = [1, 0], P = [.675, .325]
        # -> LB = 2 * (1 * .675) = 1.35; capacity ceil(.5 * 2 * 1 / 2) = 1 drops token 1.
        (
            1,
            0.5,
            {
                "load_balancing_loss": 1.35,
                "expert_load": [1, 0],
                "dropped_fraction": 0.5,
            },
        ),
        # K=2: f = [1, 1] (fraction of tokens, sums to K) -> LB = 2 * (.675 + .325) = 2.
        (
            2,
            None,
            {
                "load_balancing_loss": 2.0,
                "expert_load": [0.5, 0.5],
                "dropped_fraction": 0,
            },
        ),
    ],
)
def test_metrics_hand_computed(k, c, expected):
    logits = jnp.array([[[math.log(3.0), 0.0], [math.log(1.5), 0.0]]], jnp.float32)
    r = routing.TopKRouter(num_experts=2, k=k, capacity_factor=c, ordering=SM)
    m = r.route(logits).metrics
    # z = (ln(4)^2 + ln(2.5)^2) / 2; entropy = mean(H(.75, .25), H(.6, .4));
    # top1 = (.75 + .6) / 2.
    expected = dict(expected, z_loss=1.3807003804956401, top1_prob=0.675)
    expected["entropy"] = 0.6176734058140324
    for name, value in expected.items():
        got = np.asarray(getattr(m, name))
        np.testing.assert_allclose(got, value, rtol=RTOL, atol=ATOL, err_msg=name)


def test_batch_prioritized_causal_raises():
    with pytest.raises(ValueError):
        routing.TopKRouter(
            num_experts=4, k=2, capacity_factor=1.0, batch_prioritized=True, causal=True
        )
