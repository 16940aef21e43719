"""``sparse-upcycle compare``: does upcycling pay? Dense continuation vs upcycled vs MoE from
scratch at equal extra training compute (Komatsuzaki et al. 2023, Figure 2).

1. A dense model is pre-trained (``pretrain``), or an existing one is reused
   (``dense_checkpoint``, any format the surgeon reads). Its training FLOPs are the unit of
   the x-axis: "extra compute as a fraction of the dense pre-training cost".
2. Every arm gets the same extra budget, ``extra_compute`` × that cost, in *model training
   FLOPs* (``flops.model_flops_per_step``: 3 × the forward matmul FLOPs, MoE layers counted
   with their real expert capacity). An arm's step count is the budget divided by its FLOPs per
   step, so the MoE arms take fewer steps than the dense one. Wall time is measured as well.
3. Arms (``arms``: name -> ``kind`` + ``overrides``, nested dicts merged into its training
   config, e.g. ``{"upcycle": {"method": "drop"}, "optimizer": {"learning_rate": 3e-4}}``):
   ``dense`` continues the dense checkpoint; ``upcycle`` upcycles it in memory with the
   ``upcycle`` recipe (online upcycling, ``init_from``); ``scratch`` trains the same MoE from
   random weights. Each arm runs once per seed (``seeds``: the data order, the router and,
   for ``scratch``, all weights), and is evaluated on the held-out split at ``num_points``
   matched compute points (k / num_points of the budget, k = 1 … num_points).
   ``btx`` is Branch-Train-MiX (Sukhbaatar et al. 2024): ``branches`` (name -> run-config
   overrides, typically a data selection such as ``{"data": {"include_documents":
   ["library/*"]}}``) are trained as dense copies of the checkpoint, ``branch_compute`` (0.5)
   of the budget split evenly between them; the branches' last checkpoints become the
   ``upcycle.sources`` of one MoE (``num_experts / len(branches)`` experts per branch, the
   non-expert parameters averaged: ``non_expert = "average"``, both overridable in
   ``overrides``), which is trained on the arm's data with the rest of the budget. Its
   evaluations count the branches' FLOPs, so it is matched at the points past them; it is
   also evaluated as mixed, before its first step (``eval_at`` 0). An arm's ``against`` (a
   list of other arms) adds verdicts of it against those, e.g. an ablation against the recipe
   it changes.
4. ``protocol``: ``restart`` (default) gives every arm ``train.optimizer``, a fresh state and
   its schedule decayed to its own last step; ``continue`` is the paper's (Komatsuzaki et al.
   2023, §3.1: every model continues the dense model's schedule, T5's rsqrt decay): the arms
   take ``pretrain.optimizer`` with ``step_offset`` = the dense steps already taken (a btx
   MoE: those plus its branches'), no new warmup or decay; dense continuation carries the
   dense run's optimizer state (``init_opt_state = "carry"``), upcycled arms start from
   ``upcycle.optimizer`` (``reset``, the paper's language setting, by default); ``scratch``
   runs ``pretrain.optimizer`` from step 0. The pre-training schedule must still be running
   (``rsqrt`` or ``constant``).
5. ``report.json``, ``report.md`` and ``report.png`` are written to the workdir.

Resuming: each run lives in ``WORKDIR/<run>/`` and writes ``result.json`` when it finishes; a
finished run is read back, not recomputed, and an unfinished one resumes from its latest
checkpoint (the trainer's own resume).
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import json
import logging
import os
import time

import ml_collections

from sparse_upcycle import flops as flops_lib
from sparse_upcycle import loop
from sparse_upcycle.checkpoints.output import check_workdir
from sparse_upcycle.config import ConfigError, check, check_names, run_schema
from sparse_upcycle.data import make_pipeline
from sparse_upcycle.defaults import default_compare_config, default_config
from sparse_upcycle.report import write_report
from sparse_upcycle.task import ModelSpec, resolve_model

log = logging.getLogger("sparse_upcycle.compare")


class Preempted(RuntimeError):
    """A run stopped on SIGTERM after saving; rerunning the same command resumes it."""


KINDS = ("dense", "upcycle", "scratch", "btx")
PROTOCOLS = ("restart", "continue")
ARM_FIELDS = ("kind", "overrides", "branches", "branch_compute", "against")
__all__ = ["KINDS", "Preempted", "default_compare_config", "run_compare"]


def _merge(
    config: ml_collections.ConfigDict, overrides, where: str = "", label: str = "overrides"
) -> None:
    """Set ``overrides`` (nested dicts, e.g. ``{"upcycle": {"method": "drop"}}``) in
    ``config``; a dict meets a sub-config recursively, anything else replaces the field.

    A name that is no field of a run config (``config.run_schema``) is refused, named as in
    ``label`` (e.g. ``arms.upcycled.overrides``); inside ``model.overrides``, ``model.moe`` and
    ``data`` the model and data builders check the names."""
    if not where:
        check(overrides, run_schema(), label, types=False)
    for key, value in overrides.items():
        name = f"{where}{key}"
        current = config.get(key) if key in config else None
        if hasattr(value, "items") and isinstance(current, ml_collections.ConfigDict):
            _merge(current, value, f"{name}.")
            continue
        try:
            config[key] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"arm override {name!r}: {e}") from None


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def _read_evals(workdir: str) -> list[dict]:
    rows = {}
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "eval":
                rows[int(row["step"])] = {
                    "step": int(row["step"]),
                    "loss": row["loss"],
                    "accuracy": row["accuracy"],
                    **{k: v for k, v in row.items() if k.startswith(("fewshot/", "finetune/"))},
                }
    return [rows[s] for s in sorted(rows)]


def _step_flops(cfg) -> tuple[int, ModelSpec]:
    """(training FLOPs per step, the resolved model) of a run config, from one real batch."""

    spec = resolve_model(cfg, None)
    try:
        batch = next(make_pipeline(cfg.data, spec.family, spec.config, "train"))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    shapes = {k: v.shape for k, v in batch.items()}
    return int(flops_lib.model_flops_per_step(spec.family, spec.config, shapes)["total"]), spec


def _against(arms) -> dict[str, list[str]]:
    """Each arm's ``against``: the other arms the report also judges it against, by seed
    (besides dense continuation, and MoE from scratch for upcycled arms); e.g. an ablation
    arm against the recipe it changes. ConfigError for a name that is no other arm."""
    out = {}
    for name, arm in arms.items():
        names = arm.get("against") or []
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"arms.{name}.against must be a list of arm names, got {names!r}")
        for other in names:
            if other == name or other not in arms:
                known = sorted(set(arms) - {name})
                raise ConfigError(f"arms.{name}.against: {other!r} is not another arm ({known})")
        out[name] = list(names)
    return out


def _arm_config(c, name: str, arm, seed: int, init_from: str) -> ml_collections.ConfigDict:
    check_names(arm, ARM_FIELDS, f"arms.{name}")
    kind = arm.get("kind", "")
    if kind not in KINDS:
        raise ConfigError(f"arms.{name}.kind must be one of {KINDS}, got {kind!r}")
    if kind != "btx":
        for field in ("branches", "branch_compute"):
            if field in arm:
                raise ConfigError(f"arms.{name}.{field} is for kind btx, not {kind}")
    cfg = copy.deepcopy(c.train)
    cfg.seed = seed
    cfg.data.seed = seed
    if c.protocol == "continue":  # the pre-training schedule goes on (the module docstring)
        cfg.optimizer = copy.deepcopy(c.pretrain.optimizer)
        cfg.optimizer.step_offset = 0 if kind == "scratch" else int(c.pretrain.steps)
        if kind == "dense":
            cfg.init_opt_state = "carry"
    if kind == "dense":
        cfg.init_from = init_from
    else:
        cfg.upcycle = copy.deepcopy(c.upcycle)
        cfg.upcycle.seed = seed
        cfg.init_from = init_from if kind == "upcycle" else "scratch"
    cfg.init_format = c.get("dense_checkpoint_format", "auto") if kind != "scratch" else "auto"
    _merge(cfg, arm.get("overrides") or {}, label=f"arms.{name}.overrides")
    return cfg


def _run(cfg, workdir: str, label: str) -> dict:
    """One training run, or its recorded result when it has finished before."""

    done_path = os.path.join(workdir, "result.json")
    config_path = os.path.join(workdir, "config.json")
    settings = cfg.to_dict()
    settings.pop("peak_flops", None)  # measured anew by each invocation; no effect on training
    if os.path.exists(config_path):
        with open(config_path) as f:
            before = json.load(f)
        # a field added to the run config after this run started, at its default, changes
        # nothing the run did
        defaults = default_config().to_dict()
        for key in set(settings) - set(before):
            if key in defaults and _same(settings[key], defaults[key]):
                settings.pop(key)
        if before != json.loads(json.dumps(settings, default=str)):
            changed = sorted(
                k
                for k in set(before) | set(settings)
                if before.get(k) != json.loads(json.dumps(settings.get(k), default=str))
            )
            raise ConfigError(
                f"{workdir} holds a run of a different config (fields {changed}); use another "
                "--workdir, or remove that run to redo it"
            )
    if os.path.exists(done_path):
        with open(done_path) as f:
            result = json.load(f)
        log.info(f"{label}: finished before, reading {done_path}")
        return result
    os.makedirs(workdir, exist_ok=True)
    _write_json(config_path, json.loads(json.dumps(settings, default=str)))
    start = time.perf_counter()
    out = loop.train_and_evaluate(cfg, workdir)
    if out["status"] != "done":
        raise Preempted(
            f"{label}: {out['status']} at step {out['step']}; rerun the same command to resume"
        )
    result = {
        "steps": out["step"],
        "wall_seconds": time.perf_counter() - start,  # this session's part, if resumed
        "evals": _read_evals(workdir),
    }
    _write_json(done_path, result)
    return result


def _same(a, b) -> bool:
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


@dataclasses.dataclass
class _Planned:
    """One run of the plan: its config and FLOPs per step; for a ``btx`` arm also its branches
    (name, config, step FLOPs), trained first, and the FLOPs they spend (``offset_flops``),
    which its evaluations count."""

    name: str
    arm: ml_collections.ConfigDict
    seed: int
    cfg: ml_collections.ConfigDict
    step_flops: int
    branches: list = dataclasses.field(default_factory=list)
    offset_flops: int = 0


def _plan_btx(c, name, arm, seed, init_from, workdir, budget) -> _Planned:
    """A ``btx`` arm's branches (dense runs on their data) and its MoE of their checkpoints."""
    branches = arm.get("branches") or {}
    if len(branches) < 2:
        raise ConfigError(f"arms.{name}.branches must name at least two branches")
    fraction = arm.get("branch_compute", 0.5)
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"arms.{name}.branch_compute must be in (0, 1), got {fraction!r}")
    here = os.path.join(workdir, name, f"seed_{seed}")
    planned, paths, spent = [], [], 0
    for branch, overrides in branches.items():
        cfg = _arm_config(c, name, {"kind": "dense"}, seed, init_from)
        _merge(cfg, overrides or {}, label=f"arms.{name}.branches.{branch}")
        flops, _ = _step_flops(cfg)
        steps = max(1, round(fraction * budget / len(branches) / flops))
        cfg.total_steps = steps
        cfg.eval_at = [steps]
        cfg.eval_every = 0
        _schedule_length(cfg, steps)
        planned.append((branch, cfg, flops))
        paths.append(os.path.join(here, f"branch_{branch}", "checkpoints", str(steps)))
        spent += steps * flops
    cfg = _arm_config(c, name, {"kind": "btx"}, seed, init_from)
    cfg.upcycle.sources = paths
    cfg.upcycle.non_expert = "average"
    _merge(cfg, arm.get("overrides") or {}, label=f"arms.{name}.overrides")
    if not cfg.upcycle.get("expert_sources"):
        experts = int(cfg.upcycle.get("num_experts", 0))
        if experts % len(paths):
            raise ConfigError(
                f"arms.{name}: upcycle.num_experts {experts} is not a multiple of the "
                f"{len(paths)} branches (or give upcycle.expert_sources)"
            )
        cfg.upcycle.experts_per_source = experts // len(paths)
    cfg.init_from = paths[int(cfg.upcycle.get("base_source", 0))]
    cfg.init_format = "auto"
    if c.protocol == "continue":  # after the dense steps and its branches' (run side by side)
        cfg.optimizer.step_offset = int(c.pretrain.steps) + max(p[1].total_steps for p in planned)
    flops, _ = _step_flops(cfg)
    rest = budget - spent
    cfg.total_steps = max(1, round(rest / flops))
    points = {
        max(1, round((k / c.num_points * budget - spent) / flops))
        for k in range(1, c.num_points + 1)
        if k / c.num_points * budget > spent
    }
    cfg.eval_at = sorted(points | {0, cfg.total_steps})  # 0: the MoE as mixed
    cfg.eval_every = 0
    _schedule_length(cfg, cfg.total_steps)
    return _Planned(name, arm, seed, cfg, flops, planned, spent)


