"""Training-loop benchmark: is ``train_and_evaluate`` as fast as its own jitted step?

On the tiny ViT / Fashion-MNIST compare config (``configs/compare_vit_fmnist.py:tiny``), for the
dense model (the pre-training run) and its MoE (the upcycled / from-scratch arms):

* ``bare_step_s``: the jitted train step alone, ``steps`` calls back to back on one batch, the
  state donated as in training, one wait at the end;
* ``loop_step_s``: ``train_and_evaluate`` for ``steps + 1`` steps, its own timing of steps
  2 … N+1 (data, host-to-device copies, metrics, logging and checkpoint saves included;
  evaluation excluded and reported separately as ``eval_s``);
* ``loop_efficiency``: the median over interleaved repeats of bare / loop seconds per step
  (goal ≥ 0.9);
* compile time per run: the first step's time minus a steady step, in fresh processes, without
  the persistent compilation cache, then twice with one empty cache directory (the second run
  is what every later run of a ``compare`` with the same shapes sees);
* ``malloc_speedup``: the bare step in fresh processes with glibc's default allocator settings
  (``SPARSE_UPCYCLE_MALLOC=system``) over the same with ``host_memory.tune()`` (what the CLI
  and the tests use), alternated, medians; with the page faults per step of each.

Prints one JSON object. ``--steps``/``--repeats`` trade time for noise.

    .venv/bin/python scripts/bench_loop.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "compare_vit_fmnist.py:tiny")


def run_config(arm: str, steps: int):
    """The training config of one run of the compare: ``dense`` (pre-training) or ``moe``
    (the MoE arms' model, from scratch: the same step as the upcycled arm's)."""
    from sparse_upcycle.config import load_config

    c = load_config(CONFIG, schema="compare")
    cfg = copy.deepcopy(c.train)
    cfg.init_from = "scratch"
    cfg.optimizer = copy.deepcopy(c.pretrain.optimizer)
    if arm == "moe":
        cfg.upcycle = copy.deepcopy(c.upcycle)
    cfg.total_steps = steps
    cfg.eval_every = 0  # evaluated once, at the end
    cfg.peak_flops = 1.0  # not measured: the benchmark times steps, not MFU
    return cfg


def bare_step(cfg):
    """A function timing ``steps`` calls of the jitted train step alone (compiled here)."""
    import jax

    from sparse_upcycle import sharding
    from sparse_upcycle.data import make_pipeline
    from sparse_upcycle.loop import global_batch
    from sparse_upcycle.training import build_training, make_train_step

    mesh = sharding.make_mesh(-1, 1, 1)
    t = build_training(cfg, None, mesh)
    batch = next(make_pipeline(cfg.data, t.spec.family, t.spec.config, "train"))
    batch = global_batch(batch, mesh, 1)
    step = jax.jit(
        make_train_step(t.loss_fn, t.tx, t.schedule, t.bias_updates),
        in_shardings=(t.state_sh, {k: v.sharding for k, v in batch.items()}, t.replicated),
        out_shardings=(t.state_sh, t.replicated),
        donate_argnums=0,
    )
    seed = jax.make_array_from_process_local_data(t.replicated, np.int32(cfg.seed))
    state = {"value": t.init_state(cfg.seed)}
    with jax.set_mesh(mesh):
        state["value"], metrics = step(state["value"], batch, seed)  # compile
    jax.block_until_ready(metrics)

    def seconds_per_step(steps: int) -> float:
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            for _ in range(steps):
                state["value"], metrics = step(state["value"], batch, seed)
            jax.block_until_ready((state["value"], metrics))
        return (time.perf_counter() - start) / steps

    return seconds_per_step


def loop_timing(cfg, steps: int) -> dict:
    from sparse_upcycle.train import train_and_evaluate

    cfg = copy.deepcopy(cfg)
    cfg.total_steps = steps + 1
    with tempfile.TemporaryDirectory() as workdir:
        return train_and_evaluate(cfg, workdir)["timing"]


def child_bare(arm: str, steps: int) -> None:
    """The bare step in this fresh process, allocator as ``$SPARSE_UPCYCLE_MALLOC`` says."""
    import resource

    from sparse_upcycle import host_memory

    tuned = host_memory.tune()
    timer = bare_step(run_config(arm, steps))
    timer(3)
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = timer(steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "tuned": tuned,
                "step_s": seconds,
                "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
                "kernel_s_per_step": (after.ru_stime - before.ru_stime) / steps,
            }
        )
    )


def bare_in_fresh_process(arm: str, steps: int, malloc: str) -> dict:
    env = {**os.environ, "SPARSE_UPCYCLE_MALLOC": malloc}
    out = subprocess.run(
        [sys.executable, __file__, "--child-bare", arm, "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(arm: str, steps: int) -> None:
    """One run in this fresh process; prints its timing (the parent sets the cache)."""
    import logging

    from sparse_upcycle import compile_cache, host_memory

    host_memory.tune()

    compile_cache.enable()  # as the CLI does; $SPARSE_UPCYCLE_JAX_CACHE set by the parent
    logging.getLogger("sparse_upcycle").setLevel(logging.WARNING)
    print(json.dumps(loop_timing(run_config(arm, steps), steps)))


def compile_in_fresh_process(arm: str, steps: int, cache_dir: str | None) -> dict:
    env = {**os.environ, "SPARSE_UPCYCLE_JAX_CACHE": cache_dir or ""}  # "": off
    out = subprocess.run(
        [sys.executable, __file__, "--child", arm, "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    timing = json.loads(out.stdout.strip().splitlines()[-1])
    step_s = timing["train_s"] / max(timing["steps_timed"], 1)
    return {"first_step_s": timing["first_step_s"], "compile_s": timing["first_step_s"] - step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("dense", "moe"))
    parser.add_argument("--child-bare", choices=("dense", "moe"))
    args = parser.parse_args()
    if args.child_bare:
        child_bare(args.child_bare, args.steps)
        return
    if args.child:
        child(args.child, args.steps)
        return
    from sparse_upcycle import host_memory

    host_memory.tune()  # as the CLI does
    import jax

    out = {
        "config": "configs/compare_vit_fmnist.py:tiny",
        "jax": jax.__version__,
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "steps": args.steps,
        "repeats": args.repeats,
    }
    for arm in ("dense", "moe"):
        # The persistent cache stays off in this process: every run here compiles afresh.
        cfg = run_config(arm, args.steps)
        bare_timer = bare_step(cfg)
        bare, loops = [], []
        for _ in range(args.repeats):  # interleaved, so a change in machine load hits both
            loops.append(loop_timing(cfg, args.steps))
            bare.append(bare_timer(args.steps))
        loop = [t["train_s"] / t["steps_timed"] for t in loops]
        with tempfile.TemporaryDirectory() as cache:
            cold = compile_in_fresh_process(arm, 5, cache)
            warm = compile_in_fresh_process(arm, 5, cache)
        off = compile_in_fresh_process(arm, 5, None)
        system, tuned = [], []
        for _ in range(args.repeats):
            system.append(bare_in_fresh_process(arm, 20, "system"))
            tuned.append(bare_in_fresh_process(arm, 20, "tuned"))
        out[arm] = {
            "bare_step_s": statistics.median(bare),
            "loop_step_s": statistics.median(loop),
            "loop_efficiency": statistics.median(b / s for b, s in zip(bare, loop, strict=True)),
            "eval_s": statistics.median(t["eval_s"] for t in loops),
            "first_step_s": statistics.median(t["first_step_s"] for t in loops),
            "compile_s_no_cache": off["compile_s"],
            "compile_s_cache_cold": cold["compile_s"],
            "compile_s_cache_warm": warm["compile_s"],
            "compile_cache_speedup": off["compile_s"] / max(warm["compile_s"], 1e-9),
            "bare_step_s_malloc_system": statistics.median(r["step_s"] for r in system),
            "bare_step_s_malloc_tuned": statistics.median(r["step_s"] for r in tuned),
            "malloc_speedup": statistics.median(
                a["step_s"] / b["step_s"] for a, b in zip(system, tuned, strict=True)
            ),
            "page_faults_per_step_system": statistics.median(
                r["page_faults_per_step"] for r in system
            ),
            "page_faults_per_step_tuned": statistics.median(
                r["page_faults_per_step"] for r in tuned
            ),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
