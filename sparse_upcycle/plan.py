"""``sparse-upcycle plan``: what one training step of a config needs on every device, found
by compiling the real train step for ``N`` CPU devices, before any array exists.

``plan(config, devices, hbm_bytes, headroom)`` builds the train state of ``config`` as
abstract arrays (``training.build_training``: ``nnx.eval_shape`` and ``jax.eval_shape``, no
parameter or optimizer buffer is ever allocated), jits ``training.make_train_step`` with the
shardings and donation ``loop.train_and_evaluate`` uses, lowers it on abstract inputs
(``jax.ShapeDtypeStruct`` with their ``NamedSharding``) under the mesh, and compiles it. It
reports, per device:

* parameter and optimizer-state bytes, from each leaf's shard shape (``shard_shape``);
* XLA's ``memory_analysis()`` of the compiled per-device program: arguments, outputs, the
  outputs aliased to donated arguments, temporaries, and ``peak_memory_in_bytes``;
* ``total = arguments + outputs - aliased + temporaries``, the figure the verdict compares
  with ``hbm · (1 - headroom)`` (the CPU backend's ``peak_memory_in_bytes`` has come out at
  about the arguments alone in every plan run so far, temporaries left out, so it is shown
  but not used);
* model FLOPs of the step (``flops.model_flops_per_step``: the whole step, and / N);
* the collectives of the compiled HLO (all-to-all, all-gather, reduce-scatter, all-reduce,
  collective-permute): how many ops, and the bytes of their per-device results. A count is
  static: an op inside a loop body is counted once;
* lowering and compile seconds (the command turns jax's persistent compilation cache off so
  that they are the compilation's; a library caller with the cache on may see a cache hit);
* the biggest parameter / optimizer leaves per device.

What the figures are. The program is compiled by XLA's CPU backend: its fusion, layouts and
buffer assignment are not TPU's or GPU's, so temporaries are an estimate of the accelerator's
(the argument and output sizes are exact: they follow from shapes, dtypes and shardings). The
batch has the keys, dtypes and shapes the synthetic pipeline gives for the config's
``data.batch_size`` and lengths (every pipeline yields the same keys), whatever ``data.name``.

Models that take their architecture from a checkpoint (``model.name = "checkpoint"``) read
that checkpoint's config (no tensor) from ``init_from``; without one they are refused, naming
the fix. ``run(args, overrides)`` is the command (``add_arguments`` its flags): when jax has
fewer CPU devices than ``--devices`` and its backend has started already, it runs itself again
in a subprocess with ``--xla_force_host_platform_device_count=N``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sparse_upcycle.sizes import count_collectives, format_bytes, parse_bytes

if TYPE_CHECKING:
    import ml_collections

DEFAULT_HEADROOM = 0.1
TOP = 10  # biggest consumers listed
_CHILD_ENV = "SPARSE_UPCYCLE_PLAN_CHILD"  # set in the re-executed child: never re-exec twice
# XLA:CPU removes optimization barriers (its cse_barrier_expander pass) before a CSE pass that
# then merges jax.checkpoint's backward-pass recomputation into the forward pass, so
# ``model.remat`` would save nothing here. jax.checkpoint (prevent_cse) relies on the barriers
# for accelerators; keeping them on CPU too lets the plan show what remat saves.
KEEP_REMAT: dict[str, str | bool] = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def _config_error(message: str) -> Exception:
    """A ``ConfigError`` (imported when raised: importing this module stays cheap for the
    command line's parser, which needs ``add_arguments`` only)."""
    from sparse_upcycle.config import ConfigError

    return ConfigError(message)


def _leaves(tree, shardings) -> list[tuple[str, tuple[int, ...], int, int, str]]:
    """(path, global shape, global bytes, bytes per device, spec) of every array leaf."""
    import jax

    from sparse_upcycle.checkpoints.tree import path_str

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat_sh = jax.tree_util.tree_leaves(shardings)
    if len(flat) != len(flat_sh):
        raise ValueError(f"{len(flat)} leaves but {len(flat_sh)} shardings")
    out = []
    for (path, leaf), sh in zip(flat, flat_sh, strict=True):
        shape = tuple(int(d) for d in leaf.shape)
        item = np.dtype(leaf.dtype).itemsize
        shard = tuple(sh.shard_shape(shape)) if shape else ()
        out.append(
            (path_str(path), shape, item * math.prod(shape), item * math.prod(shard), str(sh.spec))
        )
    return out


# ============================================================================================
# The inputs of the step, without arrays.
# ============================================================================================


def _batch_structure(family: str, model_config, data) -> dict[str, tuple[tuple[int, ...], str]]:
    """One example's ``{key: (shape, dtype)}``, from the synthetic pipeline's own example
    (built with a 2-token vocabulary and one class, so nothing model-sized is made)."""
    from sparse_upcycle import models
    from sparse_upcycle.data.synthetic import SyntheticSource

    task = models.get(family).TASK
    kwargs: dict = {"task": task, "split": "train", "vocab_size": 2, "num_classes": 1}
    if task == "images":
        h, w = model_config.image_size
        kwargs["image_shape"] = (h, w, model_config.num_channels)
    else:
        kwargs["seq_len"] = int(data.get("seq_len", 32))
        kwargs["target_len"] = int(data.get("target_len", 8))
    example = SyntheticSource(**kwargs).example(0)
    return {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in example.items()}


def _source(config):
    """The checkpoint whose config is the model's base (``model.name == "checkpoint"``), else
    None: the model of a named size needs no checkpoint, and none is opened."""
    if config.model.get("name") != "checkpoint":
        return None
    init_from = config.get("init_from", "scratch")
    if not init_from or init_from == "scratch":
        raise _config_error(
            "model.name='checkpoint' takes the architecture from the init_from checkpoint's "
            "config; give --config.init_from=DIR (only its config is read) or a named size "
            f"of model.family={config.model.get('family')!r} with --config.model.name=NAME"
        )
    from sparse_upcycle.init_from import open_init_source

    return open_init_source(config)


def _cpu_devices(n: int) -> list:
    import jax

    try:
        devices = jax.devices("cpu")
    except RuntimeError:
        devices = []
    if len(devices) < n:
        raise _config_error(
            f"plan --devices {n}: jax has {len(devices)} CPU devices in this process; run "
            f"`sparse-upcycle plan` (it restarts itself with {n} devices) or set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={n} before jax starts"
        )
    return devices[:n]


# ============================================================================================
# The plan.
# ============================================================================================


def plan(
    config: ml_collections.ConfigDict,
    devices: int,
    hbm_bytes: int,
    headroom: float = DEFAULT_HEADROOM,
    name: str = "",
) -> dict:
    """Compile the train step of ``config`` for ``devices`` CPU devices and size it.

    Args:
      config: a run config (``config.load_config``).
      devices: the number of devices of the mesh (``config.mesh``: one axis may be -1).
      hbm_bytes: one device's memory.
      headroom: the fraction of ``hbm_bytes`` kept free (fragmentation, runtime buffers).
      name: what to call the config in the report.

    Returns:
      The report (module docstring; ``format_report`` prints it), ``fits`` its verdict.

    Raises:
      ConfigError: an impossible mesh or batch, too few CPU devices in this process, a
        checkpoint-based model without a checkpoint.
    """
    import jax
    import jax.numpy as jnp

    from sparse_upcycle import flops as flops_lib
    from sparse_upcycle import sharding
    from sparse_upcycle.training import build_training, make_train_step

    if not 0 <= headroom < 1:
        raise _config_error(f"plan headroom must be in [0, 1), got {headroom}")
    source = _source(config)
    m = config.get("mesh") or {}
    try:
        mesh = sharding.mesh_from_config(m, devices=_cpu_devices(devices))
    except ValueError as e:
        raise _config_error(f"mesh: {e}") from None
    shape = {k: int(v) for k, v in mesh.shape.items()}
    batch_size = config.data.get("batch_size")
    parallel = sharding.data_parallel_size(mesh)
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % parallel:
        axes = " x ".join(f"{a}={shape[a]}" for a in ("data", "fsdp", "expert") if a in shape)
        raise _config_error(
            f"config.data.batch_size={batch_size!r} must be a positive multiple of the "
            f"{parallel} data-parallel devices (mesh {axes} of {devices}); set "
            "config.data.batch_size or config.mesh"
        )

    t = build_training(config, source, mesh)
    int32 = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = {"params": t.abstract_params, "opt_state": t.abstract_opt, "step": int32}
    state_in = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, t.state_sh
    )
    structure = _batch_structure(t.spec.family, t.spec.config, config.data)
    batch_sh = {k: sharding.batch_sharding(mesh, 1 + len(s)) for k, (s, _) in structure.items()}
    batch_in = {
        k: jax.ShapeDtypeStruct((batch_size, *s), jnp.dtype(d), sharding=batch_sh[k])
        for k, (s, d) in structure.items()
    }
    seed_in = jax.ShapeDtypeStruct((), jnp.int32, sharding=t.replicated)

    # The step exactly as the training loop jits it (loop.train_and_evaluate).
    step = jax.jit(
        make_train_step(t.loss_fn, t.tx, t.schedule, t.bias_updates),
        in_shardings=(t.state_sh, batch_sh, t.replicated),
        out_shardings=(t.state_sh, t.replicated),
        donate_argnums=0,
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # the MoE layers pin their expert-parallel layout under it
        lowered = step.lower(state_in, batch_in, seed_in)
    lowered_at = time.perf_counter()
    compiled = lowered.compile(compiler_options=KEEP_REMAT)
    compiled_at = time.perf_counter()
    mem = compiled.memory_analysis()
    collectives = count_collectives(compiled.as_text() or "")

    params = _leaves(t.abstract_params, t.param_sh)
    opt = _leaves(t.abstract_opt, t.state_sh["opt_state"])
    batch_bytes = sum(
        np.dtype(b.dtype).itemsize * math.prod(batch_sh[k].shard_shape(b.shape))
        for k, b in batch_in.items()
    )
    per_device = {
        "params": sum(p[3] for p in params),
        "opt_state": sum(o[3] for o in opt),
        "batch": int(batch_bytes),
        "arguments": int(getattr(mem, "argument_size_in_bytes", 0)),
        "outputs": int(getattr(mem, "output_size_in_bytes", 0)),
        "aliased": int(getattr(mem, "alias_size_in_bytes", 0)),
        "temporaries": int(getattr(mem, "temp_size_in_bytes", 0)),
        "generated_code": int(getattr(mem, "generated_code_size_in_bytes", 0)),
        "peak": int(getattr(mem, "peak_memory_in_bytes", 0)),
    }
    per_device["total"] = (
        per_device["arguments"]
        + per_device["outputs"]
        - per_device["aliased"]
        + per_device["temporaries"]
    )
    budget = int(hbm_bytes * (1 - headroom))
    flops = flops_lib.model_flops_per_step(
        t.spec.family, t.spec.config, {k: b.shape for k, b in batch_in.items()}
    )["total"]
    leaves = [("params", *p) for p in params] + [("opt_state", *o) for o in opt]
    leaves.sort(key=lambda row: -row[4])
    top = [
        {"kind": kind, "path": path, "shape": list(shp), "spec": spec, "bytes": per}
        for kind, path, shp, _, per, spec in leaves[:TOP]
    ]
    top.append({"kind": "temporaries", "path": "(all)", "bytes": per_device["temporaries"]})
    top.sort(key=lambda row: -row["bytes"])
    return {
        "config": name,
        "family": t.spec.family,
        "devices": devices,
        "platform": "cpu",
        "mesh": shape,
        "batch": {k: list(b.shape) for k, b in batch_in.items()},
        "num_params": sum(math.prod(p[1]) for p in params),
        "param_bytes": sum(p[2] for p in params),
        "opt_state_bytes": sum(o[2] for o in opt),
        "per_device": per_device,
        "flops_per_step": int(flops),
        "flops_per_device": flops / devices,
        "collectives": collectives,
        "lower_s": round(lowered_at - start, 3),
        "compile_s": round(compiled_at - lowered_at, 3),
        "hbm": int(hbm_bytes),
        "headroom": headroom,
        "budget": budget,
        "fits": per_device["total"] <= budget,
        "over_by": max(0, per_device["total"] - budget),
        "top_consumers": top,
    }


def format_report(r: dict) -> str:
    """The report as a table for people."""
    pd, b = r["per_device"], format_bytes
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    rows = [
        ("parameters", pd["params"], f"{r['num_params']:,} params, {b(r['param_bytes'])} total"),
        ("optimizer state", pd["opt_state"], f"{b(r['opt_state_bytes'])} total"),
        ("batch", pd["batch"], ""),
        ("compiled arguments", pd["arguments"], "params + optimizer state + batch"),
        ("compiled outputs", pd["outputs"], f"{b(pd['aliased'])} aliased to donated inputs"),
        ("temporaries", pd["temporaries"], "activations, gradients, workspace (CPU estimate)"),
        ("total", pd["total"], "arguments + outputs - aliased + temporaries"),
        ("XLA peak", pd["peak"], "memory_analysis().peak_memory_in_bytes"),
    ]
    lines = [
        f"plan: {r['config'] or r['family']} on {r['devices']} devices (mesh {mesh}), "
        f"compiled for {r['platform']}",
        f"  {'per device':<20} {'bytes':>12}",
    ]
    lines += [f"  {label:<20} {b(value):>12}  {note}".rstrip() for label, value, note in rows]
    verdict = "fits" if r["fits"] else f"DOES NOT FIT (over by {b(r['over_by'])})"
    lines.append(
        f"  verdict: {verdict}: total {b(pd['total'])} vs budget {b(r['budget'])} "
        f"(--hbm {b(r['hbm'])} less {r['headroom']:.0%} headroom)"
    )
    lines.append(
        f"model FLOPs per step: {r['flops_per_step']:.3e} ({r['flops_per_device']:.3e} per device)"
    )
    lines.append("collectives per device (static count in the compiled HLO):")
    for kind, c in r["collectives"].items():
        lines.append(f"  {kind:<20} {c['count']:>6} ops  {b(c['bytes']):>12}")
    lines.append(f"compile: lowering {r['lower_s']:.1f} s, XLA compile {r['compile_s']:.1f} s")
    lines.append("biggest consumers per device:")
    for row in r["top_consumers"]:
        where = f"{row['kind']} {row['path']}"
        shape = f" {tuple(row['shape'])} {row['spec']}" if "shape" in row else ""
        lines.append(f"  {b(row['bytes']):>12}  {where}{shape}")
    return "\n".join(lines)


# ============================================================================================
# The command.
# ============================================================================================


def _hbm(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``plan`` (``--config.<field>=<value>`` overrides come as extra args)."""
    from sparse_upcycle import t5x_gin

    parser.add_argument("--config", help="CONFIG.py[:arg] with get_config(arg)")
    t5x_gin.add_arguments(parser)
    parser.add_argument(
        "--devices", required=True, type=_positive, help="devices of the mesh (fake CPU ones)"
    )
    parser.add_argument(
        "--hbm", required=True, type=_hbm, help="one device's memory: 32GiB, 80GB, 16e9"
    )
    parser.add_argument(
        "--headroom",
        type=_fraction,
        default=DEFAULT_HEADROOM,
        help=f"fraction of --hbm kept free (default {DEFAULT_HEADROOM})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _devices_ready(n: int) -> bool:
    """Ask jax for ``n`` CPU devices if its backend has not started; True when it has them."""
    import jax
    from jax._src import xla_bridge  # backends_are_initialized: no public equivalent

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", max(n, 1))
    try:
        return len(jax.devices("cpu")) >= n
    except RuntimeError:
        return False


def _reexec(args, overrides: Sequence[str]) -> int:
    """Run this plan again in a fresh process that has ``args.devices`` CPU devices."""
    if os.environ.get(_CHILD_ENV):
        raise _config_error(f"plan --devices {args.devices}: could not get that many CPU devices")
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    kept = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join([*kept, flag]), JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
    from sparse_upcycle import t5x_gin

    cmd = [sys.executable, "-m", "sparse_upcycle.plan"]
    cmd += ["--config", args.config] if args.config else []
    cmd += t5x_gin.gin_argv(args)
    cmd += ["--devices", str(args.devices), "--hbm", str(args.hbm)]
    cmd += ["--headroom", repr(args.headroom), *(["--json"] if args.json else []), *overrides]
    sys.stdout.flush()
    return subprocess.call(cmd, env=env)


def run(args, overrides: Sequence[str] = ()) -> int:
    """The ``plan`` command: 0 when the step fits, 1 when it does not (ConfigError for bad
    input, which the caller prints as one line and exits 2 on)."""
    from sparse_upcycle import t5x_gin
    from sparse_upcycle.config import load_config

    # bad configs fail here, before any re-exec
    if t5x_gin.uses_gin(args):
        config, _ = t5x_gin.load(args, overrides, "plan")
    elif not args.config:
        raise _config_error("plan: pass --config (or --gin_file)")
    else:
        config = load_config(args.config, overrides)
    if not _devices_ready(args.devices):
        return _reexec(args, overrides)
    import jax

    # compile_s is one of the figures: a persistent-cache hit would hide the compilation. (jax
    # decides at its first compilation; a process that compiled before keeps its choice.)
    cache = jax.config.values["jax_enable_compilation_cache"]
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        name = args.config or ",".join(args.gin_file)
        report = plan(config, args.devices, args.hbm, args.headroom, name=name)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["fits"] else 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"sparse-upcycle: error: plan: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m sparse_upcycle.plan`` (the same command as ``sparse-upcycle plan``)."""
    from sparse_upcycle.checkpoints.errors import CheckpointError
    from sparse_upcycle.config import ConfigError

    parser = _Parser(prog="sparse-upcycle plan", description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    args.gin_bindings = [a for a in extra if a.startswith("--gin.")]
    unknown = [a for a in extra if not a.startswith(("--config.", "--gin."))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return run(args, overrides)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"sparse-upcycle: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
