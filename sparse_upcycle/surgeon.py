"""The checkpoint surgeon behind ``sparse-upcycle upcycle | verify | inspect``.

``upcycle`` reads a dense checkpoint (T5X, Orbax, big_vision .npz or HF safetensors), builds
the MoE parameters with the recipe's rules (``upcycle/rules.py``) tensor by tensor, and streams
them into an Orbax checkpoint ``{"params": …, "step": …}`` (about 64 MB of output in memory at a
time) plus ``recipe.json`` (recipe, model config,
source, checksums) to a temporary directory that is renamed to ``--dst`` only when complete.
An HF source's config, tokenizer and generation files go to ``hf_source/`` (see ``export``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparse_upcycle import __version__
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.tree import (
    check_output_path,
    flatten,
    make_output_tmpdir,
    unflatten,
)
from sparse_upcycle.config import ConfigError, check_names, model_configs
from sparse_upcycle.upcycle.rules import Recipe, tile_optimizer_state, upcycle_tree
from sparse_upcycle.upcycle.verdict import dense_function_verdict

FORMATS = ("auto", "t5x", "orbax", "npz", "hf")
RECIPE_FILE = "recipe.json"


# --------------------------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------------------------


def detect_format(path: str) -> str:
    from sparse_upcycle.checkpoints.hf import is_hf
    from sparse_upcycle.checkpoints.orbax import is_orbax

    if os.path.isfile(path) and path.endswith(".npz"):
        return "npz"
    if os.path.basename(path) == "checkpoint" or os.path.isfile(os.path.join(path, "checkpoint")):
        return "t5x"
    if is_orbax(path) or os.path.isfile(os.path.join(path, RECIPE_FILE)):
        return "orbax"
    if is_hf(path):
        return "hf"
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(
        f"{path}: cannot tell the checkpoint format; pass --format ({' | '.join(FORMATS[1:])})"
    )


def open_checkpoint(path: str, fmt: str = "auto"):
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "t5x":
        from sparse_upcycle.checkpoints.t5x import T5XCheckpoint as cls
    elif fmt == "orbax":
        from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint as cls
    elif fmt == "npz":
        from sparse_upcycle.checkpoints.npz import NpzCheckpoint as cls
    elif fmt == "hf":
        from sparse_upcycle.checkpoints.hf import HFCheckpoint as cls
    else:
        raise CheckpointError(f"unknown format {fmt!r}; one of {FORMATS}")
    ckpt = cls(path)
    ckpt.format = fmt
    return ckpt


def _checksums(path: str) -> dict[str, str]:
    """sha256 of every file of the source (a directory's files, or the file)."""
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    )
    out = {}
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[os.path.relpath(file, path) if os.path.isdir(path) else os.path.basename(file)] = (
            digest.hexdigest()
        )
    return out


# --------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------


def family_module(family: str):
    from sparse_upcycle.models import decoder, t5, vit

    return {"t5": t5, "vit": vit, "decoder": decoder}[family]


def model_class(family: str):
    module = family_module(family)
    return {"t5": "T5", "vit": "ViT", "decoder": "Decoder"}[family], module


def build_model(family: str, config, flat_params: dict):
    name, module = model_class(family)
    model = getattr(module, name)(config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, unflatten(flat_params)))
    nnx.update(model, state)
    return model


def target_shapes(family: str, config) -> dict:
    abstract = family_module(family).abstract_params(config)
    return {p: (tuple(s.shape), np.dtype(s.dtype)) for p, s in flatten(abstract).items()}


def recipe_from(config) -> Recipe:
    block = dict(config.get("upcycle", {}))
    check_names(block, [f.name for f in dataclasses.fields(Recipe)], "upcycle")
    try:
        return Recipe(**block)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"upcycle recipe: {e}") from None


def resolve_models(config, source=None):
    """(family, dense config, MoE config, recipe) for an experiment config and source."""
    recipe = recipe_from(config)
    base = getattr(source, "config", None)
    granularity = recipe.granularity if recipe.method == "virtual_group" else 1
    family, dense, moe = model_configs(config.model, recipe.total_experts, base, granularity)
    if recipe.method == "virtual_group":
        blocks = [moe.encoder_moe, moe.decoder_moe] if family == "t5" else [moe.moe]
        for block in blocks:
            if block.sparse_layers(1_000_000) and (
                block.router != "top_k" or block.k != recipe.k or block.ordering != recipe.ordering
            ):
                raise ConfigError(
                    f"virtual_group scaling assumes top-{recipe.k} {recipe.ordering} routing; the "
                    f"model routes {block.router} k={block.k} {block.ordering}: set model.moe "
                    "(router, k, ordering) to match upcycle (k, ordering)"
                )
    return family, dense, moe, recipe


# --------------------------------------------------------------------------------------------
# upcycle
# --------------------------------------------------------------------------------------------


