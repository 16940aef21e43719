"""Benchmark the MoE layer's data movement against the bare expert matmuls and the one-hot path.

Usage (prints one JSON object; ~5 minutes on a 2-core CPU):

    python scripts/bench_moe.py [--repeats 7] [--tokens 4096] [--out bench_moe.json]

For each case (expert choice C=2; top-2 C=1.25; dropless top-2), with E=32 experts, one group
of S tokens, d=512, f=1024 gated GELU, fp32, timing forward + backward (gradients w.r.t. all
parameters and the input), median of ``--repeats`` timed runs (``--slow-repeats`` for calls
over a second), each right after an untimed run, all in this process:

* ``moe_s``            our layer (index gather/scatter, or grouped matmul when dropless)
* ``onehot_s``         the same layer with the one-hot einsum reference dispatch
* ``expert_matmul_s``  only the expert MLPs on pre-gathered [E, C, d] buffers (same FLOPs)
* ``ratio_vs_matmul = moe_s / expert_matmul_s`` (goal <= 1.15)
* ``speedup_vs_onehot = onehot_s / moe_s`` (goal >= 3)
* ``achieved_gflops``  expert FLOPs (fwd + bwd = 3x forward) / moe_s

Dropless top-K uses the layer's ``grouped_matmul="auto"`` choice (``blocked`` on CPU) for
``moe_s``; ``ragged_dot_s`` times ``jax.lax.ragged_dot`` in the same run, which XLA:CPU lowers
to a dense masked matmul. The dropless ``expert_matmul_s`` assumes perfectly balanced loads
(S·K/E rows per expert), the least work any dropless layer can do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle import moe, routing

E, D, F = 32, 512, 1024


def _interleaved_medians(fns: dict, repeats: int, slow_repeats: int) -> dict:
    """Median seconds per function, timed round-robin so that machine noise hits all alike.

    Each timed call directly follows an untimed call of the same function, so that it reuses
    its own freed buffers instead of paying page faults for what the previous function
    allocated. Functions slower than a second (the one-hot and ragged_dot references on CPU)
    get ``slow_repeats`` timings.
    """
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            done = times[name]
            if len(done) >= slow_repeats and done[0] > 1.0:
                continue
            jax.block_until_ready(fn(*args))  # compiles in the first round
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _layer_step(layer):
    graphdef, state = nnx.split(layer)

    @jax.jit
    def step(state, x, cot):
        def loss(state, x):
            y, _ = nnx.merge(graphdef, state)(x)
            return jnp.sum(y * cot)

        return jax.grad(loss, argnums=(0, 1))(state, x)

    return step, state


def _matmul_step(layer):
    graphdef, state = nnx.split(layer.expert)

    @jax.jit
    def step(state, x_GECd, cot):
        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x) * cot)

        return jax.grad(loss, argnums=(0, 1))(state, x_GECd)

    return step, state


def bench_case(name, router, tokens, repeats, slow_repeats):
    key_x, key_c, key_b = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (1, tokens, D), jnp.float32)
    cot = jax.random.normal(key_c, (1, tokens, D), jnp.float32)

    def layer(**kw):
        return moe.MoeMlp(D, F, router, group_size=tokens, rngs=nnx.Rngs(0), **kw)

    fns = {}
    for key, kw in [("moe_s", {}), ("onehot_s", {"dispatch": "onehot"})]:
        step, state = _layer_step(layer(**kw))
        fns[key] = (step, (state, x, cot))
    cap = router.capacity(tokens)
    if cap is None:  # dropless: also time XLA's ragged_dot next to the "auto" choice
        step, state = _layer_step(layer(grouped_matmul="ragged_dot"))
        fns["ragged_dot_s"] = (step, (state, x, cot))
    rows_per_expert = cap if cap is not None else tokens * router.k // E  # dropless: balanced
    buf = jax.random.normal(key_b, (1, E, rows_per_expert, D), jnp.float32)
    step, state = _matmul_step(layer())
    fns["expert_matmul_s"] = (step, (state, buf, buf))

    result = {"case": name, **_interleaved_medians(fns, repeats, slow_repeats)}
    flops = 3 * (2 * E * rows_per_expert * D * F * 3)  # 3 matmuls; backward = 2x forward
    result.update(
        capacity=cap,
        rows_computed=E * rows_per_expert,
        ratio_vs_matmul=result["moe_s"] / result["expert_matmul_s"],
        speedup_vs_onehot=result["onehot_s"] / result["moe_s"],
        achieved_gflops=flops / result["moe_s"] / 1e9,
    )
    if cap is None:
        result["grouped_matmul"] = moe.resolve_grouped_matmul("auto")
        result["ragged_dot_ratio_vs_matmul"] = result["ragged_dot_s"] / result["expert_matmul_s"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slow-repeats", type=int, default=3, help="for calls over 1 s")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--cases", default="all", help="comma-separated case names, or all")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    cases = [
        ("expert_choice_C2", routing.ExpertChoiceRouter(E, capacity_factor=2.0)),
        ("top2_C1.25", routing.TopKRouter(E, k=2, capacity_factor=1.25)),
        ("top2_dropless", routing.TopKRouter(E, k=2, capacity_factor=None)),
    ]
    if args.cases != "all":
        wanted = args.cases.split(",")
        unknown = set(wanted) - {name for name, _ in cases}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}; known: {[n for n, _ in cases]}")
        cases = [(name, router) for name, router in cases if name in wanted]
    report = {
        "config": {
            "E": E,
            "S": args.tokens,
            "d": D,
            "f": F,
            "mlp": "gated gelu",
            "dtype": "float32",
            "repeats": args.repeats,
            "timing": "median fwd+bwd",
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__,
        },
        "cases": [bench_case(n, r, args.tokens, args.repeats, args.slow_repeats) for n, r in cases],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
