"""Benchmark training steps: dense T5 vs its upcycled MoE, step time against model FLOPs.

Usage (prints one JSON object; ~5 minutes on a 2-core CPU):

    python scripts/bench_train.py [--repeats 5] [--out bench_train.json]
    # on an accelerator: T5-base size in bfloat16, MFU against the data-sheet peak
    python scripts/bench_train.py --size base --layers 12 --dtype bfloat16 --batch 64 \
        --peak-tflops 989

Models: T5 v1.1 small-size (d=512, f=1024, 6 encoder + 6 decoder layers, vocab 32128, gated
GELU, fp32) dense, and upcycled with E=32 experts in every other layer: expert choice with
C=2 in the encoder, top-2 with C=1.25 in the decoder (routing groups = each batch's tokens).
Batch 16 × 128 input / 32 target tokens of synthetic data. A step is the whole jitted training
step of ``sparse_upcycle.train`` (forward, backward, Adafactor update, donated state) on one
device, with glibc's allocator set as the command line sets it (``host_memory.tune()``;
``SPARSE_UPCYCLE_MALLOC=system`` keeps the defaults).

Reported (medians of ``--repeats`` interleaved timings, all in this process):

* ``step_s``: seconds per training step.
* ``model_flops``: analytic model FLOPs per step (``sparse_upcycle.flops``: 2 FLOPs per
  multiply-add of every matmul, forward + backward = 3 × forward; MoE layers count the E·C
  expert slots their capacity gives, filled or not, plus the router).
* ``peak_flops_per_s``: a jitted 2048² matmul in ``--dtype`` timed between the steps of this
  run (the median over repeats: the device's practical peak), or ``--peak-tflops`` (a
  data-sheet figure) when given;
  ``mfu = model_flops / step_s / peak``; ``achieved_tflops = model_flops / step_s``.
* ``forward_backward_s``: the same step without the optimizer update (the Adafactor update is
  elementwise work over all parameters, which model FLOPs do not count and upcycling
  multiplies), and its ratio over the FLOPs ratio.
* ``xla_forward_backward``: XLA's cost analysis of the compiled forward + backward (FLOPs,
  bytes accessed) and ``xla_bytes_accessed_ratio``, upcycled over dense.
* ``time_ratio / flops_ratio``: (upcycled step time / dense step time) ÷ (upcycled FLOPs /
  dense FLOPs): the cost of MoE beyond its arithmetic (goal ≤ 1.15). Goal for dense MFU: ≥ 0.45.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from bench_common import emit
from flax import nnx

from sparse_upcycle import flops, host_memory, optim
from sparse_upcycle.data import make_pipeline
from sparse_upcycle.models import t5
from sparse_upcycle.task import ModelSpec, make_loss_fn

INPUT_LEN, TARGET_LEN = 128, 32


def _spec(moe: bool, args) -> ModelSpec:
    enc = dict(num_experts=32 if moe else 0, router="expert_choice", capacity_factor=2.0)
    dec = dict(num_experts=32 if moe else 0, router="top_k", k=2, capacity_factor=1.25)
    enc.update(group_size=args.batch * INPUT_LEN, layers="every_other")
    dec.update(group_size=args.batch * TARGET_LEN, layers="every_other")
    cfg = t5.config(
        args.size,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        encoder_moe=enc,
        decoder_moe=dec,
        dtype=args.dtype,
    )
    return ModelSpec("t5", cfg, None, cfg)


def _step_fn(spec: ModelSpec):
    model = t5.T5(spec.config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    loss_fn = make_loss_fn(spec, graphdef, abstract_state, {"z_loss": 1e-4})
    tx, _ = optim.make_optimizer(optim.default_optimizer_config("adafactor"))

    def train_step(train_state, batch):
        params, opt_state = train_state
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, jax.random.key(0), True
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics["loss"]

    def grad_only(train_state, batch):  # the same step without the optimizer update
        params, opt_state = train_state
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, jax.random.key(0), True
        )
        return (grads, opt_state), loss

    state = (params, tx.init(params))
    return jax.jit(train_step, donate_argnums=0), jax.jit(grad_only), state


def _xla_cost(fn, *args) -> dict:
    """XLA's own count of the compiled call: FLOPs and bytes accessed (None where the
    backend reports none)."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list) else (cost or {})
    return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def main() -> None:
    # glibc settings as the command line applies them (SPARSE_UPCYCLE_MALLOC=system: defaults)
    malloc = "tuned" if host_memory.tune() else "system"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="small", choices=["small", "base"])
    parser.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="data-sheet peak")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.layers < 2 or args.batch < 1:
        parser.error("--layers must be >= 2 and --batch >= 1")

    data_cfg = ml_collections.ConfigDict(
        {"batch_size": args.batch, "seq_len": INPUT_LEN, "target_len": TARGET_LEN}
    )
    batch = next(make_pipeline(data_cfg, "t5", t5.config("small"), "train"))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    shapes = {k: v.shape for k, v in batch.items()}
    peaks = []  # the matmul peak is timed between the steps too, so noise hits it alike

    cases = {}
    for name, moe in (("dense", False), ("upcycled", True)):
        spec = _spec(moe, args)
        step, grad_only, state = _step_fn(spec)
        state, loss = step(state, batch)  # compile
        jax.block_until_ready((loss, grad_only(state, batch)))
        cases[name] = {"spec": spec, "step": step, "grad": grad_only, "state": state}
        cases[name]["xla"] = _xla_cost(grad_only, state, batch)
        cases[name].update(times=[], grad_times=[])
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        peaks.append(flops.measure_peak_flops(jnp.dtype(args.dtype), size=2048, repeats=3))
        for case in cases.values():
            case["state"], loss = case["step"](case["state"], batch)  # untimed warm run
            jax.block_until_ready(loss)
            t0 = time.perf_counter()
            case["state"], loss = case["step"](case["state"], batch)
            jax.block_until_ready(loss)
            case["times"].append(time.perf_counter() - t0)
            jax.block_until_ready(case["grad"](case["state"], batch))
            t0 = time.perf_counter()
            jax.block_until_ready(case["grad"](case["state"], batch))
            case["grad_times"].append(time.perf_counter() - t0)

    measured_peak = statistics.median(peaks)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "malloc": malloc},
        "device": str(jax.devices()[0]),
        "model": {"size": args.size, "layers": args.layers, "dtype": args.dtype},
        "batch": {"size": args.batch, "input_len": INPUT_LEN, "target_len": TARGET_LEN},
        "peak_flops_per_s": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else "measured matmul",
        "measured_matmul_flops_per_s": measured_peak,
        "measured_matmul_flops_per_s_all": peaks,
        "repeats": args.repeats,
    }
    for name, case in cases.items():
        step_s = statistics.median(case["times"])
        model_flops = flops.model_flops_per_step("t5", case["spec"].config, shapes)["total"]
        result[name] = {
            "step_s": step_s,
            "step_s_all": case["times"],
            "model_flops": model_flops,
            "mfu": flops.mfu(model_flops, step_s, peak),
            "achieved_tflops": model_flops / step_s / 1e12,
            "forward_backward_s": statistics.median(case["grad_times"]),
            "params": sum(x.size for x in jax.tree.leaves(case["state"][0])),
            "xla_forward_backward": case["xla"],
        }
    time_ratio = result["upcycled"]["step_s"] / result["dense"]["step_s"]
    flops_ratio = result["upcycled"]["model_flops"] / result["dense"]["model_flops"]
    result["time_ratio"] = time_ratio
    result["flops_ratio"] = flops_ratio
    result["time_ratio_over_flops_ratio"] = time_ratio / flops_ratio
    fb_ratio = result["upcycled"]["forward_backward_s"] / result["dense"]["forward_backward_s"]
    # Without the optimizer update, whose cost grows with the parameter count (the MoE has
    # ~4x the dense parameters) rather than with the model FLOPs.
    result["forward_backward_time_ratio_over_flops_ratio"] = fb_ratio / flops_ratio
    xla = [result[n]["xla_forward_backward"] for n in ("dense", "upcycled")]
    if all(x["bytes_accessed"] for x in xla):  # the step's excess follows these (README)
        result["xla_bytes_accessed_ratio"] = xla[1]["bytes_accessed"] / xla[0]["bytes_accessed"]
    result["goals"] = {
        "dense_mfu>=0.45": result["dense"]["mfu"] >= 0.45,
        "time_ratio/flops_ratio<=1.15": time_ratio / flops_ratio <= 1.15,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