def upcycle(
    config, src: str, dst: str, fmt: str = "auto", overwrite: bool = False, progress: bool = True
) -> dict:
    """Write the MoE checkpoint for ``config`` from the dense ``src`` to ``dst``; returns the
    recipe.json content. Nothing is written to ``dst`` unless everything succeeded."""
    dst_abs = check_output_path(src, dst, overwrite)
    source = open_checkpoint(src, fmt)
    family, dense_cfg, moe_cfg, recipe = resolve_models(config, source)
    target = target_shapes(family, moe_cfg)
    slot_keys = []
    if recipe.optimizer == "tile":
        slot_keys = source.optimizer_state_keys() if hasattr(source, "optimizer_state_keys") else []
        if not slot_keys:
            raise CheckpointError(
                f"{src}: optimizer=tile needs the dense optimizer state and this {source.format} "
                "checkpoint holds none; use --config.upcycle.optimizer=reset"
            )
    _warn_schedule(config, recipe, source.step)
    verdict = dense_function_verdict(recipe, moe_cfg)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(dst_abs)
    _remove_stale_partials(parent, name)
    tmp = make_output_tmpdir(parent, f".upcycle-{name}-{os.getpid()}-")
    writer = None
    try:
        from sparse_upcycle.checkpoints.orbax import StreamingWriter

        writer = StreamingWriter(os.path.join(tmp, "checkpoint"))
        stream = upcycle_tree(source.keys(), source.read, target, recipe)
        for path, value in tqdm(
            stream, total=len(target), desc="upcycle", unit="tensor", disable=not progress
        ):
            writer.add(path, value)
        read_slot = getattr(source, "read_optimizer_state", None)
        slots = tile_optimizer_state(slot_keys, read_slot, target, recipe)
        for path, value in tqdm(
            slots, total=len(slot_keys), desc="optimizer", unit="slot", disable=not progress
        ):
            writer.add(path, value, item="opt_state")
        step = source.step if recipe.step == "keep" and source.step is not None else 0
        writer.close(step=step)
        info = {
            "package_version": __version__,
            "recipe": recipe.to_dict(),
            "recipe_name": recipe.name,
            "family": family,
            "model": _config_dict(moe_cfg),
            "dense_model": _config_dict(dense_cfg),
            "source": {
                "path": os.path.abspath(src),
                "format": source.format,
                "step": source.step,
                "sha256": _checksums(src),
            },
            "step": step,
            "optimizer_slots": len(slot_keys),
            "preserves_dense_function": verdict.preserves,
            "preservation": list(verdict.reasons),  # why not, when it does not
        }
        with open(os.path.join(tmp, RECIPE_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, default=str)
        if source.format == "hf":  # config, tokenizer, … for `export --format hf`
            from sparse_upcycle.export import save_hf_source

            save_hf_source(source, tmp)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _remove_stale_partials(parent: str, name: str, kind: str = "upcycle") -> None:
    """Remove the temporaries of earlier runs for the same --dst whose process is gone (a run
    killed with SIGKILL cannot clean up after itself; its output was never renamed into place,
    so nothing of it looks complete)."""
    pattern = re.compile(rf"^\.{kind}-{re.escape(name)}-(\d+)-")
    for entry in os.listdir(parent):
        m = pattern.match(entry)
        if not m:
            continue
        try:
            os.kill(int(m[1]), 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _warn_schedule(config, recipe: Recipe, dense_step: int | None) -> None:
    """``step=keep`` with an rsqrt schedule resumes it at the dense step count, where the rate
    is already base/sqrt(step); a ``step_offset`` on top would count the dense steps twice."""
    schedule = config.get("optimizer", {}).get("schedule") if "optimizer" in config else None
    if recipe.step == "keep" and schedule == "rsqrt":
        offset = config.optimizer.get("step_offset", 0)
        warnings.warn(
            f"upcycle step=keep with an rsqrt schedule: training resumes it at the dense step "
            f"{dense_step} (lr = base/sqrt({dense_step}))"
            + (f" and optimizer.step_offset={offset} adds to that" if offset else "")
            + "; use step=reset with optimizer.step_offset to choose where it continues",
            stacklevel=2,
        )


def _config_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def load_upcycled(path: str):
    """(recipe.json dict, flat params) of a directory written by ``upcycle``."""
    recipe_path = os.path.join(path, RECIPE_FILE)
    if not os.path.isfile(recipe_path):
        raise CheckpointError(f"{path}: no {RECIPE_FILE}; not written by 'sparse-upcycle upcycle'")
    with open(recipe_path, encoding="utf-8") as f:
        info = json.load(f)
    from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint

    ckpt = OrbaxCheckpoint(os.path.join(path, "checkpoint"))
    return info, {k: ckpt.read(k) for k in ckpt.keys()}


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


def _batch(family: str, cfg, seed: int = 0):
    rng = np.random.default_rng(seed)
    if family == "vit":
        h, w = cfg.image_size
        return (jnp.asarray(rng.normal(size=(2, h, w, cfg.num_channels)), jnp.float32),)
    if family == "decoder":
        return (jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 16))),)
    return (
        jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 16))),
        jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 8))),
    )


