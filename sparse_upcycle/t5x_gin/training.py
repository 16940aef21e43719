"""The loss, optimizer, schedule and run bindings of T5X gin files (``mapping.to_overrides``'s
second half: ``models.*EncoderDecoderModel``, Adafactor, ``create_learning_rate_scheduler``,
``train_script.train``, checkpoint configs, partitioners; the table is in ``mapping.py``)."""

from __future__ import annotations

import re

from sparse_upcycle.config import ConfigError
from sparse_upcycle.t5x_gin.parser import Bindings, Ref, _name

FACTORS = {"constant * rsqrt_decay": "rsqrt", "constant": "constant"}


def check(b: Bindings, selector: str, arg: str, ok, why: str, scope: str = "") -> None:
    if b.has(selector, arg, scope):
        value = b.get(selector, arg, scope)
        if not ok(value):
            key = b.key(selector, arg, scope)
            assert key is not None
            raise ConfigError(
                f"gin: cannot honour {_name(*key)} = {value!r} ({b.where(key)}): {why}"
            )


def loss(b: Bindings, out: dict) -> None:
    for model in ("models.MoeEncoderDecoderModel", "models.EncoderDecoderModel"):
        if b.has(model, "z_loss"):
            out["loss.z_loss"] = b.get(model, "z_loss")
        if b.has(model, "label_smoothing"):
            out["loss.label_smoothing"] = b.get(model, "label_smoothing")
        check(
            b, model, "loss_normalizing_factor",
            lambda v: v in (None, "NUM_REAL_TARGET_TOKENS") or getattr(v, "name", "") in (
                "NUM_REAL_TARGET_TOKENS",
            ),
            "the loss here is the mean over real target tokens",
        )  # fmt: skip
        for arg, field in (("aux_loss_factor", "aux_loss_weight"),
                           ("router_z_loss_factor", "router_z_loss_weight")):  # fmt: skip
            if b.has(model, arg):
                value = b.get(model, arg)
                for stack in ("encoder", "decoder"):
                    if out.get(f"model.{stack}_moe.num_experts"):
                        out[f"model.{stack}_moe.{field}"] = value


def optimizer(b: Bindings, out: dict, notes: list[str]) -> None:
    ada = "adafactor.Adafactor"
    if any(sel == ada for _, sel, _ in b.values):
        out["optimizer.name"] = "adafactor"
    pairs = {
        "decay_rate": "decay_rate",
        "beta1": "momentum",
        "clipping_threshold": "clipping_threshold",
        "multiply_by_parameter_scale": "multiply_by_parameter_scale",
        "factored": "factored",
        "min_dim_size_to_factor": "min_dim_size_to_factor",
        "weight_decay_rate": "weight_decay",
        "global_norm_clip_threshold": "clip_grad_norm",
    }
    for arg, field in pairs.items():
        if b.has(ada, arg):
            value = b.get(ada, arg)
            out[f"optimizer.{field}"] = (
                0.0 if field == "clip_grad_norm" and value is None else value
            )
    check(b, ada, "learning_rate", lambda v: v is None, "the rate comes from the schedule here")
    check(b, ada, "step_offset", lambda v: not v, "not implemented for the beta2 decay")
    check(b, ada, "epsilon1", lambda v: v == 1e-30, "fixed at T5X's default 1e-30")
    check(b, ada, "epsilon2", lambda v: v == 1e-3, "fixed at T5X's default 1e-3")
    check(b, ada, "decay_adam", lambda v: not v, "not implemented")
    check(b, ada, "max_parameter_scale", lambda v: v is None, "not implemented")
    check(b, ada, "weight_decay_rate_lr_exponent", lambda v: v is None, "not implemented")
    for arg in ("logical_factor_rules", "factor_map"):  # ours factors per expert (optim.py)
        if b.has(ada, arg):
            b.read.add(b.key(ada, arg))  # type: ignore[arg-type]
    sched = "utils.create_learning_rate_scheduler"
    if any(sel == sched for _, sel, _ in b.values):
        factors = b.get(sched, "factors", default="constant * linear_warmup * rsqrt_decay")
        normal = " * ".join(p.strip() for p in str(factors).split("*"))
        if normal not in FACTORS:
            key = b.key(sched, "factors")
            where = b.where(key) if key else "T5X's default"
            raise ConfigError(
                f"gin: cannot honour {sched}.factors = {factors!r} ({where}): only "
                f"{' or '.join(repr(f) for f in FACTORS)}"
            )
        out["optimizer.schedule"] = FACTORS[normal]
        out["optimizer.learning_rate"] = b.get(sched, "base_learning_rate", default=0.5)
        warmup = b.get(sched, "warmup_steps", default=1000)
        out["optimizer.warmup_steps"] = warmup if normal != "constant" else 0
        check(b, sched, "min_learning_rate", lambda v: v <= 1e-8, "no floor here")
        offset = b.get(sched, "step_offset", default=0)
        out["_schedule_step_offset"] = offset
        for arg in ("decay_factor", "steps_per_decay", "steps_per_cycle"):
            if b.has(sched, arg):  # unused by the two factor strings accepted
                b.get(sched, arg)
    for trainer in ("trainer.Trainer", "moe_trainer.MoeTrainer"):
        check(
            b, trainer, "num_microbatches", lambda v: v in (None, 1),
            "no gradient accumulation here",
        )  # fmt: skip
        for arg in ("learning_rate_fn", "num_expert_partitions", "weight_metrics_computer"):
            if b.has(trainer, arg):
                b.read.add(b.key(trainer, arg))  # type: ignore[arg-type]


