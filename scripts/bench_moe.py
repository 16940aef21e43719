"""Benchmark the MoE layer's data movement against the bare expert matmuls and the one-hot path.

Usage (prints one JSON object; ~5 minutes on a 2-core CPU):

    python scripts/bench_moe.py [--repeats 7] [--tokens 4096] [--dtype bfloat16] [--out F]

For each case, one group of S tokens, timing forward + backward (gradients w.r.t. all
parameters and the input), median of ``--repeats`` timed runs (``--slow-repeats`` for calls
over a second), each right after an untimed run, all in this process. The default cases
(expert choice C=2; top-2 C=1.25; dropless top-2) have E=32 experts, d=512, f=1024 gated GELU;
``--cases llama_8x_top2`` adds Llama-3-8B's MLP as 8 experts top-2 dropless (d=4096, f=14336
SwiGLU; for an accelerator). ``--dtype`` sets the activation and parameter dtype:

* ``moe_s``            our layer (index gather/scatter, or grouped matmul when dropless)
* ``onehot_s``         the same layer with the one-hot einsum reference dispatch
* ``expert_matmul_s``  only the expert MLPs on pre-gathered [E, C, d] buffers (same FLOPs)
* ``ratio_vs_matmul = moe_s / expert_matmul_s`` (goals: <= 1.10 capacity, <= 1.25 dropless)
* ``speedup_vs_onehot = onehot_s / moe_s`` (goal >= 3)
* ``achieved_gflops``  expert FLOPs (fwd + bwd = 3x forward) / moe_s

``moe_s`` uses the layer's ``dispatch="auto"`` choice, recorded as ``dispatch`` (``index`` on
CPU, ``ragged`` elsewhere); for dropless cases ``other_dispatch_s`` times the other grouped path
(``ragged``: ``jax.lax.ragged_dot``, which XLA:CPU lowers to a dense masked matmul; ``index``:
block-sparse) in the same run, and ``grouped_only_s`` the grouped matmul alone on the balanced
rows, pre-sorted (``layer_over_grouped``: the cost of routing, sorting and gathers;
``grouped_over_matmul``: the grouped matmul's padding and blocking). The dropless
``expert_matmul_s`` assumes perfectly balanced loads (S·K/E rows per expert), the least work
any dropless layer can do. Each ``*_s`` has a
``*_spread`` = (max - min) / median over its timed runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from bench_common import emit
from flax import nnx

from sparse_upcycle import host_memory, moe, routing

E, D, F = 32, 512, 1024
GATED_GELU, SWIGLU = ("gelu", "linear"), ("silu", "linear")


def _interleaved_medians(fns: dict, repeats: int, slow_repeats: int) -> dict:
    """Median seconds per function, timed round-robin so that machine noise hits all alike.

    Each timed call directly follows an untimed call of the same function, so that it reuses
    its own freed buffers instead of paying page faults for what the previous function
    allocated. Functions slower than a second (the one-hot and ragged_dot references on CPU)
    get ``slow_repeats`` timings.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            done = times[name]
            if len(done) >= slow_repeats and done[0] > 1.0:
                continue
            jax.block_until_ready(fn(*args))  # compiles in the first round
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, t in times.items():
        med = statistics.median(t)
        out[name] = med
        out[name.removesuffix("_s") + "_spread"] = (max(t) - min(t)) / med
    return out


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


def _grouped_step(layer, sizes, impl):
    graphdef, state = nnx.split(layer.expert)

    @jax.jit
    def step(state, x_Nd, cot):
        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state).grouped(x, sizes, impl) * cot)

        return jax.grad(loss, argnums=(0, 1))(state, x_Nd)

    return step, state