def verify(config, dense_path: str, moe_path: str, fmt: str = "auto", tol: float = 1e-5) -> dict:
    source = open_checkpoint(dense_path, fmt)
    info, moe_params = load_upcycled(moe_path)
    family, dense_cfg, moe_cfg, recipe = resolve_models(config, source)
    dense = build_model(family, dense_cfg, {k: source.read(k) for k in source.keys()})
    moe = build_model(family, moe_cfg, moe_params)
    batch = _batch(family, dense_cfg)
    want, _ = dense(*batch, train=False)
    got, aux = moe(*batch, train=False)
    delta = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    verdict = dense_function_verdict(recipe, moe_cfg)
    meant = verdict.preserves
    scale = float(np.max(np.abs(np.asarray(want))))
    return {
        "max_abs_delta": float(delta.max()),
        "mean_abs_delta": float(delta.mean()),
        "max_abs_dense_logit": scale,
        "meant_to_preserve": meant,
        "not_meant_because": list(verdict.reasons),
        "tolerance": tol * max(1.0, scale),
        "ok": (not meant) or float(delta.max()) <= tol * max(1.0, scale),
        "dropped_fraction": float(aux.get("dropped_fraction", 0.0)) if aux else 0.0,
    }


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def inspect(path: str, fmt: str = "auto") -> str:
    """A human-readable report: format, tree, parameter counts, recipe, capacities."""
    recipe_info = None
    if os.path.isfile(os.path.join(path, RECIPE_FILE)):
        recipe_info, flat = load_upcycled(path)
        fmt_name = "orbax (sparse_upcycle upcycle output)"
        shapes = {k: (v.shape, v.dtype) for k, v in flat.items()}
    else:
        ckpt = open_checkpoint(path, fmt)
        fmt_name = ckpt.format
        shapes = {k: (ckpt.shape(k), ckpt.dtype(k)) for k in ckpt.keys()}
    lines = [f"path:    {os.path.abspath(path)}", f"format:  {fmt_name}", "tensors:"]
    width = max((len(k) for k in shapes), default=0)
    for key in sorted(shapes):
        shape, dtype = shapes[key]
        lines.append(f"  {key:<{width}}  {str(tuple(shape)):<22} {np.dtype(dtype).name}")
    total = sum(math.prod(s) for s, _ in shapes.values())
    expert = {k: math.prod(s) for k, (s, _) in shapes.items() if "/expert/" in k}
    lines.append(f"parameters: {total:,} total")
    if expert:
        k_active, note = _active_experts(recipe_info)
        active = (
            total
            - sum(expert.values())
            + sum(n * k_active // shapes[k][0][0] for k, n in expert.items())
        )
        lines.append(f"            {active:,} active per token ({note})")
    if recipe_info:
        lines.append("recipe:  " + json.dumps(recipe_info["recipe"]))
        lines.extend(_capacity_lines(recipe_info))
    return "\n".join(lines)


def _active_experts(info) -> tuple[int, str]:
    if not info:
        return 1, "assuming 1 expert per token"
    moe = info["model"].get("moe") or info["model"].get("decoder_moe")
    if moe and moe.get("router") == "top_k":
        return int(moe["k"]), f"top-{moe['k']}"
    if moe:  # expert choice: on average C experts per token
        c = float(moe.get("capacity_factor") or 1)
        return max(1, round(c)), f"expert choice: C={c:g} experts per token on average"
    return 1, "assuming 1 expert per token"


def _capacity_lines(info) -> list[str]:
    from sparse_upcycle.routing import expert_choice_capacity, top_k_capacity

    out = [
        "capacity per MoE layer (expert choice ceil(C·S/E), top-K ceil(C·S·K/E); S = group size):"
    ]
    model = info["model"]
    for key in ("moe", "encoder_moe", "decoder_moe"):
        moe = model.get(key)
        if not moe or not moe.get("num_experts"):
            continue
        s, e = int(moe["group_size"]), int(moe["num_experts"])
        for phase in ("capacity_factor", "eval_capacity_factor"):
            c = moe[phase]
            if moe["router"] == "expert_choice":
                cap = expert_choice_capacity(s, e, float(c), int(moe["capacity_multiple"]))
            else:
                cap = top_k_capacity(
                    s,
                    e,
                    int(moe["k"]),
                    None if c is None else float(c),
                    int(moe["capacity_multiple"]),
                )
            label = "train" if phase == "capacity_factor" else "eval"
            out.append(
                f"  {key} ({moe['router']}, {label}): C={c}, S={s}, E={e} -> "
                f"{'dropless' if cap is None else cap}"
            )
    return out
