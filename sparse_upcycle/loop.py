"""``train_and_evaluate(config, workdir)``: one sharded training run, read top to bottom
(shared by the ``train`` and ``compare`` commands; defaults: ``defaults.default_config``).

Dense, upcycled and from-scratch MoE models all go through here. What the model is comes from
the config: ``model`` (the family and size, with ``moe``/``encoder_moe``/``decoder_moe``
blocks) and, when present, ``upcycle`` (a recipe: its expert count makes the model an MoE;
``task.py``). Where the weights come from is ``init_from`` (``init_from.py``):

* ``"scratch"``: random initialisation (an MoE from scratch when ``upcycle`` is present);
* a directory written by ``sparse-upcycle upcycle`` (it holds ``recipe.json``): its params, and
  its tiled optimizer slots if it has them;
* any dense checkpoint the surgeon reads (T5X, Orbax, ``.npz``, HF): loaded as is for a dense
  model, or upcycled in memory with the ``upcycle`` recipe (online upcycling), tensor by
  tensor straight into the sharded device arrays.

A workdir that already holds checkpoints resumes from the latest one, together with the input
pipeline's position; the step's randomness is ``fold_in(seed, step)``; so an interrupted run
reproduces the uninterrupted per-step losses exactly. Non-finite losses or gradients are
checked at every log step and before every save (one flag per step, fetched lazily, so the
device is not synchronised every step), and stop the run naming the step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sparse_upcycle import fewshot, finetune_eval, models, sharding
from sparse_upcycle import flops as flops_lib
from sparse_upcycle.checkpoints.output import check_workdir, workdir_writes
from sparse_upcycle.config import ConfigError
from sparse_upcycle.data import make_pipeline
from sparse_upcycle.init_from import (
    carried_opt_state,
    check_carry,
    check_tile,
    initial_params,
    keep_hf_source,
    open_init_source,
    source_paths,
    tiled_opt_state,
    tiles_training_state,
)
from sparse_upcycle.metrics import MetricWriter, Progress
from sparse_upcycle.optim_slots import load_adafactor_slots
from sparse_upcycle.task import ModelSpec, moe_layer_names
from sparse_upcycle.training import build_training, make_eval_step, make_train_step, mean_scores

log = logging.getLogger("sparse_upcycle.train")  # the name users filter on


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss or gradient); the message names the step and
    the last good checkpoint. The CLI prints it and exits 1."""


# ============================================================================================
# Batches and steps.
# ============================================================================================


def global_batch(local: dict, mesh, process_count: int) -> dict:
    """Global device arrays from this process's numpy batch (split over the data-parallel
    axes of the mesh: ``data × fsdp × expert``, ``sharding.batch_sharding``)."""
    out = {}
    for key, value in local.items():
        sh = sharding.batch_sharding(mesh, value.ndim)
        shape = (value.shape[0] * process_count, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sh, value, shape)
    return out


class _Preemption:
    """SIGTERM -> save a checkpoint at the end of the current step and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _scalars(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if key == "router/expert_load" or key.endswith("_sum"):
            continue
        out[key] = float(value) if value.ndim == 0 else value
    return out


# ============================================================================================
# The run.
# ============================================================================================


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) ``config`` in ``workdir``; returns the final train and eval metrics.

    Raises:
      TrainingError: a non-finite loss or gradient norm.
      ConfigError, CheckpointError: bad configuration or initial checkpoint, a --workdir
        that is a file or overlaps ``init_from``.
    """
    check_workdir(workdir, source_paths(config))
    # ---------------------------------------------------------------- processes and mesh
    dist = config.get("distributed", ml_collections.ConfigDict())
    if dist.get("num_processes", 1) > 1 and not jax.distributed.is_initialized():
        # CPU collectives across processes need gloo (no effect on TPU/GPU backends); set
        # before anything initialises a backend.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=dist.coordinator_address,
            num_processes=dist.num_processes,
            process_id=dist.process_id,
        )
    process_index, process_count = jax.process_index(), jax.process_count()
    m = config.get("mesh", ml_collections.ConfigDict())
    try:
        mesh = sharding.mesh_from_config(m)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    # ---------------------------------------------------------------- model
    # Nothing is written to the workdir until the initial checkpoint is open and the model
    # and input pipeline are built: a refused source or setting leaves no empty --workdir.
    source = open_init_source(config)
    t = build_training(config, source, mesh)
    spec = t.spec
    check_carry(config, spec, source, t.abstract_opt)
    check_tile(config, spec, source, t.abstract_opt)
    probe = fewshot.make_probe(config, t)  # None unless config.fewshot names a dataset
    finetune = finetune_eval.make_finetune(  # None unless config.finetune names a task
        config, t, lambda local: global_batch(local, mesh, process_count)
    )

    # ---------------------------------------------------------------- data
    def pipeline(split):
        try:
            return make_pipeline(
                config.data,
                spec.family,
                spec.config,
                split,
                process_index=process_index,
                process_count=process_count,
            )
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None

    train_data = pipeline("train")
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    if process_index == 0:
        try:
            keep_hf_source(config, source, workdir)
        except BaseException:
            if created:  # refused (a side file outside init_from) or failed: leave nothing
                shutil.rmtree(workdir, ignore_errors=True)
            raise
    with workdir_writes(workdir):
        return _run(config, workdir, t, source, train_data, pipeline, mesh, probe, finetune)