def bench_case(case, tokens, repeats, slow_repeats, dtype, onehot=True):
    name, router, (e, d, f, activations) = case
    key_x, key_c, key_b = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (1, tokens, d), dtype)
    cot = jax.random.normal(key_c, (1, tokens, d), dtype)

    def layer(**kw):
        return moe.MoeMlp(
            d,
            f,
            router,
            group_size=tokens,
            activations=activations,
            dtype=dtype,
            param_dtype=dtype,
            rngs=nnx.Rngs(0),
            **kw,
        )

    auto = moe.resolve_dispatch("auto")
    fns = {}
    for key, kw in [("moe_s", {}), ("onehot_s", {"dispatch": "onehot"})]:
        if key == "onehot_s" and not onehot:
            continue
        step, state = _layer_step(layer(**kw))
        fns[key] = (step, (state, x, cot))
    cap = router.capacity(tokens)
    other = {"index": "ragged", "ragged": "index"}[auto]
    if cap is None:  # dropless: also time the other grouped-matmul path
        step, state = _layer_step(layer(dispatch=other))
        fns["other_dispatch_s"] = (step, (state, x, cot))
    rows_per_expert = cap if cap is not None else tokens * router.k // e  # dropless: balanced
    buf = jax.random.normal(key_b, (1, e, rows_per_expert, d), dtype)
    step, state = _matmul_step(layer())
    fns["expert_matmul_s"] = (step, (state, buf, buf))
    if cap is None:  # the grouped matmul alone, on the same balanced rows, pre-sorted
        impl = "ragged_dot" if auto == "ragged" else "blocked"
        sizes = jnp.full((e,), rows_per_expert, jnp.int32)
        step, state = _grouped_step(layer(), sizes, impl)
        rows = buf.reshape(e * rows_per_expert, d)
        fns["grouped_only_s"] = (step, (state, rows, rows))

    result = {"case": name, "E": e, "d": d, "f": f, "dispatch": auto}
    result.update(_interleaved_medians(fns, repeats, slow_repeats))
    n_mats = 3 if len(activations) == 2 else 2
    flops = 3 * (2 * e * rows_per_expert * d * f * n_mats)  # backward = 2x forward
    result.update(
        capacity=cap,
        rows_computed=E * rows_per_expert,
        ratio_vs_matmul=result["moe_s"] / result["expert_matmul_s"],
        achieved_gflops=flops / result["moe_s"] / 1e9,
        matmul_gflops=flops / result["expert_matmul_s"] / 1e9,
    )
    if onehot:
        result["speedup_vs_onehot"] = result["onehot_s"] / result["moe_s"]
    if cap is None:
        result["other_dispatch"] = other
        result["other_ratio_vs_matmul"] = result["other_dispatch_s"] / result["expert_matmul_s"]
        # Where the dropless excess goes: routing + sort + gathers (layer over grouped alone)
        # and the grouped matmul's own padding and blocking (grouped alone over bare matmuls).
        result["layer_over_grouped"] = result["moe_s"] / result["grouped_only_s"]
        result["grouped_over_matmul"] = result["grouped_only_s"] / result["expert_matmul_s"]
    return result


def main():
    # glibc settings as the command line applies them (SPARSE_UPCYCLE_MALLOC=system: defaults)
    malloc = "tuned" if host_memory.tune() else "system"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slow-repeats", type=int, default=3, help="for calls over 1 s")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--cases", default="all", help="comma-separated case names, or all")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-onehot", action="store_true", help="skip the one-hot reference")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    paper = (E, D, F, GATED_GELU)
    known = [
        ("expert_choice_C2", routing.ExpertChoiceRouter(E, capacity_factor=2.0), paper),
        ("top2_C1.25", routing.TopKRouter(E, k=2, capacity_factor=1.25), paper),
        ("top2_dropless", routing.TopKRouter(E, k=2, capacity_factor=None), paper),
        (
            "llama_8x_top2",
            routing.TopKRouter(8, k=2, capacity_factor=None, ordering="topk_then_softmax"),
            (8, 4096, 14336, SWIGLU),
        ),
    ]
    cases = known[:3]
    if args.cases != "all":
        wanted = args.cases.split(",")
        unknown = set(wanted) - {c[0] for c in known}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}; known: {[c[0] for c in known]}")
        cases = [c for c in known if c[0] in wanted]
    dtype = jnp.dtype(args.dtype)
    report = {
        "config": {
            "S": args.tokens,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "timing": "median fwd+bwd",
        },
        "machine": {
            "platform": platform.platform(),
            "malloc": malloc,
            "cpu_count": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__,
        },
        "cases": [
            bench_case(c, args.tokens, args.repeats, args.slow_repeats, dtype, not args.no_onehot)
            for c in cases
        ],
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