def _schedule_length(cfg, steps: int) -> None:
    """Decaying schedules (cosine, linear) end at the run's own last step; a warmup longer than
    a tenth of a short run is cut to that tenth."""
    if cfg.optimizer.get("schedule") in ("cosine", "linear"):
        cfg.optimizer.decay_steps = steps + int(cfg.optimizer.get("step_offset") or 0)
        cfg.optimizer.warmup_steps = min(int(cfg.optimizer.get("warmup_steps", 0)), steps // 10)


def run_compare(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) every run of the experiment and write the report; returns report.json's
    content."""
    if not c.seeds:
        raise ConfigError("seeds is empty")
    if not c.extra_compute > 0 or int(c.num_points) < 1:
        raise ConfigError("extra_compute must be > 0 and num_points >= 1")
    if c.protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {c.protocol!r}")
    if c.protocol == "continue" and c.pretrain.optimizer.get("schedule") in ("cosine", "linear"):
        raise ConfigError(
            f"protocol=continue goes on with the pre-training schedule, and "
            f"pretrain.optimizer.schedule={c.pretrain.optimizer.schedule} has ended at "
            "pre-training's last step; use rsqrt or constant"
        )
    dense = c.get("dense_checkpoint")
    check_workdir(workdir, [("dense_checkpoint", dense)] if dense else [])
    os.makedirs(workdir, exist_ok=True)
    # One compare per workdir at a time (a second one would train the same runs into the same
    # directories); the lock goes with the process, so a killed run leaves none behind.
    lock = open(os.path.join(workdir, ".compare.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"another compare is running in {workdir}") from None
    try:
        return _run_compare(c, workdir)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _run_compare(c: ml_collections.ConfigDict, workdir: str) -> dict:
    c = copy.deepcopy(c)
    if c.train.get("peak_flops") is None:  # measured once for all runs (MFU in metrics)
        c.train.peak_flops = flops_lib.measure_peak_flops(size=1024, repeats=3)

    # ---------------------------------------------------------------- the dense model
    dense_cfg = copy.deepcopy(c.train)
    dense_cfg.init_from = "scratch"
    dense_cfg.total_steps = int(c.pretrain.steps)
    dense_cfg.optimizer = copy.deepcopy(c.pretrain.optimizer)
    dense_cfg.eval_every = int(c.pretrain.get("eval_every", 0))
    _schedule_length(dense_cfg, dense_cfg.total_steps)
    dense_flops, dense_spec = _step_flops(dense_cfg)
    if c.dense_checkpoint:
        init_from = c.dense_checkpoint
    else:
        init_from = os.path.join(workdir, "pretrain", "checkpoints", str(dense_cfg.total_steps))
    dense_cost = dense_flops * int(c.pretrain.steps)
    budget = float(c.extra_compute) * dense_cost

    # ---------------------------------------------------------------- the plan (all arms are
    # checked before anything is trained)
    runs: list[_Planned] = []
    against = _against(c.arms)
    for name, arm in c.arms.items():
        for seed in c.seeds:
            if arm.get("kind") == "btx":
                runs.append(_plan_btx(c, name, arm, int(seed), init_from, workdir, budget))
                continue
            cfg = _arm_config(c, name, arm, int(seed), init_from)
            step_flops, _ = _step_flops(cfg)
            steps = max(1, round(budget / step_flops))
            points = {
                round(k / c.num_points * budget / step_flops) for k in range(1, c.num_points + 1)
            }
            cfg.total_steps = steps
            cfg.eval_at = sorted(max(1, p) for p in points)
            cfg.eval_every = 0
            _schedule_length(cfg, steps)
            runs.append(_Planned(name, arm, int(seed), cfg, step_flops))

    if c.dense_checkpoint:
        pretrain = {"steps": int(c.pretrain.steps), "evals": [], "wall_seconds": None}
        log.info(f"dense model: {init_from} (pre-training steps taken as {c.pretrain.steps})")
    else:
        plan = f"pre-training the dense model: {dense_cfg.total_steps} steps"
        log.info(plan)
        pretrain = _run(dense_cfg, os.path.join(workdir, "pretrain"), plan)

    results = []
    for i, r in enumerate(runs, 1):
        here = os.path.join(workdir, r.name, f"seed_{r.seed}")
        wall, branch_steps = 0.0, {}
        for branch, cfg, flops in r.branches:
            label = (
                f"[{i}/{len(runs)}] {r.name} seed {r.seed}, branch {branch}: "
                f"{cfg.total_steps} dense steps of {flops / 1e9:.2f} GFLOPs"
            )
            log.info(label)
            done = _run(cfg, os.path.join(here, f"branch_{branch}"), label)
            wall += done["wall_seconds"]
            branch_steps[branch] = done["steps"]
        label = (
            f"[{i}/{len(runs)}] {r.name} seed {r.seed}: {r.cfg.total_steps} steps of "
            f"{r.step_flops / 1e9:.2f} GFLOPs"
        )
        log.info(label)
        result = _run(r.cfg, os.path.join(here, "moe") if r.branches else here, label)
        for row in result["evals"]:
            row["extra_flops"] = r.offset_flops + row["step"] * r.step_flops
            row["fraction"] = row["extra_flops"] / dense_cost
        if r.branches:
            result = {**result, "wall_seconds": wall + result["wall_seconds"]}
            result["branches"] = {"steps": branch_steps, "flops": r.offset_flops}
        results.append(
            {
                "arm": r.name,
                "kind": r.arm.get("kind"),
                "seed": r.seed,
                "step_flops": r.step_flops,
                **result,
            }
        )

    report = {
        "dense": {
            "checkpoint": init_from,
            "steps": int(pretrain["steps"]),
            "step_flops": dense_flops,
            "cost_flops": dense_cost,
            "wall_seconds": pretrain.get("wall_seconds"),
            "evals": pretrain.get("evals", []),
            "family": dense_spec.family,
        },
        "extra_compute": float(c.extra_compute),
        "protocol": c.protocol,
        "budget_flops": budget,
        "seeds": [int(s) for s in c.seeds],
        "arms": {
            name: {
                "kind": arm.get("kind"),
                "overrides": _plain(arm.get("overrides") or {}),
                **(
                    {
                        "branches": _plain(arm.get("branches")),
                        "branch_compute": arm.get("branch_compute", 0.5),
                    }
                    if arm.get("kind") == "btx"
                    else {}
                ),
                **({"against": against[name]} if against.get(name) else {}),
            }
            for name, arm in c.arms.items()
        },
        "runs": results,
    }

    return write_report(report, workdir)