_STEP_DIR = re.compile(r"(?:checkpoint_|checkpoints/)(\d+)/?$")  # T5X's, or a train step


def run(b: Bindings, out: dict, notes: list[str], command: str) -> None:
    t = "train_script.train"
    restore = "utils.RestoreCheckpointConfig"
    path = b.get(restore, "path", default=None)
    if isinstance(path, (list, tuple)):
        path = path[0] if len(path) == 1 else (None if not path else path)
    if isinstance(path, (list, tuple)):
        raise ConfigError(f"gin: {restore}.path: one checkpoint, got {path!r}")
    step = 0
    if path:
        out["init_from"] = str(path)
        match = _STEP_DIR.search(str(path))
        step = int(match.group(1)) if match else 0
        sched_offset = out.pop("_schedule_step_offset", 0)
        out["optimizer.step_offset"] = step - sched_offset
    if out.pop("_schedule_step_offset", 0):
        raise ConfigError(
            "gin: utils.create_learning_rate_scheduler.step_offset without a restored "
            "checkpoint is not supported (ours adds the dense steps to the step)"
        )
    if command == "upcycle" and b.has(t, "total_steps"):
        b.read.add(b.key(t, "total_steps"))  # type: ignore[arg-type]  # (not needed to upcycle)
    elif b.has(t, "total_steps"):
        total = b.get(t, "total_steps") - step
        if total <= 0 and command == "train":
            raise ConfigError(
                f"gin: {t}.total_steps = {total + step} is not after the restored step {step}"
            )
        out["total_steps"] = max(total, 1)
    for arg, field in (("eval_steps", "eval_steps"), ("eval_period", "eval_every")):
        if b.has(t, arg):
            value = b.get(t, arg)
            if value is not None:
                out[field] = value
    save = "utils.SaveCheckpointConfig"
    if b.has(save, "period"):
        out["checkpoint.every"] = b.get(save, "period")
    if b.has(save, "keep"):
        keep = b.get(save, "keep")
        if keep is None:
            notes.append("utils.SaveCheckpointConfig.keep = None (keep all): kept the default")
        else:
            out["checkpoint.keep"] = keep
    for key in list(b.values):
        scope, selector, arg = key
        if selector == "utils.DatasetConfig" and scope in ("train", ""):
            if arg == "batch_size":
                out["data.batch_size"] = b.get(selector, arg, scope)
            elif arg == "task_feature_lengths":
                lengths = b.get(selector, arg, scope)
                if isinstance(lengths, dict):
                    if "inputs" in lengths:
                        out["data.seq_len"] = lengths["inputs"]
                    if "targets" in lengths:
                        out["data.target_len"] = lengths["targets"]
            elif arg == "mixture_or_task_name":
                task = b.get(selector, arg, scope)
                notes.append(
                    f"seqio task {task!r}: this code base reads its own data (data.name; e.g. "
                    "--config.data.name=token_shards --config.data.path=DIR)"
                )
    for part in ("moe_partitioning.MoePjitPartitioner", "partitioning.PjitPartitioner"):
        if b.has(part, "num_expert_partitions"):
            out["mesh.expert"] = b.get(part, "num_expert_partitions")
        if b.has(part, "num_partitions"):
            value = b.get(part, "num_partitions")
            out["mesh.model"] = 1 if value is None else value
        check(b, part, "model_parallel_submesh", lambda v: v is None, "use mesh.model")
    if b.get(restore, "checkpointer_cls", default=None) == Ref(
        "checkpoints.UpcycleCheckpointer", False
    ):
        experts = b.get("checkpoints.UpcycleCheckpointer", "num_experts")
        out["upcycle.method"] = "copy"
        out["upcycle.num_experts"] = experts
        out["upcycle.step"] = "reset"  # the schedule continues through optimizer.step_offset
        drops_state = any(
            isinstance(rule, (list, tuple)) and len(rule) == 2 and rule[1] is None
            and "param_states" in str(rule[0])
            for rule in b.get(restore, "assignment_map", default=()) or ()
        )  # fmt: skip
        out["upcycle.optimizer"] = "reset" if drops_state else "tile"
    elif command == "upcycle" and (b.has("moe_layers.MoeLayer", "num_experts", "sparse_encoder")
                                   or b.has("moe_layers.MoeLayer", "num_experts")):  # fmt: skip
        experts = {out.get(f"model.{s}_moe.num_experts") for s in ("encoder", "decoder")} - {0}
        if len(experts) == 1:
            out["upcycle.num_experts"] = experts.pop()
    if command == "train" and b.has(t, "random_seed"):
        seed = b.get(t, "random_seed")
        if seed is not None:
            out["seed"] = seed
    for arg in ("use_hardware_rng", "hardware_rng"):
        if b.has(t, arg):
            b.get(t, arg)
