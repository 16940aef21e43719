"""Scan over layers: ``model.scan_layers``.

With ``scan_layers=True`` a family runs its stack of blocks as one ``jax.lax.scan`` instead of
a Python loop, so the compiler sees the block once rather than ``depth`` times (compile time
and program size no longer grow with depth; ``scripts/bench_scan.py`` measures it).

The blocks of a stack need not all be alike: the paper's layout alternates dense and MoE
blocks. ``segments`` finds the shortest *unit* of consecutive blocks that repeats through the
whole stack (two blocks for ``every_other``, one when all blocks are alike) and ``run`` scans
over the units, each step running the unit's blocks in order. A stack with no shorter unit
(``moe.layers = "last_n:6"`` of 12, or a list of indices) is cut into runs of alike blocks
instead, each run its own scan (a run of one block is called directly).

Parameters stay where they are. The model keeps one module per block at the source's paths
(T5X ``layers_i``, big_vision ``encoderblock_i``, HF ``layers.i``), and so do the train
state, its optimizer slots and every checkpoint: the per-block parameters are stacked
(``jnp.stack``) inside the traced forward, and autodiff slices the stacked gradient back to
the blocks. The price is one stacked copy of the stack's parameters, and one of their
gradients, among the step's temporaries (``plan`` shows it); the function, randomness and
metrics are the unrolled stack's (``tests/test_scan.py``: logits and gradients within 1e-5).

Randomness. A block's keys come from its layer index (``fold_in(key, i)``) or, for T5, from
a running key count that the scan carries, so a scanned stack draws the same dropout masks and
router noise as the unrolled one.

Rematerialisation (``models/remat.py``) applies per block inside the scan, as
``jax.checkpoint`` with the same policy (``prevent_cse=False``: scan already keeps the
recomputation from being merged with the forward, as ``jax.checkpoint``'s documentation says).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle.models import remat as remat_lib


def unit_length(kinds: Sequence[Any]) -> int:
    """The length p of the shortest unit that repeats through the stack: the least p dividing
    ``len(kinds)`` with block i built like block i mod p (``len`` when there is none)."""
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
            return p
    return n


def segments(kinds: Sequence[Any]) -> list[tuple[int, int, int]]:
    """How ``run`` scans a stack whose block i is built as ``kinds[i]`` (any comparable
    values): ``(start, unit, repeats)`` triples covering it in order. One segment of the
    shortest repeating unit when there is one shorter than the stack; otherwise a segment per
    run of alike blocks (unit 1)."""
    n = len(kinds)
    p = unit_length(kinds)
    if p < n or n <= 1:
        return [(0, p, n // p)] if n else []
    out: list[tuple[int, int, int]] = []
    for i, kind in enumerate(kinds):
        if out and kinds[out[-1][0]] == kind:
            start, _, repeats = out[-1]
            out[-1] = (start, 1, repeats + 1)
        else:
            out.append((i, 1, 1))
    return out


def run(
    blocks: Sequence[nnx.Module],
    body: Callable[[nnx.Module, Any, jax.Array], tuple[Any, Any]],
    carry: Any,
    *,
    remat: str = "none",
) -> tuple[Any, list]:
    """``carry`` through ``blocks`` in order, as ``jax.lax.scan``s over ``segments``.

    ``body(block, carry, i) -> (carry, metrics)`` runs block ``i`` (``i`` a traced int32
    layer index); ``carry`` is a pytree of arrays whose structure and dtypes ``body`` keeps,
    and ``metrics`` a pytree of arrays or ``None`` (the same for alike blocks). Returns the
    final carry and the blocks' non-``None`` metrics in layer order, as a Python loop
    ``for i, block in enumerate(blocks)`` would give them."""
    split = [nnx.split(b) for b in blocks]
    graphdefs = [g for g, _ in split]
    metrics: list = []

    def position(i: int) -> Callable:
        def one(state, carry, index):
            return body(nnx.merge(graphdefs[i], state), carry, index)

        if remat_lib.check(remat) == "none":
            return one
        return jax.checkpoint(one, policy=remat_lib.policy(remat), prevent_cse=False)

    for start, p, repeats in segments(graphdefs):
        steps = [position(start + j) for j in range(p)]
        if repeats == 1:  # nothing to scan over
            for j in range(p):
                carry, m = steps[j](split[start + j][1], carry, jnp.int32(start + j))
                metrics += [] if m is None else [m]
            continue
        # stacked[j]: the states of the blocks at position j of every unit, stacked on axis 0.
        stacked = [
            jax.tree.map(
                lambda *xs: jnp.stack(xs), *[split[start + r * p + j][1] for r in range(repeats)]
            )
            for j in range(p)
        ]

        def unit(carry, xs, start=start, p=p, steps=steps):
            states, r = xs
            out = []
            for j in range(p):
                carry, m = steps[j](states[j], carry, start + r * p + j)
                out.append(m)
            return carry, out

        carry, ms = jax.lax.scan(unit, carry, (stacked, jnp.arange(repeats, dtype=jnp.int32)))
        metrics += [
            jax.tree.map(lambda a, r=r: a[r], ms[j])
            for r in range(repeats)
            for j in range(p)
            if ms[j] is not None
        ]
    return carry, metrics