def _run(config, workdir, t, source, train_data, pipeline, mesh, probe=None, finetune=None) -> dict:
    """The loop of ``train_and_evaluate`` once its model, data and workdir are ready."""
    process_index, process_count = jax.process_index(), jax.process_count()
    spec, state_sh, replicated = t.spec, t.state_sh, t.replicated
    abstract_params, abstract_opt, tx, loss_fn = t.abstract_params, t.abstract_opt, t.tx, t.loss_fn
    param_sh = t.param_sh
    layer_names = moe_layer_names(spec)

    # ---------------------------------------------------------------- checkpoints
    ckpt_cfg = config.get("checkpoint", ml_collections.ConfigDict())
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.get("keep", 3),
            save_interval_steps=ckpt_cfg.get("every", 100),
            enable_async_checkpointing=ckpt_cfg.get("async", True),
        ),
        item_names=("state", "data"),
    )
    writer = MetricWriter(workdir, process_index=process_index)
    latest = manager.latest_step()
    if latest is not None:
        abstract = {
            "params": abstract_params,
            "opt_state": abstract_opt,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        }
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
        )
        restored = manager.restore(
            latest,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
        state = restored["state"]
        train_data.set_state(restored["data"])
        writer.truncate_after(latest)
        log.info("resumed from %s at step %d", manager.directory, latest)
    else:
        params, slots = initial_params(config, spec, source, abstract_params, param_sh)
        if config.get("init_opt_state", "reset") == "carry":
            opt_state = carried_opt_state(source, abstract_opt, state_sh["opt_state"])
            log.info("optimizer state carried from %s", config.init_from)
        elif tiles_training_state(spec, source):
            opt_state = tiled_opt_state(config, source, abstract_opt, state_sh["opt_state"])
            log.info("optimizer state tiled into experts from %s", config.init_from)
        else:
            opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)
        if slots:
            opt_state, report = load_adafactor_slots(
                opt_state, params, slots, step=_dense_step(source)
            )
            log.info("optimizer slots from %s: %s", config.init_from, report.summary())
        state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
        state = jax.device_put(state, state_sh)
    start_step = int(state["step"])

    # ---------------------------------------------------------------- steps
    train_step = make_train_step(loss_fn, tx, t.schedule, t.bias_updates)
    seed = jax.make_array_from_process_local_data(replicated, np.int32(config.seed))

    batch_sh = None  # from the first batch's ranks
    train_step_jit = None

    eval_step_jit = jax.jit(make_eval_step(loss_fn), out_shardings=replicated)

    def evaluate(params, final: bool = False) -> dict:
        data = pipeline("validation")
        outs = []  # fetched once at the end, so the batches are dispatched back to back
        for _ in range(config.get("eval_steps", 4)):
            with jax.set_mesh(mesh):
                outs.append(eval_step_jit(params, global_batch(next(data), mesh, process_count)))
        loss, accuracy = mean_scores(outs)
        out = {"loss": loss, "accuracy": accuracy}
        if probe is not None:
            with jax.set_mesh(mesh):
                out.update(probe(params))
        if finetune is not None and (final or finetune.every_eval):
            with jax.set_mesh(mesh):
                out.update(finetune.run(params))
        return out

    # ---------------------------------------------------------------- loop
    total = int(config.total_steps)
    log_every, eval_every = int(config.get("log_every", 10)), int(config.get("eval_every", 100))
    eval_at = {int(s) for s in config.get("eval_at", ())}
    batch_shapes: dict[str, tuple[int, ...]] = {}  # set with the first batch
    peak = config.get("peak_flops") or flops_lib.measure_peak_flops(size=1024, repeats=3)
    progress = Progress(total, start_step, every=log_every)
    pending: list[tuple[int, jax.Array]] = []  # (step, finite flag) not yet checked
    last_saved = latest
    last_time, last_step = time.perf_counter(), start_step
    train_metrics: dict = {}
    eval_metrics: dict = {}
    status = "done"
    # Where this invocation's time went: the first step (compilation), the other steps
    # (everything the loop does per step, checkpoint saves included) and evaluation.
    timing = {
        "first_step_s": 0.0,
        "steps_timed": 0,
        "train_s": 0.0,
        "eval_s": 0.0,
        "checkpoint_s": 0.0,
    }
    eval_since_log = 0.0  # evaluation seconds inside the current log interval
    loop_start = time.perf_counter()
    timed_from = None  # when the first step of this invocation had finished

    def check_finite():
        nonlocal pending
        for step, ok in pending:
            if not bool(ok):
                where = (
                    f"step {last_saved} in {manager.directory}"
                    if last_saved is not None
                    else "none (no checkpoint was saved yet)"
                )
                raise TrainingError(
                    f"step {step}: the loss or a gradient is NaN/inf; stopping. Last good "
                    f"checkpoint: {where}"
                )
        pending = []

    save_every = int(ckpt_cfg.get("every", 100))

    def save(step, force=False):
        nonlocal last_saved
        if not force and step % save_every:
            return
        check_finite()  # never save a state that went non-finite
        save_start = time.perf_counter()
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(train_data.get_state())
            ),
            force=True,
        )
        timing["checkpoint_s"] += time.perf_counter() - save_start  # the blocking part
        last_saved = step

    with _Preemption() as preemption:
        try:
            if start_step == 0 and 0 in eval_at:  # the initial parameters, as built
                eval_metrics = evaluate(state["params"])
                writer.write(0, eval_metrics, split="eval")
                progress.write(
                    f"eval step 0: loss {eval_metrics['loss']:.4f} "
                    f"accuracy {eval_metrics['accuracy']:.4f}"
                )
                loop_start = time.perf_counter()
            for step in range(start_step, total):
                batch = global_batch(next(train_data), mesh, process_count)
                if train_step_jit is None:
                    batch_sh = {k: v.sharding for k, v in batch.items()}
                    batch_shapes = {k: v.shape for k, v in batch.items()}
                    train_step_jit = jax.jit(
                        train_step,
                        in_shardings=(state_sh, batch_sh, replicated),
                        out_shardings=(state_sh, replicated),
                        donate_argnums=0,
                    )
                # Traced under the mesh, the MoE layers pin their expert-parallel layout
                # (sharding.constrain); without it the partitioner gathers the experts.
                with jax.set_mesh(mesh):
                    state, metrics = train_step_jit(state, batch, seed)
                pending.append((step + 1, metrics["finite"]))  # the update that made step+1
                done = step + 1
                if timed_from is None:
                    metrics["finite"].block_until_ready()  # the one extra sync: compile time
                    timed_from = last_time = time.perf_counter()
                    timing["first_step_s"] = timed_from - loop_start
                    last_step = done
                if done % log_every == 0 or done == total:
                    check_finite()
                    now = time.perf_counter()
                    timed = done - last_step  # 0 when the first step is a log step
                    seconds = (
                        (now - last_time - eval_since_log) / timed
                        if timed
                        else timing["first_step_s"]
                    )
                    last_time, last_step, eval_since_log = now, done, 0.0
                    train_metrics = _scalars(metrics)
                    train_metrics.pop("finite", None)
                    train_metrics.update(_throughput(spec, batch_shapes, seconds, peak))
                    load = np.asarray(metrics.get("router/expert_load", np.zeros((0, 0))))
                    for name, row in zip(layer_names, load, strict=True):
                        train_metrics[f"expert_load/{name}"] = row
                    writer.write(done, train_metrics, split="train")
                progress.update(done, {"loss": metrics["loss"]})
                if (eval_every > 0 and done % eval_every == 0) or done == total or done in eval_at:
                    eval_start = time.perf_counter()
                    eval_metrics = evaluate(state["params"], final=done == total)
                    eval_seconds = time.perf_counter() - eval_start
                    timing["eval_s"] += eval_seconds
                    eval_since_log += eval_seconds
                    writer.write(done, eval_metrics, split="eval")
                    progress.write(
                        f"eval step {done}: loss {eval_metrics['loss']:.4f} "
                        f"accuracy {eval_metrics['accuracy']:.4f}"
                    )
                save(done, force=done == total)
                if preemption.requested and done < total:
                    save(done, force=True)
                    status = "preempted"
                    progress.write(f"SIGTERM: saved step {done}; exiting")
                    break
            check_finite()
            if timed_from is not None:
                timing["steps_timed"] = int(state["step"]) - start_step - 1
                timing["train_s"] = time.perf_counter() - timed_from - timing["eval_s"]
        finally:
            manager.wait_until_finished()
            manager.close()
            writer.close()
            progress.close()
    return {
        "status": status,
        "step": int(state["step"]),
        "train": {k: v for k, v in train_metrics.items() if np.ndim(v) == 0},
        "eval": eval_metrics,
        "timing": timing,
    }


def _dense_step(source) -> int:
    """The dense run's step count, the age of the optimizer slots taken from it (Adafactor's
    second-moment decay depends on it; 0 would discard them at the first update)."""
    step = source.dense_step or source.step
    return max(int(step or 0), 1)


def _throughput(spec: ModelSpec, shapes: dict, seconds: float, peak: float) -> dict:
    step_flops = flops_lib.model_flops_per_step(spec.family, spec.config, shapes)["total"]
    batch = next(iter(shapes.values()))[0]
    out = {
        "step_seconds": seconds,
        "examples_per_second": batch / seconds,
        "model_flops_per_step": float(step_flops),
        "mfu": flops_lib.mfu(step_flops, seconds, peak, jax.device_count()),
    }
    key = models.get(spec.family).TOKENS_KEY
    if key is not None:
        out["tokens_per_second"] = math.prod(shapes[key]) / seconds
    return out


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, default=float)
