"""Where an MoE layer's time goes, by XLA operation: a profile of bench_moe's cases (JSON).

    python scripts/profile_moe.py [--cases expert_choice_C2,top2_C1.25,top2_dropless]
        [--tokens 4096] [--steps 5] [--out F]

Each case's jitted forward + backward step (``bench_moe``'s layer, shapes and dtype) runs
``--steps`` times under ``jax.profiler.trace`` (a Perfetto trace, no TensorBoard needed); the
trace's events are the compiled program's operations (XLA:CPU thunks: a dot, a fusion, a
gather, a scatter, a sort, a copy, ...). Each is classed by what it computes, read from the
optimised HLO of the same executable (a fusion by the operations inside it: one holding a dot
is a matmul; else a gather, scatter, sort, reduce; else elementwise), with the source-level
``op_name`` XLA keeps in its metadata (the jaxpr path: ``jvp(end,edf->enf)/dot_general`` is the
forward of an expert einsum, ``transpose(jvp(...))`` its backward). The bare expert matmuls
(``bench_moe``'s ``expert_matmul_s`` step on pre-gathered buffers of the same rows) are
profiled alike, so that "the rest" of ``bench_moe``'s ratio has names. Reported: seconds per
step by class, the share of the step, the costliest operations, and the median wall time of
the same steps run untraced (wall minus the operations' sum: time between operations).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import emit  # noqa: E402
from bench_moe import GATED_GELU, D, E, F, _layer_step, _matmul_step  # noqa: E402
from flax import nnx  # noqa: E402

from sparse_upcycle import host_memory, moe, routing  # noqa: E402

CASES = {
    "expert_choice_C2": lambda: routing.ExpertChoiceRouter(E, capacity_factor=2.0),
    "top2_C1.25": lambda: routing.TopKRouter(E, k=2, capacity_factor=1.25),
    "top2_dropless": lambda: routing.TopKRouter(E, k=2, capacity_factor=None),
}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+(?:\s*\{[^}]*\})?\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _hlo_tables(text: str):
    """(instruction -> opcode, instruction -> called computation, computation -> opcodes,
    instruction -> op_name) of an HLO module's text."""
    opcode, calls, body, names = {}, {}, collections.defaultdict(list), {}
    comp = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            comp = m[1]
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, op = m[1], m[2]
        opcode[name] = op
        if comp is not None:
            body[comp].append(op)
        c = _CALLS.search(line)
        if c:
            calls[name] = c[1]
        n = _OPNAME.search(line)
        if n:
            names[name] = n[1]
    return opcode, calls, body, names


def _kind(name: str, opcode, calls, body) -> str:
    op = opcode.get(name, "")
    ops = set(body.get(calls.get(name, ""), [])) if op in ("fusion", "call") else {op}
    for wanted, label in (
        ("dot", "matmul"),
        ("convolution", "matmul"),
        ("scatter", "scatter"),
        ("gather", "gather"),
        ("sort", "sort"),
        ("dynamic-slice", "gather"),
        ("dynamic-update-slice", "scatter"),
        ("reduce", "reduce"),
        ("copy", "copy/transpose"),
        ("transpose", "copy/transpose"),
    ):
        if wanted in ops:
            return label
    if op in ("while", "conditional"):
        return "loop"
    return "elementwise" if ops else "other"


def _trace_events(directory: str) -> list[dict]:
    files = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    files += glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"no trace written under {directory}")
    with gzip.open(sorted(files)[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _profile(compiled, args, steps: int) -> dict:
    """Seconds per step of each operation of ``compiled`` (traced ``steps`` times), with the
    HLO tables to class them."""
    tables = _hlo_tables(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(compiled(*args))
        events = _trace_events(tmp)
    walls = []
    for _ in range(steps):  # the same steps untraced, for the time between the operations
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        walls.append(time.perf_counter() - t0)
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        op = e["name"].split(":")[0].strip()
        if op in tables[0]:
            per_op[op] += e["dur"] / 1e6 / steps
    return {"per_op": per_op, "tables": tables, "wall": statistics.median(walls)}


def _summary(profiled: dict, top_n: int = 12) -> dict:
    per_op = profiled["per_op"]
    opcode, calls, body, names = profiled["tables"]
    total = sum(per_op.values())
    by_kind: dict[str, float] = collections.defaultdict(float)
    for op, s in per_op.items():
        by_kind[_kind(op, opcode, calls, body)] += s
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:top_n]
    return {
        "wall_seconds_per_step": round(profiled["wall"], 4),
        "ops_seconds_per_step": round(total, 4),
        "ops_traced": len(per_op),
        "by_kind": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "by_kind_share": {k: round(v / total, 3) for k, v in by_kind.items()} if total else {},
        "top_ops": [
            {
                "op": op,
                "kind": _kind(op, opcode, calls, body),
                "seconds": round(s, 4),
                "op_name": names.get(op, "")[-100:],
            }
            for op, s in top
        ],
    }


def profile_case(name: str, tokens: int, steps: int) -> dict:
    router = CASES[name]()
    key_x, key_c, key_b = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (1, tokens, D), jnp.float32)
    cot = jax.random.normal(key_c, (1, tokens, D), jnp.float32)
    layer = moe.MoeMlp(D, F, router, group_size=tokens, activations=GATED_GELU, rngs=nnx.Rngs(0))
    step, state = _layer_step(layer)
    ours = _summary(_profile(step.lower(state, x, cot).compile(), (state, x, cot), steps))
    cap = router.capacity(tokens)
    rows = cap if cap is not None else tokens * router.k // E
    buf = jax.random.normal(key_b, (1, E, rows, D), jnp.float32)
    bare_step, bare_state = _matmul_step(layer)
    args = (bare_state, buf, buf)
    bare = _summary(_profile(bare_step.lower(*args).compile(), args, steps))
    excess = ours["ops_seconds_per_step"] / bare["ops_seconds_per_step"]
    return {
        "case": name,
        "layer_over_bare_matmuls_ops": round(excess, 3),
        "layer_over_bare_matmuls_wall": round(
            ours["wall_seconds_per_step"] / bare["wall_seconds_per_step"], 3
        ),
        "layer": ours,
        "bare_expert_matmuls": bare,
    }


def main() -> None:
    host_memory.tune()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    wanted = args.cases.split(",")
    unknown = set(wanted) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; known: {list(CASES)}")
    report = {
        "config": {"S": args.tokens, "E": E, "d": D, "f": F, "steps": args.steps},
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "cases": [profile_case(c, args.tokens, args.steps) for c in wanted],
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
