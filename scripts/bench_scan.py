"""Benchmark ``model.scan_layers``: compile time of a 24-layer model's train step, scanned vs
unrolled, with the memory ``plan`` finds for both.

Usage (prints one JSON object; ~15 minutes on a 2-core CPU with the defaults):

    python scripts/bench_scan.py [--repeats 3] [--families t5,vit,decoder] [--out F.json]

Models: the ``:tiny`` variants (tiny widths, the paper configs' routing) of
``configs/t5_base_upcycle.py``, ``vit_b16_upcycle.py`` and ``llama_moe_8x_top2.py`` made 24
blocks deep (T5: 24 encoder + 24 decoder layers). T5 and ViT have MoE in every other block, so
a scanned stack is 12 repeats of a (dense, MoE) pair; the Llama config's blocks are all MoE.
The step is the whole jitted training step (forward, backward, optimizer update) as ``plan``
compiles it for one CPU device
(``sparse_upcycle.plan.plan``): the same program the training loop runs. Compile time hardly
depends on widths, so tiny widths isolate what depth costs.

Reported per family (medians of ``--repeats`` interleaved compilations, persistent
compilation cache off): ``lower_s`` (tracing + lowering to StableHLO), ``compile_s`` (XLA),
their sum ``total_s`` for unrolled and scanned, ``ratio`` = scanned / unrolled total (goal
≤ 0.3); ``grad_total_s`` and ``grad_ratio``, the same for the loss gradient alone (no optimizer
update: the update runs over every per-block parameter leaf, scanned or not, so it is the part
of the step that scanning does not shrink); and both programs' per-device temporaries (the
scanned step holds a stacked copy of the stack's parameters and of their gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sparse_upcycle import models, plan  # noqa: E402
from sparse_upcycle.config import load_config  # noqa: E402
from sparse_upcycle.task import make_loss_fn, resolve_model  # noqa: E402

CONFIGS = {
    "t5": "t5_base_upcycle.py:tiny",
    "vit": "vit_b16_upcycle.py:tiny",
    "decoder": "llama_moe_8x_top2.py:tiny",
}
DEPTH = {
    "t5": ["overrides.num_encoder_layers=24", "overrides.num_decoder_layers=24"],
    "vit": ["overrides.depth=24"],
    "decoder": ["overrides.num_hidden_layers=24"],
}


def _config(family: str, scanned: bool):
    flags = [f"--config.model.{f}" for f in DEPTH[family]]
    flags.append(f"--config.model.scan_layers={scanned}")
    return load_config(os.path.join(ROOT, "configs", CONFIGS[family]), flags)


def _grad_seconds(config) -> float:
    """Lowering + compiling the gradient of the loss alone (no optimizer update)."""
    spec = resolve_model(config)
    model = nnx.eval_shape(lambda: models.get(spec.family).Model(spec.config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    loss_fn = make_loss_fn(spec, graphdef, state, config.get("loss", {}))
    structure = plan._batch_structure(spec.family, spec.config, config.data)
    n = config.data.batch_size
    batch = {k: jax.ShapeDtypeStruct((n, *s), jnp.dtype(d)) for k, (s, d) in structure.items()}
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, jax.random.key(0), True)[0]))
    start = time.perf_counter()
    grad.lower(nnx.to_pure_dict(state), batch).compile()
    return time.perf_counter() - start


def _once(family: str, scanned: bool) -> dict:
    config = _config(family, scanned)
    r = plan.plan(config, 1, 2**40, name=f"{family} scanned={scanned}")
    return {
        "lower_s": r["lower_s"],
        "compile_s": r["compile_s"],
        "total_s": r["lower_s"] + r["compile_s"],
        "grad_total_s": _grad_seconds(config),
        "temporaries": r["per_device"]["temporaries"],
        "params": r["per_device"]["params"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--families", default="t5,vit,decoder")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    out: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "jax": jax.__version__,
        "repeats": args.repeats,
        "depth": 24,
        "families": {},
    }
    for family in args.families.split(","):
        runs: dict[str, list[dict]] = {"unrolled": [], "scanned": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            runs["unrolled"].append(_once(family, False))
            runs["scanned"].append(_once(family, True))
        row: dict = {}
        for kind, rs in runs.items():
            row[kind] = {
                k: statistics.median(r[k] for r in rs)
                for k in (
                    "lower_s",
                    "compile_s",
                    "total_s",
                    "grad_total_s",
                    "temporaries",
                    "params",
                )
            }
            row[kind]["total_s_all"] = [round(r["total_s"], 3) for r in rs]
        row["ratio"] = round(row["scanned"]["total_s"] / row["unrolled"]["total_s"], 3)
        row["compile_ratio"] = round(row["scanned"]["compile_s"] / row["unrolled"]["compile_s"], 3)
        row["grad_ratio"] = round(
            row["scanned"]["grad_total_s"] / row["unrolled"]["grad_total_s"], 3
        )
        out["families"][family] = row
        print(json.dumps({family: row}), file=sys.stderr, flush=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
